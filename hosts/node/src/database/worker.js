// The database worker: one thread per process that owns every configured
// database's pool (src/database/backend.js for PostgreSQL,
// src/database/mysql.js for MySQL and MariaDB) and runs the statements of
// every driver instance that imports `database`.
//
// Component imports are synchronous; node-postgres and mysql2 are
// asynchronous. A driver instance's thread (src/worker.js) posts a request
// on its own MessagePort and sleeps in Atomics.wait on a shared word; this
// thread runs the request (bounded by the driver call's deadline, which it
// enforces itself: a statement still running then is cancelled on the
// server and its connection closed), posts the answer on the port and
// bumps and notifies the word; the instance's thread wakes and takes the
// answer with receiveMessageOnPort. Requests of one instance run one after
// another, in order.
//
// From the main thread (src/database/service.js): configure / close a
// backend, attach / detach an instance. When an instance's thread is
// stopped, its port closes: its connections go back to their pools (those
// inside a transaction or half-way through a statement are closed, which
// rolls back on the server).

import { parentPort } from 'node:worker_threads';
import { Backend, DbError, timedOut } from './backend.js';
import { MysqlBackend } from './mysql.js';

// Nothing that goes wrong in one request may stop the thread every
// database call of the process goes through: said, not thrown.
process.on('unhandledRejection', (e) => warn(`database worker: ${e?.message ?? e}`));
process.on('uncaughtException', (e) => warn(`database worker: ${e?.message ?? e}`));

const backends = new Map();
const instances = new Map();
let nextConn = 1;

function warn(message) {
  parentPort.postMessage({ warning: String(message) });
}

/** An instance's connection ids -> {backend, conn}. */
class Instance {
  constructor(key, port, signal, names) {
    this.key = key;
    this.port = port;
    this.signal = signal;
    this.names = names; // name -> backend id
    this.conns = new Map();
    this.orphans = [];
    this.chain = Promise.resolve();
    this.detached = false;
    port.on('message', (m) => {
      this.chain = this.chain.then(() => this.handle(m)).catch(() => {});
    });
    port.on('close', () => this.detach());
    port.start?.();
  }

  reply(seq, body) {
    if (this.detached) return;
    try {
      this.port.postMessage({ seq, ...body });
    } catch {
      return;
    }
    Atomics.add(this.signal, 0, 1);
    Atomics.notify(this.signal, 0);
  }

  async handle(m) {
    if (this.detached) return;
    const { seq, op } = m;
    if (op === 'drop') {
      const held = this.conns.get(m.conn);
      this.conns.delete(m.conn);
      if (held?.conn) held.backend.release(held.conn);
      return;
    }
    try {
      const value = await this.run(m);
      this.reply(seq, { ok: true, ...value });
    } catch (e) {
      const err = e instanceof DbError ? e : new DbError('other', `database: ${String(e?.message ?? e)}`);
      this.reply(seq, { ok: false, error: err.payload, inTx: m.conn ? Boolean(this.conns.get(m.conn)?.conn?.inTx) : false });
    } finally {
      // Detached while this ran: what it held is closed now.
      if (this.detached) {
        for (const { backend, conn } of this.orphans.splice(0)) backend.release(conn);
      }
    }
  }

  async run(m) {
    switch (m.op) {
      case 'open': {
        const backend = backends.get(this.names[m.name]);
        if (!backend) throw new DbError('access-denied', `no database named ${JSON.stringify(m.name)} is configured for this driver`);
        const conn = await backend.checkout(m.deadline);
        if (this.detached) {
          backend.release(conn);
          throw timedOut();
        }
        const id = nextConn++;
        this.conns.set(id, { backend, conn });
        return { conn: id, dialect: backend.dialect };
      }
      case 'execute':
      case 'query': {
        const held = this.conns.get(m.conn);
        if (!held) throw new DbError('unavailable', 'this connection was lost; open a new one');
        const value = await held.backend.statement(held.conn, m.sql, m.params, m.op === 'query' ? 'rows' : 'count', m.deadline);
        return { value, inTx: held.conn.inTx };
      }
      case 'endOfCall': {
        for (const id of m.conns) {
          const held = this.conns.get(id);
          if (held) await held.backend.endOfCall(held.conn, m.deadline);
        }
        return {};
      }
      default:
        throw new DbError('other', `unknown database request ${String(m.op)}`);
    }
  }

  /** The instance is gone: its connections go back (or are closed). */
  detach() {
    if (this.detached) return;
    this.detached = true;
    instances.delete(this.key);
    for (const { backend, conn } of this.conns.values()) {
      if (conn.busy) {
        // Half-way through a statement: closed when it ends (its deadline).
        conn.inTx = true;
        this.orphans.push({ backend, conn });
        continue;
      }
      backend.release(conn);
    }
    this.conns.clear();
    try {
      this.port.close();
    } catch {}
  }
}

parentPort.on('message', (m) => {
  switch (m.op) {
    case 'configure':
      backends.set(m.id, m.settings.dialect === 'mysql' ? new MysqlBackend(m.settings, warn) : new Backend(m.settings, warn));
      break;
    case 'close': {
      const b = backends.get(m.id);
      backends.delete(m.id);
      b?.close();
      break;
    }
    case 'attach':
      instances.set(m.key, new Instance(m.key, m.port, m.signal, m.names));
      break;
    case 'detach':
      instances.get(m.key)?.detach();
      break;
    default:
  }
});
