// The main thread's side of the databases: the configured backends of a
// cache, and the database worker (src/database/worker.js) that owns their
// pools, started with the first cache that configures a database and
// stopped with the last one closed.

import { Worker, MessageChannel } from 'node:worker_threads';
import { CacheError } from '../errors.js';
import { databaseSettings } from './settings.js';

const WORKER = new URL('./worker.js', import.meta.url);

let worker = null;
let users = 0;
let nextId = 1;
/** backend id -> onWarning of the cache that configured it. */
const warners = new Map();

function dbWorker() {
  if (!worker) {
    // The worker gets no environment of ours: like the Rust host, the
    // connection comes from the configuration only (no PG* variables, no
    // ~/.pgpass).
    worker = new Worker(WORKER, { env: {}, stdout: false, stderr: false });
    worker.unref();
    worker.on('message', (m) => {
      if (m?.warning) for (const w of new Set(warners.values())) w(m.warning);
    });
    worker.on('error', (e) => {
      for (const w of new Set(warners.values())) w(`the database worker stopped: ${e?.message ?? e}`);
      worker = null;
    });
  }
  return worker;
}

/**
 * The databases one cache offers its drivers: `config` maps a name (the
 * centralized driver opens `glance`) to a URL or to {url, poolSize,
 * statementTimeoutMs, connectTimeoutMs, maxResultBytes,
 * allowPrivilegedRole}. Checked here (a bad URL is a `bad-configuration`
 * error that never shows it); nothing connects until a driver opens one.
 */
export class Databases {
  /**
   * @param {Object<string, string | {url: string, poolSize?: number,
   *   statementTimeoutMs?: number, connectTimeoutMs?: number,
   *   maxResultBytes?: number, allowPrivilegedRole?: boolean}>} [config]
   * @param {{callDeadlineMs?: number, onWarning?: (message: string) => void}} [options]
   *   callDeadlineMs is the default statement timeout; onWarning gets the
   *   role warnings (a privileged role allowed, privileges missing).
   * @throws {CacheError} `bad-configuration`, naming the database, never the URL
   */
  constructor(config = {}, { callDeadlineMs = 30_000, onWarning = () => {} } = {}) {
    this.ids = {};
    this.closed = false;
    const settings = [];
    for (const [name, c] of Object.entries(config ?? {})) {
      try {
        settings.push(databaseSettings(name, c, { callDeadlineMs }));
      } catch (e) {
        throw new CacheError('bad-configuration', `bad configuration: ${e.message}`);
      }
    }
    if (!settings.length) return;
    const w = dbWorker();
    users++;
    for (const s of settings) {
      const id = nextId++;
      this.ids[s.name] = id;
      warners.set(id, onWarning);
      w.postMessage({ op: 'configure', id, settings: s });
    }
  }

  /** The names drivers may open. */
  get names() {
    return Object.keys(this.ids).sort();
  }

  /**
   * A channel for one driver instance: its thread's side of the `database`
   * import (src/host/database.js) takes it.
   * @returns {{port: MessagePort | null, signal: Int32Array | null,
   *   names: string[], detach: () => void}} transfer `port` to the
   *   instance's thread; call `detach()` when the instance is stopped
   */
  attach() {
    const names = this.names;
    if (!names.length || this.closed || !worker) return { port: null, signal: null, names: [], detach() {} };
    const { port1, port2 } = new MessageChannel();
    const signal = new Int32Array(new SharedArrayBuffer(4));
    const key = `i${nextId++}`;
    const w = worker;
    w.postMessage({ op: 'attach', key, port: port2, signal, names: { ...this.ids } }, [port2]);
    return {
      port: port1,
      signal,
      names,
      detach() {
        w.postMessage({ op: 'detach', key });
      },
    };
  }

  /** Close every connection of these databases. */
  close() {
    if (this.closed) return;
    this.closed = true;
    const ids = Object.values(this.ids);
    if (!ids.length || !worker) return;
    for (const id of ids) {
      worker.postMessage({ op: 'close', id });
      warners.delete(id);
    }
    if (--users === 0) {
      const w = worker;
      worker = null;
      // Give the pools a moment to say goodbye to the server.
      setTimeout(() => w.terminate(), 200).unref();
    }
  }
}
