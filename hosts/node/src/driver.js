// A loaded driver on one cache root, seen from the main thread: its
// instance runs in a worker (src/worker.js); calls go one at a time, each
// with a deadline; a fault (trap, deadline, broken contract, a worker that
// died) discards the instance and the next call starts a fresh one.
//
// What a driver returns is checked here before the host acts on it: ids
// are valid ids, listings sorted and bounded, counts sane, messages cut to
// a printable line.

import fs from 'node:fs';
import { Worker } from 'node:worker_threads';
import { createRequire } from 'node:module';
import { CacheError, printable, invalidIdReason, refusal, validateImageId } from './errors.js';
import { createLockTable, createFdTable, Locks } from './host/locks.js';

const WORKER = new URL('./worker.js', import.meta.url);

/** Most bytes of a checksum a driver reports (it goes into headers). */
export const MAX_CHECKSUM = 128;

export const DEFAULT_LIMITS = {
  /** Longest one driver call may run, host imports included (ms). */
  callDeadlineMs: 30_000,
  /** Most linear memory the instance may grow to. */
  memoryBytes: 1 << 30,
  /** Most files the instance may hold open. */
  openFiles: 256,
  /** Most entries one directory listing may return. */
  maxListing: 4_000_000,
  /** The JS heap of the worker (MiB). */
  heapMb: 512,
  /** Stopped instances whose thread has not ended yet (stuck in a system
   * call, which cannot be interrupted from Node) that a driver may leave
   * behind before it gets no new instance. */
  maxStoppedRunning: 2,
  /** Most database connections (`database` import) the instance may hold
   * at once. */
  databaseConnections: 4,
};

/** flock(2) from fs-ext, loaded in the main thread only: a NAN add-on,
 * it crashed the process when loaded in a second worker after one had been
 * stopped. Workers ask the main thread to flock their descriptors (which
 * are the process's); without it, the lock table below is all there is. */
let FLOCK;
function flocker() {
  if (FLOCK === undefined) {
    try {
      FLOCK = createRequire(import.meta.url)('fs-ext');
    } catch {
      FLOCK = null;
    }
  }
  return FLOCK;
}

/** One lock table for the whole process (see host/locks.js). */
const LOCK_TABLE = createLockTable();
const LOCKS = new Locks(LOCK_TABLE);
let nextWorkerId = 1;

export const stats = { instances: 0, discarded: 0 };

export class Driver {
  constructor(component, { root, options, limits, xattr = true, databases = null }) {
    this.component = component;
    this.root = root;
    /** The cache's databases (src/database/service.js), for a driver that
     * imports `database`. */
    this.importsDatabase = component.imports.some((i) => i.startsWith('image-cache:driver/database@'));
    this.databases = this.importsDatabase ? databases : null;
    this.xattr = xattr && component.imports.some((i) => i.startsWith('image-cache:driver/xattr@'));
    this.options = options;
    this.limits = { ...DEFAULT_LIMITS, ...limits };
    this.instance = null; // {worker, wid, fdTable, pending: Map, sessions: Set}
    this.queue = Promise.resolve();
    this.nextCall = 1;
    this.info = null;
    this.closed = false;
    /** Stopped instances whose threads still run. */
    this.stoppedRunning = 0;
  }

  get name() {
    return this.component.name;
  }

  /** Instantiate and configure: a driver that cannot configure itself is
   * an error here, before anyone uses it. */
  static async start(component, placement) {
    const d = new Driver(component, placement);
    await d.serialized(() => d.ensureInstance());
    return d;
  }

  fault(message) {
    return new CacheError('driver-fault', `driver ${this.name} failed: ${message}`, {
      driver: this.name,
    });
  }

  /** A new worker with a configured instance. */
  async spawn() {
    const wid = nextWorkerId++;
    const fdTable = createFdTable(this.limits.openFiles);
    // [0]: the last answered lock request, [1]: its answer.
    const lockChannel = new Int32Array(new SharedArrayBuffer(8));
    // Its own channel to the database worker (none: every open is
    // access-denied, as for a name that is not configured).
    const database = this.importsDatabase ? (this.databases?.attach() ?? { port: null, signal: null, names: [], detach() {} }) : null;
    const worker = new Worker(WORKER, {
      workerData: {
        source: this.component.source,
        sourcePath: this.component.sourcePath,
        codeCache: this.component.codeCache ?? null,
        modules: this.component.modules,
        imports: this.component.imports,
        exports: this.component.exports,
        root: this.root,
        options: this.options,
        limits: this.limits,
        lockTable: LOCK_TABLE,
        fdTable,
        wid,
        xattr: this.xattr,
        lockChannel: flocker() ? lockChannel : null,
        database: database
          ? { port: database.port, signal: database.signal, names: database.names, maxConnections: this.limits.databaseConnections }
          : null,
      },
      transferList: database?.port ? [database.port] : [],
      resourceLimits: { maxOldGenerationSizeMb: this.limits.heapMb },
      // The guest gets no environment of ours; the worker needs none.
      env: {},
      // Descriptors are tracked by the fd table (sessions' ones belong to
      // the main thread and must outlive the worker).
      trackUnmanagedFds: false,
      // The application's flags, less those that only make sense for its
      // own entry point (`node --input-type=module -e ...`).
      execArgv: process.execArgv.filter((a) => !a.startsWith('--input-type')),
      stdout: false,
      stderr: false,
    });
    const inst = { worker, wid, fdTable, lockChannel, database, pending: new Map(), sessions: new Set(), dead: false };
    worker.unref();
    await new Promise((resolve, reject) => {
      const early = (e) => reject(this.fault(`its worker did not start (${printable(e?.message ?? e, 256)})`));
      worker.once('error', early);
      worker.once('message', (m) => {
        worker.off('error', early);
        if (m?.ready) resolve();
        else reject(this.fault('its worker did not start'));
      });
    });
    worker.on('message', (m) => this.reply(inst, m));
    worker.on('error', (e) => this.discard(inst, this.fault(`its worker stopped: ${printable(e?.message ?? e, 256)}`)));
    worker.on('exit', () => this.discard(inst, this.fault('its worker exited')));
    this.instance = inst;
    stats.instances++;
    try {
      const { info, codeCache } = await this.send(inst, 'start', { options: this.options });
      if (codeCache && !this.component.codeCache) this.component.codeCache = codeCache;
      this.info = {
        name: printable(info.name, 64),
        version: printable(info.version, 64),
        description: printable(info.description, 512),
      };
    } catch (e) {
      this.discard(inst, e, { count: false });
      throw e;
    }
    return inst;
  }

  async ensureInstance() {
    if (this.closed) throw new CacheError('io', `driver ${this.name} is closed`);
    if (this.instance && !this.instance.dead) return this.instance;
    if (this.stoppedRunning >= this.limits.maxStoppedRunning) {
      throw new CacheError(
        'overloaded',
        `driver ${this.name}: ${this.stoppedRunning} of its stopped instances are still running (a thread inside a system call cannot be interrupted on Node); no new instance until they end`,
      );
    }
    return this.spawn();
  }

  /** Stop an instance: its worker, its descriptors, its locks, its
   * sessions. */
  discard(inst, error, { count = true } = {}) {
    if (inst.dead) return;
    inst.dead = true;
    if (count) stats.discarded++;
    // The guest's descriptors are closed once the thread has stopped (a
    // thread still inside a system call could otherwise reach a file that
    // reused a closed number); its locks go now.
    const closeGuestFiles = () => {
      for (let i = 0; i < inst.fdTable.length; i++) {
        const fd = Atomics.exchange(inst.fdTable, i, -1);
        if (fd >= 0) {
          try {
            fs.closeSync(fd);
          } catch {}
        }
      }
    };
    this.stoppedRunning++;
    const ended = () => {
      this.stoppedRunning--;
      closeGuestFiles();
    };
    inst.worker.terminate().then(ended, ended);
    // Its database connections go back to their pools (closed if inside a
    // transaction or a statement).
    inst.database?.detach();
    LOCKS.releaseWorker(inst.wid);
    for (const ref of inst.sessions) ref.deref()?.instanceLost();
    inst.sessions.clear();
    for (const { reject, timer } of inst.pending.values()) {
      clearTimeout(timer);
      reject(error);
    }
    inst.pending.clear();
    if (this.instance === inst) this.instance = null;
  }

  /** A worker asks for flock(fd, op) on one of its descriptors; it waits
   * on the lock channel for the answer: 1 done, 0 held by another, -1
   * failed. A stopped instance's requests are ignored (its numbers may be
   * reused by now). */
  flock(inst, { fd, op, seq }) {
    if (inst.dead) return;
    let answer;
    try {
      FLOCK.flockSync(fd, op);
      answer = 1;
    } catch (e) {
      answer = e?.code === 'EAGAIN' || e?.code === 'EWOULDBLOCK' ? 0 : -1;
    }
    Atomics.store(inst.lockChannel, 1, answer);
    Atomics.store(inst.lockChannel, 0, seq);
    Atomics.notify(inst.lockChannel, 0);
  }

  reply(inst, m) {
    if (m.flock) return this.flock(inst, m.flock);
    const p = inst.pending.get(m.id);
    if (!p) return;
    inst.pending.delete(m.id);
    clearTimeout(p.timer);
    if (m.ok) return p.resolve(m.value);
    if (m.fault) {
      const e = this.fault(m.fault);
      this.discard(inst, e);
      return p.reject(e);
    }
    p.reject(guestError(m.error));
  }

  /** Send one call to an instance, with the deadline. */
  send(inst, op, args) {
    const id = this.nextCall++;
    const deadlineMs = this.limits.callDeadlineMs;
    return new Promise((resolve, reject) => {
      // The worker stops itself at the deadline inside host imports; this
      // timer stops the worker when the guest does not come back at all.
      const timer = setTimeout(() => {
        const e = this.fault(`it ran past its deadline of ${deadlineMs} ms and was stopped`);
        this.discard(inst, e);
      }, deadlineMs + 50);
      inst.pending.set(id, { resolve, reject, timer });
      inst.worker.postMessage({ id, op, args, deadlineMs });
    });
  }

  /** Run fn with no other call of this driver in flight. */
  serialized(fn) {
    const run = this.queue.then(fn, fn);
    this.queue = run.then(
      () => {},
      () => {},
    );
    return run;
  }

  /** One call on the current instance (a fresh one if the last faulted). */
  call(op, args) {
    return this.serialized(async () => {
      const inst = await this.ensureInstance();
      return { inst, value: await this.send(inst, op, args) };
    });
  }

  /** A session's call: on the instance it began on, or a fault if that
   * instance is gone. */
  sessionCall(inst, op, args) {
    return this.serialized(async () => {
      if (inst.dead) throw this.fault('its instance was stopped while the session was open');
      return this.send(inst, op, args);
    });
  }

  async fn(name, ...args) {
    return (await this.call('call', { fn: name, args })).value;
  }

  /** A call whose result must pass check(value) or the driver is broken. */
  async checked(name, args, check) {
    const { inst, value } = await this.call('call', { fn: name, args });
    const broken = check(value);
    if (broken) {
      const e = this.fault(`it broke the driver contract: ${broken}`);
      this.discard(inst, e);
      throw e;
    }
    return value;
  }

  async close() {
    this.closed = true;
    await this.queue;
    if (this.instance) this.discard(this.instance, new CacheError('io', `driver ${this.name} is closed`), { count: false });
  }

  // ---- the driver's operations, checked ----
  //
  // Every id an application passes goes through validateImageId here, in
  // the main thread: an invalid id (or a value that is not an id) is an
  // `invalid-image-id` rejection before any worker sees it; an integer
  // becomes its decimal string.

  getCacheSize() {
    return this.fn('getCacheSize').then(Number);
  }
  async getHitCount(id) {
    return this.fn('getHitCount', validateImageId(id)).then(Number);
  }
  async getCachedImages() {
    const images = await this.checked('getCachedImages', [], (list) => {
      const bad = badIds('get-cached-images', list.map((i) => i.imageId));
      if (bad) return bad;
      for (let i = 1; i < list.length; i++) {
        if (!(list[i - 1].imageId < list[i].imageId)) {
          return `get-cached-images is not ordered by id (${JSON.stringify(printable(list[i - 1].imageId, 64))} before ${JSON.stringify(printable(list[i].imageId, 64))})`;
        }
      }
      return null;
    });
    return images.map((i) => ({
      imageId: i.imageId,
      hits: Number(i.hits),
      lastModified: i.lastModified,
      lastAccessed: i.lastAccessed,
      size: Number(i.size),
    }));
  }
  async isCached(id) {
    return this.fn('isCached', validateImageId(id));
  }
  async isBeingCached(id) {
    return this.fn('isBeingCached', validateImageId(id));
  }
  async isCacheable(id) {
    return this.fn('isCacheable', validateImageId(id));
  }
  async isQueued(id) {
    return this.fn('isQueued', validateImageId(id));
  }
  async queueImage(id) {
    return this.fn('queueImage', validateImageId(id));
  }
  getQueuedImages() {
    return this.checked('getQueuedImages', [], (ids) => badIds('get-queued-images', ids));
  }
  async deleteCachedImage(id) {
    return this.fn('deleteCachedImage', validateImageId(id)).then(() => undefined);
  }
  deleteAllCachedImages() {
    return this.fn('deleteAllCachedImages').then(Number);
  }
  async deleteQueuedImage(id) {
    return this.fn('deleteQueuedImage', validateImageId(id)).then(() => undefined);
  }
  deleteAllQueuedImages() {
    return this.fn('deleteAllQueuedImages').then(Number);
  }
  async getLeastRecentlyAccessed() {
    const lru = await this.checked('getLeastRecentlyAccessed', [], (v) =>
      v === undefined ? null : badIds('get-least-recently-accessed', [v[0]]),
    );
    return lru === undefined ? null : [lru[0], Number(lru[1])];
  }
  async getLeastRecentlyAccessedBatch(count) {
    const n = Math.max(0, Math.min(0xffffffff, Math.floor(Number(count))));
    const batch = await this.checked('getLeastRecentlyAccessedBatch', [n], (list) =>
      list.length > n ? `asked for ${n} LRU entries, got ${list.length}` : badIds('the LRU batch', list.map((e) => e.imageId)),
    );
    return batch.map((e) => ({ imageId: e.imageId, size: Number(e.size), lastAccessed: e.lastAccessed }));
  }
  async getImageSize(id) {
    return this.fn('getImageSize', validateImageId(id)).then(Number);
  }
  async getCachedNodes(id) {
    return this.checked('getCachedNodes', [validateImageId(id)], (nodes) => {
      const bad = nodes.find((n) => n.length > 2048 || /\p{Cc}/u.test(n));
      return bad === undefined ? null : `get-cached-nodes returned an unusable node name ${JSON.stringify(printable(bad, 64))}`;
    });
  }
  async clean(stallTime) {
    const r = await this.checked('clean', [stallTime === undefined ? undefined : BigInt(Math.max(0, Math.floor(stallTime)))], (report) =>
      badIds('clean', [...report.invalid, ...report.incomplete].map((f) => f.imageId)),
    );
    return {
      invalid: r.invalid.map(removed),
      incomplete: r.incomplete.map(removed),
      failures: r.failures.slice(0, 1000).map((f) => printable(f, 512)),
    };
  }
  async prune(maxSize) {
    const r = await this.checked('prune', [BigInt(Math.max(0, Math.floor(maxSize)))], (report) => {
      const bad = badIds('prune', report.removed.map((f) => f.imageId));
      if (bad) return bad;
      const sum = report.removed.reduce((t, f) => t + f.size, 0n);
      return sum === report.bytesRemoved ? null : `prune reported ${report.bytesRemoved} bytes removed, but its files add up to ${sum}`;
    });
    return {
      removed: r.removed.map(removed),
      bytesRemoved: Number(r.bytesRemoved),
      sizeAfter: Number(r.sizeAfter),
      failures: r.failures.slice(0, 1000).map((f) => printable(f, 512)),
    };
  }

  /** The checksum a read session's driver recorded when the image was
   * committed, or null. It goes into HTTP headers as it is: one that is
   * empty, longer than 128 bytes or has characters other than ASCII
   * letters, digits and `+/=_:-` breaks the contract (the instance is
   * discarded), as in the Rust host. */
  async sessionChecksum(inst, sid, id) {
    const value = await this.sessionCall(inst, 'checksum', { sid });
    if (value === null || value === undefined) return null;
    if (!usableChecksum(value)) {
      const e = this.fault(
        `it broke the driver contract: the checksum of ${JSON.stringify(id)} is not a short token of letters, digits and +/=_:-`,
      );
      this.discard(inst, e);
      throw e;
    }
    return value;
  }

  /** Open a session; returns {inst, sid, fd, size}. The caller owns fd. */
  async openSession(kind, id) {
    id = validateImageId(id);
    const { inst, value } = await this.call(kind === 'write' ? 'openForWrite' : 'openForRead', { id });
    return { inst, ...value };
  }
}

/** A checksum that can go into a header value and an ETag as it is. */
export function usableChecksum(c) {
  return typeof c === 'string' && c.length > 0 && c.length <= MAX_CHECKSUM && /^[A-Za-z0-9+/=_:-]+$/.test(c);
}

function removed(f) {
  return { imageId: f.imageId, size: Number(f.size) };
}

/** Every id a driver returned must be valid before the host uses it. */
function badIds(what, ids) {
  for (const id of ids) {
    const reason = invalidIdReason(id);
    if (reason) return `${what} returned ${typeof id === 'string' ? refusal(id, reason) : `invalid image id (${typeof id}): ${reason}`}`;
  }
  return null;
}

const GUEST_KINDS = new Set([
  'bad-configuration', 'invalid-image-id', 'not-found', 'already-cached', 'being-cached', 'io',
  'database', 'not-configured', 'unsupported',
]);

/** The driver's error as a CacheError; an `io` error keeps the fs error
 * code it carries as `ioCode` (e.g. 'no-space', 'access-denied'). */
function guestError({ kind, message, ioCode }) {
  if (!GUEST_KINDS.has(kind)) return new CacheError('driver-fault', `unknown error kind ${printable(kind, 32)}`);
  const prefix = kind === 'io' ? 'I/O error: ' : kind === 'database' ? 'database error: ' : kind === 'bad-configuration' ? 'bad configuration: ' : '';
  return new CacheError(kind, prefix + message, kind === 'io' ? { ioCode: ioCode ?? 'io' } : {});
}
