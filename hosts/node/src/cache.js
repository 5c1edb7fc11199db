// The cache above the driver: Glance's ImageCache as a Node library, the
// same small API as the Rust (host/src/cache.rs) and Python hosts.
//
//   const cache = await ImageCache.open(root, { driver: 'sqlite' });
//   await cache.cache('img-1', bufferOrStream, { checksum: 'sha256:...' });
//   for await (const chunk of await cache.openForRead('img-1')) ...
//
// Every call is async: the driver runs in a worker thread that can be
// stopped at its deadline. Image bytes move here, on descriptors the driver
// opened, never through the guest's memory.

import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { promisify } from 'node:util';
import { CacheError, validateImageId } from './errors.js';
import { Driver, DEFAULT_LIMITS } from './driver.js';
import { loadDriver, DEFAULT_GRANTS } from './component.js';
import { Databases } from './database/service.js';
import { rangeLockAddon } from './host/native.js';

const write = promisify(fs.write);
const read = promisify(fs.read);
const fdatasync = promisify(fs.fdatasync);
const close = promisify(fs.close);

export const DEFAULT_MAX_SIZE = 10 * 1024 ** 3;
/** Most driver calls one prune or delete-all makes. */
const MAX_EVICTION_CALLS = 1000;
export const DEFAULT_STALL_TIME = 86_400;
export const DEFAULT_SQLITE_DB = 'cache.db';
const CHUNK = 1 << 20;

const HEX_LEN = { md5: 32, sha256: 64, sha512: 128 };

/** `md5:HEX`, `sha256:HEX`, `sha512:HEX`, or bare hex whose length says
 * which. */
export function parseChecksum(s) {
  if (s === undefined || s === null) return null;
  let [algorithm, hex] = String(s).includes(':') ? String(s).split(/:(.*)/s) : [null, String(s)];
  if (algorithm === null) {
    algorithm = Object.keys(HEX_LEN).find((a) => HEX_LEN[a] === hex.length);
    if (!algorithm) throw new CacheError('checksum-mismatch', `checksum ${JSON.stringify(s)}: write it as md5:HEX, sha256:HEX or sha512:HEX`);
  }
  algorithm = algorithm.toLowerCase();
  if (!HEX_LEN[algorithm]) {
    throw new CacheError('checksum-mismatch', `unknown checksum algorithm ${JSON.stringify(algorithm)} (use md5, sha256 or sha512)`);
  }
  if (hex.length !== HEX_LEN[algorithm] || !/^[0-9a-fA-F]*$/.test(hex)) {
    throw new CacheError('checksum-mismatch', `checksum ${JSON.stringify(s)}: a ${algorithm} digest is ${HEX_LEN[algorithm]} hex digits`);
  }
  return { algorithm, hex: hex.toLowerCase(), toString: () => `${algorithm}:${hex.toLowerCase()}` };
}

/** A byte source as an async iterable of Uint8Arrays. */
async function* chunksOf(source) {
  if (typeof source === 'string' || source instanceof Uint8Array) {
    const bytes = typeof source === 'string' ? Buffer.from(source) : source;
    for (let i = 0; i < bytes.length; i += CHUNK) yield bytes.subarray(i, Math.min(bytes.length, i + CHUNK));
    return;
  }
  if (source && (Symbol.asyncIterator in source || Symbol.iterator in source)) {
    for await (const chunk of source) yield typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    return;
  }
  throw new TypeError('an image source is a Buffer, a Uint8Array, a string or an (async) iterable of chunks');
}

async function writeAll(fd, chunk) {
  let off = 0;
  while (off < chunk.length) {
    const { bytesWritten } = await write(fd, chunk, off, chunk.length - off);
    off += bytesWritten;
  }
}

/** Make sure the root exists and is a writable directory. */
function prepareRoot(root) {
  const bad = (why) => new CacheError('bad-configuration', `bad configuration: cache root ${root}: ${why}`);
  let st;
  try {
    st = fs.statSync(root);
  } catch (e) {
    if (e.code !== 'ENOENT') throw bad(`cannot use it: ${e.code}`);
    try {
      fs.mkdirSync(root, { recursive: true });
    } catch (e2) {
      throw bad(`cannot create it: ${e2.code}`);
    }
    st = fs.statSync(root);
  }
  if (!st.isDirectory()) throw bad('not a directory');
  try {
    fs.accessSync(root, fs.constants.W_OK | fs.constants.X_OK);
  } catch (e) {
    throw bad(`not writable (${e.code})`);
  }
  return fs.realpathSync(root);
}

/** Image ids: every method that takes one checks it in the main thread
 * before any worker sees it (validateImageId: the image-id crate's rule);
 * an integer (a BigInt or a safe-integer number) is taken as its decimal
 * string, as Glance's integer ids are; anything else is `invalid-image-id`. */
export class ImageCache {
  /** Use `await ImageCache.open(root, options)`: opening starts a worker
   * and configures the driver, which cannot happen in a constructor. */
  constructor(root, driver, config) {
    if (!(driver instanceof Driver)) {
      throw new TypeError('open a cache with `await ImageCache.open(root, options)`');
    }
    this.root = root;
    this.driver = driver;
    this.previous = null;
    this.config = config;
  }

  /**
   * Open a cache on `root`.
   * options: driver ('sqlite' | 'xattr' | 'hostile' | a component file),
   *   fallbackToSqlite (true), sqliteDb ('cache.db'), limits (see
   *   DEFAULT_LIMITS), grants (['xattr']; `sqlite`, retired with contract
   *   0.3.0, is ignored with a warning), driverOptions ({}),
   *   xattr (true; false makes every xattr call `unsupported`, as a file
   *   system without user xattrs would),
   *   databases ({}; the shared databases a driver importing `database`
   *   may open, by name: `{ glance: 'postgresql://user:pw@host/db' }`,
   *   `{ glance: 'mysql+pymysql://user:pw@host/db?ssl_ca=...' }` or
   *   `{ glance: { url, poolSize, statementTimeoutMs, connectTimeoutMs,
   *   maxResultBytes, allowPrivilegedRole } }`; see README.md).
   *
   * The centralized driver (`driver: 'centralized'`) also needs
   * `driverOptions: { worker_self_reference_url: 'http://this-node:9292' }`.
   *
   * @param {string} root the cache directory
   * @param {{driver?: string, fallbackToSqlite?: boolean, sqliteDb?: string,
   *   limits?: object, grants?: string[], driverOptions?: Object<string, string>,
   *   xattr?: boolean, onWarning?: (message: string) => void,
   *   databases?: Object<string, string | {url: string, poolSize?: number,
   *   statementTimeoutMs?: number, connectTimeoutMs?: number,
   *   maxResultBytes?: number, allowPrivilegedRole?: boolean}>}} [options]
   * @returns {Promise<ImageCache>}
   */
  static async open(root, options = {}) {
    const config = {
      driver: options.driver ?? 'sqlite',
      fallbackToSqlite: options.fallbackToSqlite ?? true,
      sqliteDb: options.sqliteDb ?? DEFAULT_SQLITE_DB,
      limits: { ...DEFAULT_LIMITS, ...options.limits },
      grants: options.grants ?? DEFAULT_GRANTS,
      driverOptions: options.driverOptions ?? {},
      xattr: options.xattr ?? true,
      onWarning: options.onWarning ?? ((m) => process.emitWarning(m, 'ImageCacheWarning')),
    };
    const real = prepareRoot(path.resolve(String(root)));
    config.databases = new Databases(options.databases ?? {}, {
      callDeadlineMs: config.limits.callDeadlineMs,
      onWarning: config.onWarning,
    });
    let driver;
    try {
      driver = await startDriver(real, config, config.driver, config.grants);
    } catch (e) {
      // An unreachable database is an outage, not a driver that cannot be
      // configured: falling back would run a shared cache on local
      // bookkeeping (prune deleting files whose rows stay).
      if (!(config.fallbackToSqlite && config.driver !== 'sqlite') || e.kind === 'database') {
        config.databases.close();
        throw e;
      }
      config.onWarning(`driver ${config.driver} cannot be used (${e.message}); falling back to the sqlite driver`);
      driver = await startDriver(real, config, 'sqlite', DEFAULT_GRANTS);
      driver.fellBackFrom = config.driver;
    }
    return new ImageCache(real, driver, config);
  }

  /** The driver now serving calls: {name, version, description}. */
  get driverInfo() {
    return { ...this.driver.info, component: this.driver.name, fellBackFrom: this.driver.fellBackFrom };
  }

  /** Replace the driver: the new one is loaded and configured first; if
   * that fails the old one stays and the error is thrown. Sessions already
   * open finish on the old one. */
  async swapDriver(source, { grants } = {}) {
    const next = await startDriver(this.root, this.config, source, grants ?? this.config.grants);
    const old = this.driver;
    this.driver = next;
    if (this.previous) this.previous.close().catch(() => {});
    this.previous = old;
  }

  /** Stop the driver's worker (and a swapped-out one's) and close the
   * cache's database pools. Also `await using cache = await
   * ImageCache.open(...)` where the runtime has `Symbol.asyncDispose`. */
  async close() {
    await this.driver.close();
    if (this.previous) await this.previous.close();
    this.config.databases?.close();
  }

  getCacheSize() {
    return this.driver.getCacheSize();
  }
  getHitCount(id) {
    return this.driver.getHitCount(id);
  }
  getCachedImages() {
    return this.driver.getCachedImages();
  }
  /** Glance's list_cached: the cached images, ordered by id. */
  listCached() {
    return this.driver.getCachedImages();
  }
  isCached(id) {
    return this.driver.isCached(id);
  }
  isBeingCached(id) {
    return this.driver.isBeingCached(id);
  }
  isCacheable(id) {
    return this.driver.isCacheable(id);
  }
  isQueued(id) {
    return this.driver.isQueued(id);
  }
  queueImage(id) {
    return this.driver.queueImage(id);
  }
  /** Queue an image for prefetching; false if cached, incoming or queued. */
  queue(id) {
    return this.driver.queueImage(id);
  }
  getQueuedImages() {
    return this.driver.getQueuedImages();
  }
  deleteCachedImage(id) {
    return this.driver.deleteCachedImage(id);
  }
  /** Every cached image evicted; how many. A driver call stops evicting
   * after about ten seconds: called again until one removes nothing. */
  async deleteAllCachedImages() {
    let total = 0;
    for (let i = 0; i < MAX_EVICTION_CALLS; i++) {
      const removed = await this.driver.deleteAllCachedImages();
      total += removed;
      if (removed === 0) break;
    }
    return total;
  }
  deleteQueuedImage(id) {
    return this.driver.deleteQueuedImage(id);
  }
  deleteAllQueuedImages() {
    return this.driver.deleteAllQueuedImages();
  }
  getLeastRecentlyAccessed() {
    return this.driver.getLeastRecentlyAccessed();
  }
  getLeastRecentlyAccessedBatch(count) {
    return this.driver.getLeastRecentlyAccessedBatch(count);
  }
  getImageSize(id) {
    return this.driver.getImageSize(id);
  }
  getCachedNodes(id) {
    return this.driver.getCachedNodes(id);
  }
  /** Evict least recently accessed images until the cache is at or under
   * maxSize bytes (0 empties it). A driver call stops evicting after about
   * ten seconds and reports what it removed; while one removed something,
   * failed nothing and left the cache over maxSize, it is called again and
   * the reports add up (as the Rust host does). */
  async prune(maxSize = DEFAULT_MAX_SIZE) {
    const report = await this.driver.prune(maxSize);
    for (let i = 1; i < MAX_EVICTION_CALLS; i++) {
      if (report.sizeAfter <= maxSize || report.removed.length === 0 || report.failures.length > 0) break;
      const next = await this.driver.prune(maxSize);
      report.removed.push(...next.removed);
      report.bytesRemoved += next.bytesRemoved;
      report.sizeAfter = next.sizeAfter;
      report.failures.push(...next.failures);
      if (next.removed.length === 0) break;
    }
    return report;
  }
  /** Remove invalid files, and incomplete files older than stallTime s. */
  clean(stallTime = DEFAULT_STALL_TIME) {
    return this.driver.clean(stallTime);
  }

  /** Start writing an image: an ImageWriter (write, commit, abort, drop). */
  async openForWrite(id) {
    id = validateImageId(id);
    const s = await this.driver.openSession('write', id);
    return new ImageWriter(this.driver, id, s);
  }

  /** Start reading a cached image: an ImageReader, an async iterable of
   * chunks; reading to the end counts the hit. */
  async openForRead(id) {
    id = validateImageId(id);
    const s = await this.driver.openSession('read', id);
    return new ImageReader(this.driver, id, s);
  }

  /** Read a whole cached image (counting the hit). */
  async readImage(id) {
    const reader = await this.openForRead(id);
    return reader.readAll();
  }

  /** Cache `source` (Buffer, string, (async) iterable of chunks, Node
   * Readable) as image `id`, verifying `checksum` if given. Strict: an
   * image that cannot be cached is an error. Returns the bytes written. */
  async cache(id, source, { checksum } = {}) {
    id = validateImageId(id);
    const expected = parseChecksum(checksum);
    const writer = await this.openForWrite(id);
    const tee = new Tee(this, id, writer, expected, source, null);
    for await (const _ of tee);
    if (tee.report.cacheError) throw new CacheError('io', `I/O error: ${tee.report.cacheError}`);
    return tee.report.bytes;
  }

  /** Glance's caching iterator: the chunks of `source` pass through (an
   * async iterable) while they are cached as `id`. Not cacheable: they
   * just pass. The source fails: the write is aborted, the error thrown
   * (kind `source`). Checksum mismatch: aborted, `checksum-mismatch` thrown
   * after the last chunk. The cache itself fails: the chunks keep flowing,
   * the failure is in `tee.report.cacheError`. */
  async cacheStream(id, source, { checksum } = {}) {
    id = validateImageId(id);
    const expected = parseChecksum(checksum);
    let writer = null;
    let cacheError = null;
    try {
      writer = await this.openForWrite(id);
    } catch (e) {
      if (e.kind === 'invalid-image-id') throw e;
      if (e.kind !== 'already-cached' && e.kind !== 'being-cached') {
        cacheError = e.message;
        this.config.onWarning(`cannot cache image ${JSON.stringify(id)}, passing it through: ${e.message}`);
      }
    }
    return new Tee(this, id, writer, expected, source, cacheError);
  }
}

async function startDriver(root, config, source, grants) {
  const component = await loadDriver(source, { grants, memoryBytes: config.limits.memoryBytes, onWarning: config.onWarning });
  const options = [['image_cache_sqlite_db', config.sqliteDb], ...Object.entries(config.driverOptions)];
  try {
    return await Driver.start(component, { root, options, limits: config.limits, xattr: config.xattr, databases: config.databases });
  } catch (e) {
    if (e.kind === 'bad-configuration') {
      const why = e.message.replace(/^bad configuration: /, '');
      // Without the range_lock add-on SQLite inside a driver cannot lock
      // its database, and says no more than "disk I/O error".
      const hint = rangeLockAddon()
        ? ''
        : ' (the range_lock add-on of image-cache-wasm is not built, so a driver cannot lock its SQLite database: rebuild it with `npm rebuild image-cache-wasm`, which needs python3, make and a C compiler; see its README, "Native add-ons")';
      throw new CacheError('bad-configuration', `bad configuration: driver ${component.name} cannot use cache root ${root}: ${why}${hint}`);
    }
    throw e;
  }
}

/** A session the application dropped without ending it: when it is
 * garbage-collected, its descriptor is closed and the driver told (a write
 * then aborts as "incomplete fetch", as in Glance's `finally`). */
const forgotten = new FinalizationRegistry(({ driver, inst, sid, fd }) => {
  if (fd.value >= 0) fs.close(fd.value, () => {});
  if (!inst.dead) driver.sessionCall(inst, 'drop', { sid }).catch(() => {});
});

/** A session's descriptor and its end, shared by writer and reader. */
class Session {
  constructor(driver, id, { inst, sid, fd, size }) {
    this.driver = driver;
    this.id = id;
    this.inst = inst;
    this.sid = sid;
    this.fd = fd;
    this.size = size;
    this.ended = false;
    this.lost = false;
    this.busy = 0;
    // The registry must not hold the session itself: a shared box for fd.
    this.fdBox = { value: fd };
    forgotten.register(this, { driver, inst, sid, fd: this.fdBox }, this);
    this.ref = new WeakRef(this);
    inst.sessions.add(this.ref);
  }

  /** The instance was stopped (a fault elsewhere): the session is over.
   * A read or write still in flight on the descriptor closes it when it
   * returns (closing it under that operation could let it reach a file
   * that reused the number). */
  instanceLost() {
    this.lost = true;
    if (this.busy === 0) this.closeFd();
  }

  /** Run one I/O operation on the descriptor. */
  async io(op) {
    this.checkOpen();
    this.busy++;
    try {
      return await op(this.fd);
    } finally {
      this.busy--;
      if (this.lost && this.busy === 0) this.closeFd();
    }
  }

  closeFd() {
    if (this.fd >= 0) {
      const fd = this.fd;
      this.fd = -1;
      this.fdBox.value = -1;
      forgotten.unregister(this);
      this.inst.sessions.delete(this.ref);
      close(fd).catch(() => {});
    }
  }

  checkOpen() {
    if (this.lost) throw this.driver.fault(`the instance of the session of image ${JSON.stringify(this.id)} was stopped`);
    if (this.ended) throw new CacheError('io', `I/O error: the session of image ${JSON.stringify(this.id)} has already ended`);
  }

  async end(op, args = {}) {
    this.checkOpen();
    this.ended = true;
    try {
      await this.driver.sessionCall(this.inst, op, { sid: this.sid, ...args });
    } finally {
      this.closeFd();
    }
  }
}

export class ImageWriter extends Session {
  constructor(driver, id, s) {
    super(driver, id, s);
    this.written = 0;
  }

  get imageId() {
    return this.id;
  }

  async write(chunk) {
    const bytes = typeof chunk === 'string' ? Buffer.from(chunk) : chunk;
    await this.io((fd) => writeAll(fd, bytes));
    this.written += bytes.length;
  }

  /** Flush the bytes to stable storage and publish the image. */
  async commit(checksum) {
    this.checkOpen();
    try {
      await this.io((fd) => fdatasync(fd));
    } catch (e) {
      if (e instanceof CacheError) throw e;
      const message = `flushing image ${JSON.stringify(this.id)}: ${e.code}`;
      await this.abort(message).catch(() => {});
      throw new CacheError('io', `I/O error: ${message}`);
    }
    const c = checksum === undefined || checksum === null ? undefined : String(checksum);
    await this.end('commit', { checksum: c });
  }

  /** Give up: the file moves to invalid/ with reason. */
  abort(reason) {
    return this.end('abort', { reason: String(reason) });
  }

  /** End without commit or abort: the driver aborts it as "incomplete
   * fetch" (Glance's finally clause). */
  drop() {
    if (this.ended || this.lost) return Promise.resolve();
    return this.end('drop');
  }
}

export class ImageReader extends Session {
  get imageId() {
    return this.id;
  }

  /** Read up to buf.length bytes; 0 at the end (which counts the hit). */
  async read(buf) {
    const { bytesRead } = await this.io((fd) => read(fd, buf, 0, buf.length, null));
    if (bytesRead === 0 && buf.length > 0) await this.finish();
    return bytesRead;
  }

  /** The checksum recorded when the image was committed (what the writer
   * passed to commit, e.g. `md5:HEX`), or null if there is none or the
   * read has ended. One driver call; the read goes on (reading to the end
   * still counts the hit). Any failure ends the read uncounted; a checksum
   * that could not go into an HTTP header (empty, over 128 bytes, other
   * than ASCII letters, digits and `+/=_:-`) is a `driver-fault`. */
  async checksum() {
    if (this.ended) return null;
    this.checkOpen();
    try {
      return await this.driver.sessionChecksum(this.inst, this.sid, this.id);
    } catch (e) {
      this.ended = true;
      this.closeFd();
      throw e;
    }
  }

  /** End the read and count the hit. */
  finish() {
    if (this.ended) return Promise.resolve();
    return this.end('finish');
  }

  /** End the read without counting it. */
  close() {
    if (this.ended || this.lost) return Promise.resolve();
    return this.end('drop');
  }

  async *[Symbol.asyncIterator]() {
    let size = Math.min(CHUNK, Math.max(1, this.size + 1));
    try {
      for (;;) {
        const buf = Buffer.allocUnsafe(size);
        const n = await this.read(buf);
        if (n === 0) return;
        yield n === buf.length ? buf : buf.subarray(0, n);
        size = CHUNK;
      }
    } finally {
      await this.close();
    }
  }

  async readAll() {
    const parts = [];
    for await (const chunk of this) parts.push(chunk);
    return Buffer.concat(parts);
  }
}

/** The caching tee (see ImageCache.cacheStream). */
export class Tee {
  constructor(cache, id, writer, expected, source, cacheError) {
    this.cache = cache;
    this.id = id;
    this.writer = writer;
    this.expected = expected;
    this.source = source;
    this.report = { bytes: 0, cached: false, cacheError };
  }

  async abort(reason) {
    const w = this.writer;
    this.writer = null;
    if (w) await w.abort(reason).catch((e) => this.cache.config.onWarning(`aborting the write of image ${JSON.stringify(this.id)}: ${e.message}`));
  }

  async *[Symbol.asyncIterator]() {
    const hash = this.expected ? crypto.createHash(this.expected.algorithm) : null;
    let finished = false;
    try {
      const it = chunksOf(this.source)[Symbol.asyncIterator]();
      for (;;) {
        let step;
        try {
          step = await it.next();
        } catch (e) {
          await this.abort(`the image source failed: ${e?.message ?? e}`);
          throw new CacheError('source', `reading the image source failed: ${e?.message ?? e}`, { cause: e });
        }
        if (step.done) break;
        const chunk = step.value;
        hash?.update(chunk);
        if (this.writer) {
          try {
            await this.writer.write(chunk);
          } catch (e) {
            const message = `writing image ${JSON.stringify(this.id)} into the cache failed: ${e.message}`;
            this.cache.config.onWarning(`${message}; passing the rest through`);
            await this.abort(message);
            this.report.cacheError = message;
          }
        }
        this.report.bytes += chunk.length;
        yield chunk;
      }
      if (this.expected) {
        const actual = hash.digest('hex');
        if (actual !== this.expected.hex) {
          await this.abort('checksum mismatch');
          throw new CacheError(
            'checksum-mismatch',
            `checksum mismatch for image ${JSON.stringify(this.id)}: expected ${this.expected}, got ${this.expected.algorithm}:${actual}`,
          );
        }
      }
      if (this.writer) {
        const w = this.writer;
        this.writer = null;
        try {
          await w.commit(this.expected ? String(this.expected) : undefined);
          this.report.cached = true;
        } catch (e) {
          this.cache.config.onWarning(`committing image ${JSON.stringify(this.id)} to the cache failed: ${e.message}`);
          this.report.cacheError = e.message;
        }
      }
      finished = true;
    } finally {
      // The consumer stopped early, or something threw: not a complete image.
      if (!finished) await this.abort('the destination stopped reading');
    }
  }
}

// `await using`: a cache is closed, a read ends uncounted (close), a write
// that was neither committed nor aborted is dropped (aborted as an
// incomplete fetch). Where the runtime has Symbol.asyncDispose (Node 20.4
// and later); without it there is nothing to define.
if (typeof Symbol.asyncDispose === 'symbol') {
  const dispose = (cls, method) =>
    Object.defineProperty(cls.prototype, Symbol.asyncDispose, {
      value: function () {
        return this[method]();
      },
      writable: true,
      configurable: true,
    });
  dispose(ImageCache, 'close');
  dispose(ImageReader, 'close');
  dispose(ImageWriter, 'drop');
}

export { validateImageId };
