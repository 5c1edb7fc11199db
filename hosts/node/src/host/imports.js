// The import object for one driver instance: clock, fs, xattr
// (image-cache:driver@0.3.0), in jco's shapes: u64 as BigInt, option as
// undefined, enums as strings, results as returned values or thrown errors
// with a `payload`.

import fs from 'node:fs';
import { fsError, ioError, metadataOf, checkTime, seconds, MAX_BATCH } from './rootfs.js';
import { Locks } from './locks.js';

/** Most bytes one `read-at` or `write-at` moves. */
export const MAX_IO = 1 << 20;
/** Largest file a driver may make of its own (`write-at`, `set-len`). */
export const MAX_DRIVER_FILE = 16n << 30n;
/** Longest single pause `clock.sleep` grants (ms). */
export const MAX_SLEEP_MS = 100;
const MAX_OFFSET = (1n << 63n) - 1n;
const RANGE_KINDS = { unlocked: 0, shared: 1, exclusive: 2 };

/** The end of `length` bytes from `offset`, if it fits a file offset
 * (off_t), else `invalid-argument`. */
function span(path, offset, length) {
  const end = BigInt(offset) + BigInt(length);
  if (BigInt(offset) < 0n || BigInt(length) < 0n || end > MAX_OFFSET) {
    throw fsError('invalid-argument', `${path}: ${length} bytes at offset ${offset} are past any file offset`);
  }
  return end;
}

/** Attribute names the host keeps for itself: a driver can neither read,
 * write, remove nor list them. */
export const HOST_PREFIX = 'user.image-cache.';
/** The host's seal on an image file: the id it was committed as, written
 * by the host on the file it filled, before the driver publishes it. */
export const SEAL = 'user.image-cache.id';
/** The attribute the xattr probe sets (outside the host's prefix). */
export const PROBE = 'user.image-cache-probe';

/** The error codes (fs-xattr's `code`) of a file system that stores no
 * user attributes. */
const NO_XATTRS = new Set(['ENOTSUP', 'EOPNOTSUPP']);

/** Seal the open file `fd` as image `id` (the host, at commit), through
 * /proc/self/fd/<fd> (the descriptor's own file, never a name). Without
 * the add-on, or on a file system that stores no user attributes (or
 * refuses them: EPERM), nothing is sealed; that is not an error. Any other
 * failure throws the add-on's error. */
export function sealFile(lib, fd, id) {
  if (!lib) return;
  try {
    lib.setAttributeSync(`/proc/self/fd/${fd}`, SEAL, Buffer.from(id, 'utf8'));
  } catch (e) {
    if (!NO_XATTRS.has(e?.code) && e?.code !== 'EPERM') throw e;
  }
}

/** The seal of the open file `fd`: the id it was committed as (a Buffer),
 * or null when it has none (a file of release 0.2 or of Glance, a file
 * system without user attributes, or no add-on). */
export function readSeal(lib, fd) {
  if (!lib) return null;
  try {
    return lib.getAttributeSync(`/proc/self/fd/${fd}`, SEAL);
  } catch (e) {
    if (e?.code === 'ENODATA' || e?.code === 'ENOATTR' || NO_XATTRS.has(e?.code)) return null;
    throw e;
  }
}

/** The wall clock in seconds, to the microsecond: Date.now() has only
 * milliseconds, and drivers order queue markers made in quick succession
 * by the times they set. performance.timeOrigin is the wall clock at the
 * thread's start with a fraction; never behind Date.now(), never back. */
let lastClock = 0;
export function wallClock() {
  const t = Math.max(Date.now(), performance.timeOrigin + performance.now()) / 1000;
  lastClock = Math.max(lastClock, t);
  return lastClock;
}

/** A deadline as an absolute Date.now() time. */
export class Deadline {
  constructor(at = Infinity) {
    this.at = at;
  }
  passed() {
    return Date.now() >= this.at;
  }
  remaining() {
    return this.at - Date.now();
  }
}

/** Something to sleep on (Atomics.wait is a synchronous sleep). */
const SLEEP = new Int32Array(new SharedArrayBuffer(4));

/**
 * ctx: {root: RootFs, fdTable: Int32Array, locks: Locks, wid, limits,
 *       deadline: Deadline, xattrLib, flock, sqliteDb: the metadata
 *       database's name, native: the range-lock add-on (host/native.js)}
 *
 * Returns {File, imports, releaseRangeLocks}: the host calls
 * releaseRangeLocks() at the end of every call into the instance.
 */
export function makeImports(ctx) {
  const { root, fdTable, locks } = ctx;
  const native = ctx.native ?? null;
  const db = ctx.sqliteDb ?? 'cache.db';
  /** The instance's open files (range locks are released on them). */
  const openFiles = new Set();
  // flock(fd, op) through the main thread ('done' | 'busy' | 'timed-out' |
  // 'failed'), or null: then locks are a table shared by the workers of
  // this process only (host/locks.js).
  const flock = ctx.flock ?? null;

  function takeSlot(rel) {
    for (let i = 0; i < fdTable.length; i++) {
      if (Atomics.load(fdTable, i) === -1) return i;
    }
    // As the Rust and Python hosts' capped resource tables: a trap (the
    // instance is discarded), not an error the driver could retry.
    throw new Error(`resource table has no free keys (an instance may hold at most ${fdTable.length} open files; ${rel} was not opened)`);
  }

  class File {
    /** Not called by jco: files are made by `adopt`. */
    constructor() {
      throw new TypeError('files are opened through the fs interface');
    }

    /** writable: made by create-new (the host writes it); readWrite: made
     * by open-read-write (the driver may write it). */
    static adopt(fd, rel, size, { writable = false, readWrite = false }, slot) {
      const f = Object.create(File.prototype);
      f.fd = fd;
      f.path = rel;
      f.sizeAtOpen = size;
      f.writable = writable;
      f.readWrite = readWrite;
      f.slot = slot;
      f.token = locks.newToken();
      f.lockKey = null;
      f.rangeLocked = false; // took a byte-range lock in this call
      f.moved = false; // handed to the main thread, which closes it
      if (slot >= 0) Atomics.store(fdTable, slot, fd);
      openFiles.add(f);
      return f;
    }

    checkOpen() {
      if (this.fd < 0) throw fsError('io', `${this.path}: the file is closed`);
    }

    metadata() {
      this.checkOpen();
      try {
        return metadataOf(fs.fstatSync(this.fd, { bigint: true }));
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    sync() {
      this.checkOpen();
      try {
        fs.fsyncSync(this.fd);
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    setTimes(accessed, modified) {
      this.checkOpen();
      const a = accessed === undefined ? undefined : checkTime(accessed);
      const m = modified === undefined ? undefined : checkTime(modified);
      try {
        if (a === undefined || m === undefined) {
          const st = fs.fstatSync(this.fd, { bigint: true });
          fs.futimesSync(this.fd, a ?? seconds(st.atimeNs), m ?? seconds(st.mtimeNs));
        } else {
          fs.futimesSync(this.fd, a, m);
        }
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    size() {
      this.checkOpen();
      try {
        return fs.fstatSync(this.fd, { bigint: true }).size;
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    /** Up to `length` bytes (at most MAX_IO) from `offset`: fewer at the
     * end of the file, none past it. */
    readAt(offset, length) {
      this.checkOpen();
      if (length > MAX_IO) throw fsError('limit-exceeded', `${this.path}: more than ${MAX_IO} bytes in one read`);
      span(this.path, offset, length);
      const buf = new Uint8Array(length);
      let done = 0;
      try {
        while (done < length) {
          const n = fs.readSync(this.fd, buf, done, length - done, BigInt(offset) + BigInt(done));
          if (n === 0) break;
          done += n;
        }
      } catch (e) {
        throw ioError(this.path, e);
      }
      return done === length ? buf : buf.subarray(0, done);
    }

    /** The driver writes only its own files (open-read-write): an image's
     * bytes are the host's. */
    refuseDriverWrite() {
      if (!this.readWrite) {
        throw fsError('access-denied', `${this.path}: not opened with open-read-write (only the host writes an image's bytes)`);
      }
    }

    /** Write all of `data` (at most MAX_IO bytes) at `offset`, never past
     * MAX_DRIVER_FILE. */
    writeAt(offset, data) {
      this.checkOpen();
      this.refuseDriverWrite();
      if (data.length > MAX_IO) throw fsError('limit-exceeded', `${this.path}: more than ${MAX_IO} bytes in one write`);
      withinDriverCap(this.path, span(this.path, offset, data.length));
      let done = 0;
      try {
        while (done < data.length) {
          done += fs.writeSync(this.fd, data, done, data.length - done, Number(offset) + done);
        }
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    setLen(size) {
      this.checkOpen();
      this.refuseDriverWrite();
      withinDriverCap(this.path, BigInt(size));
      try {
        fs.ftruncateSync(this.fd, Number(size));
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    syncData() {
      this.checkOpen();
      try {
        fs.fdatasyncSync(this.fd);
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    /** A non-blocking open-file-description lock (F_OFD_SETLK) on `length`
     * bytes from `start` (0: to the end of the file and beyond): false if
     * another open file holds a conflicting one. Released at the end of
     * the driver call (releaseRangeLocks), or when the file is closed. */
    setRangeLock(start, length, lock) {
      this.checkOpen();
      span(this.path, start, length);
      const kind = RANGE_KINDS[lock];
      if (kind === undefined) throw fsError('invalid-argument', `${this.path}: ${String(lock)} is not a range lock`);
      const addon = rangeAddon(this.path);
      if (kind !== 0) this.rangeLocked = true;
      try {
        return addon.setLock(this.fd, BigInt(start), BigInt(length), kind);
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    /** Whether another open file holds a lock on the range that conflicts
     * with an exclusive one (F_OFD_GETLK). */
    rangeLockedElsewhere(start, length) {
      this.checkOpen();
      span(this.path, start, length);
      const addon = rangeAddon(this.path);
      try {
        return addon.lockedElsewhere(this.fd, BigInt(start), BigInt(length));
      } catch (e) {
        throw ioError(this.path, e);
      }
    }

    key() {
      if (this.lockKey === null) {
        const st = fs.fstatSync(this.fd, { bigint: true });
        this.lockKey = Locks.key(st.dev, st.ino);
      }
      return this.lockKey;
    }

    tryLock() {
      this.checkOpen();
      if (flock) {
        // flock(2) on the descriptor, as the Rust host: per open file, seen
        // by other processes, gone when the descriptor is closed.
        const r = flock(this.fd, 'exnb');
        if (r === 'done') return true;
        if (r === 'busy') return false;
        if (r === 'timed-out') throw fsError('timed-out', `${this.path}: the lock was not answered before the call's deadline`);
        throw fsError('io', `${this.path}: flock failed`);
      }
      const r = locks.tryLock(this.key(), this.token, ctx.wid);
      if (r === 'full') throw fsError('limit-exceeded', `${this.path}: the host's lock table is full`);
      return r !== 'busy';
    }

    /** Wait for the lock, never past the call's deadline (a blocking
     * flock could not be interrupted). */
    lock() {
      this.checkOpen();
      let pause = 0.2;
      for (;;) {
        if (this.tryLock()) return;
        const left = ctx.deadline.remaining();
        if (left <= 0) {
          throw fsError('timed-out', `${this.path}: another holder kept the lock until the call's deadline`);
        }
        if (flock) Atomics.wait(SLEEP, 0, 0, Math.min(left, pause));
        else locks.waitForRelease(Math.min(left, 10));
        pause = Math.min(pause * 2, 10);
      }
    }

    unlock() {
      this.checkOpen();
      if (flock) {
        const r = flock(this.fd, 'un');
        if (r !== 'done') throw fsError(r === 'timed-out' ? 'timed-out' : 'io', `${this.path}: unlock failed`);
      } else if (this.lockKey !== null) {
        locks.unlock(this.lockKey, this.token);
      }
    }

    /** Release the lock and, unless the main thread owns the descriptor
     * now, close it. */
    close() {
      if (this.fd < 0) return;
      openFiles.delete(this);
      if (this.lockKey !== null) locks.unlock(this.lockKey, this.token);
      if (!this.moved) {
        if (this.slot >= 0) Atomics.store(fdTable, this.slot, -1);
        try {
          fs.closeSync(this.fd);
        } catch {}
      }
      this.fd = -1;
    }

    /** The main thread takes the descriptor (image bytes move there). */
    handOver() {
      this.moved = true;
      if (this.slot >= 0) Atomics.store(fdTable, this.slot, -1);
      this.slot = -1;
    }

    [Symbol.dispose]() {
      if (!this.moved) this.close();
    }
  }

  /** The range-lock add-on, or `unsupported`. */
  function rangeAddon(where) {
    if (!native) {
      throw fsError(
        'unsupported',
        `${where}: byte-range locks are not available in this Node host (its range_lock add-on is not built, or the system has no open-file-description locks)`,
      );
    }
    return native;
  }

  function withinDriverCap(where, end) {
    if (end > MAX_DRIVER_FILE) {
      throw fsError('limit-exceeded', `${where}: a driver's own file may not grow past ${MAX_DRIVER_FILE} bytes`);
    }
  }

  /** The end of a driver call: every byte-range lock any open file of the
   * instance took is released (flock-style locks stay: a write session
   * holds one across calls). */
  function releaseRangeLocks() {
    for (const f of openFiles) {
      if (!f.rangeLocked) continue;
      f.rangeLocked = false;
      if (f.fd < 0) continue;
      try {
        native.setLock(f.fd, 0n, 0n, 0);
      } catch {}
    }
  }

  const fsImports = {
    File,
    createNew(p) {
      const slot = takeSlot(p);
      return File.adopt(root.createNew(p), p, 0, { writable: true }, slot);
    },
    open(p) {
      const slot = takeSlot(p);
      const [fd, size] = root.open(p);
      return File.adopt(fd, p, size, {}, slot);
    },
    openReadWrite(p, create) {
      const slot = takeSlot(p);
      const [fd, size] = root.openReadWrite(p, Boolean(create), db);
      return File.adopt(fd, p, size, { readWrite: true }, slot);
    },
    stat: (p) => root.stat(p),
    createDir: (p) => root.createDir(p),
    listDir: (p) => root.listDir(p, ctx.deadline),
    listNames: (p) => root.listNames(p, ctx.deadline),
    rename: (s, d) => root.rename(s, d),
    removeFile: (p) => root.removeFile(p),
    removeFiles(paths) {
      if (paths.length > MAX_BATCH) {
        const e = { code: 'limit-exceeded', message: `more than ${MAX_BATCH} paths in one call` };
        return paths.map(() => ({ tag: 'err', val: e }));
      }
      let stopped = false;
      return paths.map((p, i) => {
        stopped = stopped || (i % 256 === 255 && ctx.deadline.passed());
        if (stopped) {
          return { tag: 'err', val: { code: 'timed-out', message: `${p}: stopped at the call's deadline` } };
        }
        try {
          root.removeFile(p);
          return { tag: 'ok', val: undefined };
        } catch (e) {
          return { tag: 'err', val: ioError(p, e).payload };
        }
      });
    },
    setTimes: (p, a, m) => root.setTimes(p, a, m),
  };

  // Extended attributes. Node 20 has no xattr calls; the fs-xattr add-on
  // has path-based ones that follow symlinks (getxattr, not lgetxattr).
  // Given /proc/self/fd/<fd>, the kernel resolves that link to the very
  // file the descriptor is open on, never by name: the attributes are
  // those of the guest's open file, as in the Rust host. Without the
  // add-on or /proc (or with `xattr: false`), every call is `unsupported`.
  // Names under `user.image-cache.` are the host's own (its seal, SEAL):
  // refused to get, set and remove, and never listed.
  const MAX_XATTR_VALUE = 64 * 1024;
  const lib = ctx.xattrLib ?? null;
  let probes = 0;
  const unsupported = (where) =>
    fsError('unsupported', `${where ?? 'the cache root'}: user extended attributes are not supported here`);
  const checkXattrName = (name) => {
    if (typeof name !== 'string' || !/^user\../.test(name) || Buffer.byteLength(name) > 255 || name.includes('\0')) {
      throw fsError('access-denied', `extended attribute ${JSON.stringify(String(name))}: only user.* names are allowed`);
    }
    if (name.startsWith(HOST_PREFIX)) {
      throw fsError('access-denied', `extended attribute ${JSON.stringify(name)}: ${HOST_PREFIX}* is the host's own`);
    }
  };
  const onFile = (f) => {
    if (!(f instanceof File)) throw fsError('io', 'not a file of this instance');
    f.checkOpen();
    if (!lib) throw unsupported(f.path);
    return `/proc/self/fd/${f.fd}`;
  };
  const xattrError = (f, name, e) => {
    if (e?.code === 'ENODATA') return fsError('not-found', `${f.path}: no attribute ${name}`);
    if (e?.code === 'ENOTSUP' || e?.code === 'EOPNOTSUPP') return unsupported(f.path);
    if (e?.code === 'ERANGE' || e?.code === 'E2BIG') {
      return fsError('limit-exceeded', `${f.path}: attribute ${name} is larger than ${MAX_XATTR_VALUE} bytes`);
    }
    const code = { ENOENT: 'not-found', EACCES: 'access-denied', EPERM: 'access-denied', ENOSPC: 'no-space', EDQUOT: 'no-space' }[e?.code] ?? 'io';
    return fsError(code, `${f.path}: ${e?.code ?? 'extended attribute call failed'}`);
  };
  const xattrImports = {
    get(f, name) {
      checkXattrName(name);
      const at = onFile(f);
      let value;
      try {
        value = lib.getAttributeSync(at, name);
      } catch (e) {
        throw xattrError(f, name, e);
      }
      if (value.length > MAX_XATTR_VALUE) {
        throw fsError('limit-exceeded', `${f.path}: attribute ${name} is larger than ${MAX_XATTR_VALUE} bytes`);
      }
      return new Uint8Array(value);
    },
    set(f, name, value) {
      checkXattrName(name);
      const at = onFile(f);
      if (value.length > MAX_XATTR_VALUE) {
        throw fsError('limit-exceeded', `${f.path}: attribute values are limited to ${MAX_XATTR_VALUE} bytes`);
      }
      try {
        lib.setAttributeSync(at, name, Buffer.from(value.buffer, value.byteOffset, value.byteLength));
      } catch (e) {
        throw xattrError(f, name, e);
      }
    },
    remove(f, name) {
      checkXattrName(name);
      const at = onFile(f);
      try {
        lib.removeAttributeSync(at, name);
      } catch (e) {
        if (e?.code !== 'ENODATA') throw xattrError(f, name, e);
      }
    },
    listNames(f) {
      const at = onFile(f);
      try {
        return lib.listAttributesSync(at).filter((n) => n.startsWith('user.') && !n.startsWith(HOST_PREFIX));
      } catch (e) {
        throw xattrError(f, '(list)', e);
      }
    },
    probe() {
      if (!lib) throw unsupported();
      // A scratch file in incomplete/ (if the driver made it), so no
      // listing of the root takes it for an image while it exists.
      const scratch = `.image-cache-xattr-probe-${process.pid}-${ctx.wid}-${probes++}`;
      let rel = `incomplete/${scratch}`;
      let f;
      try {
        f = fsImports.createNew(rel);
      } catch (e) {
        if (e.payload?.code !== 'not-found') throw e;
        rel = scratch;
        f = fsImports.createNew(rel);
      }
      try {
        xattrImports.set(f, PROBE, new Uint8Array([0x31]));
        const v = xattrImports.get(f, PROBE);
        if (v.length !== 1 || v[0] !== 0x31) throw unsupported();
      } catch (e) {
        // The guest learns that the root lacks support, never where it is.
        const code = e.payload?.code;
        throw code === 'unsupported' || code === 'not-found' ? unsupported() : e;
      } finally {
        f.close();
        try {
          root.removeFile(rel);
        } catch {}
      }
    },
  };
  const clockImports = {
    now: wallClock,
    /** Pause min(microseconds, 100 ms, what is left of the call's
     * deadline); false once the deadline has passed. */
    sleep(microseconds) {
      const left = ctx.deadline.remaining();
      if (left <= 0) return false;
      const ms = Math.min(Number(microseconds) / 1000, MAX_SLEEP_MS, left);
      if (ms > 0) Atomics.wait(SLEEP, 0, 0, ms);
      return !ctx.deadline.passed();
    },
  };
  return {
    File,
    releaseRangeLocks,
    imports: {
      clock: clockImports,
      types: {},
      fs: fsImports,
      xattr: xattrImports,
    },
  };
}
