// The import object for one driver instance: clock, fs, xattr, sqlite
// (image-cache:driver@0.2.0), in jco's shapes: u64 as BigInt, option as
// undefined, results as returned values or thrown errors with a `payload`.

import fs from 'node:fs';
import { fsError, ioError, metadataOf, checkTime, seconds, MAX_BATCH } from './rootfs.js';
import { Locks } from './locks.js';
import { makeSqlite } from './sqlite.js';

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
export function makeImports(ctx) {
  const { root, fdTable, locks } = ctx;

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
      const r = locks.tryLock(this.key(), this.token, ctx.wid);
      if (r === 'full') throw fsError('limit-exceeded', `${this.path}: the host's lock table is full`);
      return r !== 'busy';
    }

    lock() {
      this.checkOpen();
      for (;;) {
        if (this.tryLock()) return;
        const left = ctx.deadline.remaining();
        if (left <= 0) {
          throw fsError('timed-out', `${this.path}: another holder kept the lock until the call's deadline`);
        }
        locks.waitForRelease(Math.min(left, 10));
      }
    }

    unlock() {
      this.checkOpen();
      if (this.lockKey !== null) locks.unlock(this.lockKey, this.token);
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

  // Node 20 has no xattr calls, and the one maintained add-on
  // (@napi-rs/xattr) works on paths, not open files: every call reports
  // `unsupported`, as a file system without user xattrs would, and the
  // xattr driver's configure fails so the cache falls back to sqlite.
  const unsupported = (f) => {
    throw fsError('unsupported', `${f?.path ?? 'the cache root'}: user extended attributes are not supported by the Node host`);
  };
  const checkXattrName = (name) => {
    if (typeof name !== 'string' || !/^user\../.test(name) || Buffer.byteLength(name) > 255 || name.includes('\0')) {
      throw fsError('access-denied', `extended attribute ${JSON.stringify(String(name))}: only user.* names are allowed`);
    }
  };
  const xattrImports = {
    get(f, name) {
      checkXattrName(name);
      unsupported(f);
    },
    set(f, name) {
      checkXattrName(name);
      unsupported(f);
    },
    remove(f, name) {
      checkXattrName(name);
      unsupported(f);
    },
    listNames: (f) => unsupported(f),
    probe: () => unsupported(),
  };

  return {
    File,
    imports: {
      clock: { now: () => Date.now() / 1000 },
      types: {},
      fs: fsImports,
      xattr: xattrImports,
      sqlite: { Connection: makeSqlite(ctx) },
    },
  };
}
