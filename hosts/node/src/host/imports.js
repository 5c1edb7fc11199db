// The import object for one driver instance: clock, fs, xattr, sqlite
// (image-cache:driver@0.2.0), in jco's shapes: u64 as BigInt, option as
// undefined, results as returned values or thrown errors with a `payload`.

import fs from 'node:fs';
import { fsError, ioError, metadataOf, checkTime, seconds, MAX_BATCH } from './rootfs.js';
import { Locks } from './locks.js';
import { makeSqlite } from './sqlite.js';

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

/**
 * ctx: {root: RootFs, fdTable: Int32Array, locks: Locks, wid, limits,
 *       deadline: Deadline, xattr: 'unsupported', connections, databases}
 */
/** Something to sleep on between two tries of a lock. */
const SLEEP = new Int32Array(new SharedArrayBuffer(4));

export function makeImports(ctx) {
  const { root, fdTable, locks } = ctx;
  // flock(fd, op) through the main thread ('done' | 'busy' | 'timed-out' |
  // 'failed'), or null: then locks are a table shared by the workers of
  // this process only (host/locks.js).
  const flock = ctx.flock ?? null;

  function takeSlot(rel) {
    for (let i = 0; i < fdTable.length; i++) {
      if (Atomics.load(fdTable, i) === -1) return i;
    }
    throw fsError('limit-exceeded', `${rel}: an instance may hold at most ${fdTable.length} open files`);
  }

  class File {
    /** Not called by jco: files are made by `adopt`. */
    constructor() {
      throw new TypeError('files are opened through the fs interface');
    }

    static adopt(fd, rel, size, writable, slot) {
      const f = Object.create(File.prototype);
      f.fd = fd;
      f.path = rel;
      f.sizeAtOpen = size;
      f.writable = writable;
      f.slot = slot;
      f.token = locks.newToken();
      f.lockKey = null;
      f.moved = false; // handed to the main thread, which closes it
      if (slot >= 0) Atomics.store(fdTable, slot, fd);
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

  const fsImports = {
    File,
    createNew(p) {
      const slot = takeSlot(p);
      return File.adopt(root.createNew(p), p, 0, true, slot);
    },
    open(p) {
      const slot = takeSlot(p);
      const [fd, size] = root.open(p);
      return File.adopt(fd, p, size, false, slot);
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
  const MAX_XATTR_VALUE = 64 * 1024;
  const lib = ctx.xattrLib ?? null;
  let probes = 0;
  const unsupported = (where) =>
    fsError('unsupported', `${where ?? 'the cache root'}: user extended attributes are not supported here`);
  const checkXattrName = (name) => {
    if (typeof name !== 'string' || !/^user\../.test(name) || Buffer.byteLength(name) > 255 || name.includes('\0')) {
      throw fsError('access-denied', `extended attribute ${JSON.stringify(String(name))}: only user.* names are allowed`);
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
        return lib.listAttributesSync(at).filter((n) => n.startsWith('user.'));
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
        xattrImports.set(f, 'user.image-cache.probe', new Uint8Array([0x31]));
        const v = xattrImports.get(f, 'user.image-cache.probe');
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
  return {
    File,
    imports: {
      clock: { now: wallClock },
      types: {},
      fs: fsImports,
      xattr: xattrImports,
      sqlite: { Connection: makeSqlite(ctx) },
    },
  };
}
