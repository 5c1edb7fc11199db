// `image-cache:driver/fs` on node:fs: files of one cache root, and nothing else.
//
// Node has no openat(2), so a guest path cannot be resolved against a
// directory descriptor as cap-std does in the Rust host. What this module
// does instead, as safely as node:fs allows:
//
// - every path is checked before any system call: relative, no `..`, no NUL
//   or backslash (the same rules and error codes as host/src/fs.rs);
// - each directory component under the root is lstat'ed and must be a real
//   directory (a symlink is refused, wherever it points);
// - the final component is opened with O_NOFOLLOW (a final symlink is never
//   followed) and O_NONBLOCK (a FIFO cannot block the call), then fstat'ed:
//   only a regular file with one link is kept (a FIFO, socket or device, or
//   a hard link that may lead out of the root, is refused); path-based
//   operations use the l* variants (lstat, lutimes);
// - after an open, /proc/self/fd/<fd> must name a file under the root's real
//   path, which catches a directory swapped for a symlink between the check
//   and the open.
//
// What remains (and what the Rust host does not have): rename, unlink,
// mkdir and lutimes resolve their path again after the check, so a process
// that can write the root *and* races the host could swap a directory for
// a symlink in that window. The guest itself cannot create symlinks and
// runs one call at a time; README.md lists this under "what Node cannot
// guarantee".
//
// Messages name root-relative paths only, never the root's location.

import fs from 'node:fs';
import util from 'node:util';
import path from 'node:path';

const C = fs.constants;
const SYSTEM_ERRORS = util.getSystemErrorMap();

/** Most entries one listing returns. */
export const DEFAULT_MAX_LISTING = 4_000_000;
/** Most paths one `remove-files` takes. */
export const MAX_BATCH = 1_000_000;
/** Latest time a guest may set (as in the Rust host). */
export const MAX_TIME = 1e12;
/** Directories whose files are images or fills: never a driver's to write. */
export const IMAGE_DIRS = ['incomplete', 'invalid', 'queue'];

/** An `fs-error` as jco wants it thrown from an import: a `payload`. Not
 * an Error: a refusal is an expected value (e.g. `stat` of a missing file
 * on every is-cached miss), and capturing a stack trace for each one cost
 * more than the system call. */
export class FsError {
  constructor(code, message) {
    this.payload = { code, message };
    this.message = message;
  }

  toString() {
    return `FsError(${this.payload.code}): ${this.message}`;
  }
}

export function fsError(code, message) {
  return new FsError(code, message);
}

const CODES = {
  ENOENT: 'not-found',
  EEXIST: 'already-exists',
  ENOTEMPTY: 'already-exists',
  EACCES: 'access-denied',
  EPERM: 'access-denied',
  ELOOP: 'access-denied', // a final symlink opened with O_NOFOLLOW
  EXDEV: 'access-denied',
  ENOSPC: 'no-space',
  EDQUOT: 'no-space',
  ENOTDIR: 'not-a-directory',
  EISDIR: 'is-a-directory',
  ENOTSUP: 'unsupported',
  EOPNOTSUPP: 'unsupported',
  ENODATA: 'unsupported',
  EINVAL: 'invalid-argument',
};

/** A Node system error in the guest's terms. Node's own message carries the
 * absolute path, so it is never used: the text comes from the errno. */
export function ioError(rel, e) {
  const where = rel === '' ? '.' : rel;
  if (e instanceof FsError) return e;
  if (typeof e?.errno === 'number') {
    const code = CODES[e.code] ?? 'io';
    const text = SYSTEM_ERRORS.get(e.errno)?.[1] ?? e.code;
    return fsError(code, `${where}: ${text} (${e.code})`);
  }
  return fsError('io', `${where}: ${String(e?.code ?? 'unexpected failure')}`);
}

/** Check a guest path: relative, no `..`, no NUL or backslash. Returns its
 * components ([] for the root itself). */
export function checkPath(p) {
  if (typeof p !== 'string' || p.includes('\0') || p.includes('\\')) {
    throw fsError('invalid-path', `${JSON.stringify(String(p))}: NUL or backslash in a path`);
  }
  if (p.startsWith('/')) {
    throw fsError('access-denied', `${JSON.stringify(p)}: absolute paths are not allowed`);
  }
  const parts = [];
  for (const c of p.split('/')) {
    if (c === '' || c === '.') continue;
    if (c === '..') {
      throw fsError('access-denied', `${JSON.stringify(p)}: \`..\` is not allowed`);
    }
    parts.push(c);
  }
  return parts;
}

/** Like checkPath, for operations that need a name, not the root. */
export function checkName(p) {
  const parts = checkPath(p);
  if (parts.length === 0) {
    throw fsError('invalid-path', `${JSON.stringify(p)} names the root, not a file`);
  }
  return parts;
}

const STAGING_DIRS = ['incomplete', 'queue'];

/** As the Rust host's `RootFs::rename` decides, on checked components. */
export function renameAllowed(sp, dp) {
  const fromIncomplete = (name) => sp.length === 2 && sp[0] === 'incomplete' && sp[1] === name;
  if (dp.length === 1) return fromIncomplete(dp[0]);
  if (sp.length === 1) return false;
  if (STAGING_DIRS.includes(dp[0])) return false;
  if (STAGING_DIRS.includes(sp[0])) {
    return dp.length === 2 && dp[0] === 'invalid' && fromIncomplete(dp[1]);
  }
  return true;
}

/** Seconds since the epoch, from a BigInt nanosecond count; before 1970 is 0. */
function seconds(ns) {
  if (ns <= 0n) return 0;
  return Number(ns / 1_000_000_000n) + Number(ns % 1_000_000_000n) / 1e9;
}

export function kindOf(st) {
  if (st.isSymbolicLink()) return 'symlink';
  if (st.isFile()) return 'regular-file';
  if (st.isDirectory()) return 'directory';
  return 'other';
}

export function metadataOf(st) {
  return {
    kind: kindOf(st),
    size: BigInt(st.size),
    accessed: seconds(st.atimeNs),
    modified: seconds(st.mtimeNs),
  };
}

/** A guest time, checked before it reaches a system call. */
export function checkTime(t) {
  if (typeof t !== 'number' || !Number.isFinite(t) || t < 0 || t > MAX_TIME) {
    throw fsError(
      'invalid-argument',
      `${t} is not a usable time (seconds since 1970, at most ${MAX_TIME})`,
    );
  }
  return t;
}

export class RootFs {
  /** `root` must exist; it is resolved once to its real path. */
  constructor(root, { maxListing = DEFAULT_MAX_LISTING, native = null } = {}) {
    this.real = fs.realpathSync(root);
    this.maxListing = maxListing;
    /** The range-lock add-on (host/native.js), or null. */
    this.native = native;
  }

  /** The absolute path of checked components, every directory component
   * lstat'ed and required to be a real directory. */
  resolve(rel, parts) {
    let dir = this.real;
    for (let i = 0; i < parts.length - 1; i++) {
      dir = dir + '/' + parts[i];
      let st;
      try {
        st = fs.lstatSync(dir);
      } catch (e) {
        throw ioError(rel, e);
      }
      if (st.isSymbolicLink()) {
        throw fsError('access-denied', `${rel}: a symbolic link on the way is not followed`);
      }
      if (!st.isDirectory()) {
        throw fsError('not-a-directory', `${rel}: ${parts.slice(0, i + 1).join('/')} is not a directory`);
      }
    }
    return parts.length ? dir + '/' + parts[parts.length - 1] : this.real;
  }

  /** After an open: the descriptor must be a file under the root. */
  confirmInside(rel, fd) {
    let where;
    try {
      where = fs.readlinkSync(`/proc/self/fd/${fd}`);
    } catch {
      return; // no /proc: the component checks above stand alone
    }
    if (!where.startsWith(this.real + '/')) {
      fs.closeSync(fd);
      throw fsError('access-denied', `${rel}: resolved outside the cache root`);
    }
  }

  openFd(rel, flags, mode) {
    const parts = checkName(rel);
    const abs = this.resolve(rel, parts);
    let fd;
    try {
      fd = fs.openSync(abs, flags | C.O_NOFOLLOW, mode);
    } catch (e) {
      throw ioError(rel, e);
    }
    this.confirmInside(rel, fd);
    return fd;
  }

  /** Open without blocking (a FIFO cannot hold the call) and without
   * following a final symlink, then keep only a regular file with one
   * link: a directory is `is-a-directory`; a FIFO, socket or device, or a
   * file with other hard links (one may be outside the root), is
   * `access-denied`. Returns [fd, size]. */
  openRegular(rel, flags, mode) {
    const fd = this.openFd(rel, flags | C.O_NONBLOCK, mode);
    let st;
    try {
      st = fs.fstatSync(fd);
    } catch (e) {
      fs.closeSync(fd);
      throw ioError(rel, e);
    }
    const refuse = (code, why) => {
      fs.closeSync(fd);
      return fsError(code, `${rel}: ${why}`);
    };
    if (st.isDirectory()) throw refuse('is-a-directory', 'not a regular file');
    if (!st.isFile()) throw refuse('access-denied', 'not a regular file');
    if (st.nlink > 1) {
      throw refuse('access-denied', `has ${st.nlink} hard links; refused (it may be a link to a file outside the root)`);
    }
    // Regular files ignore O_NONBLOCK; clear it all the same (as the Rust
    // host does) where the range-lock add-on can.
    try {
      this.native?.clearNonblock(fd);
    } catch {}
    return [fd, st.size];
  }

  /** Create a new, empty file for writing, exclusively. */
  createNew(rel) {
    return this.openRegular(rel, C.O_WRONLY | C.O_CREAT | C.O_EXCL, 0o666)[0];
  }

  /** Open an existing regular file for reading. Returns [fd, size]. */
  open(rel) {
    return this.openRegular(rel, C.O_RDONLY);
  }

  /** Open a file of the driver's own for reading and writing (creating it
   * if `create`, never truncating it): at the top of the root only the
   * metadata database `db` and its `-journal` (or the `-wal` a database of
   * release 0.2 left), nothing under the image directories. The same rule
   * and message as the Rust host (host/src/fs.rs). Returns [fd, size]. */
  openReadWrite(rel, create, db) {
    const parts = checkName(rel);
    const allowed =
      parts.length === 1
        ? parts[0] === db || parts[0] === `${db}-journal` || parts[0] === `${db}-wal`
        : !IMAGE_DIRS.includes(parts[0]);
    if (!allowed) {
      throw fsError(
        'access-denied',
        `${rel}: not a file a driver may write (at the top of the root only the metadata database ${db} and its journal; nothing under ${IMAGE_DIRS.map((d) => `${d}/`).join(', ')})`,
      );
    }
    return this.openRegular(rel, C.O_RDWR | (create ? C.O_CREAT : 0), 0o666);
  }

  stat(rel) {
    const parts = checkPath(rel);
    const abs = this.resolve(rel, parts);
    let st;
    try {
      // A missing entry is common (every is-cached miss): no exception.
      st = fs.lstatSync(abs, { bigint: true, throwIfNoEntry: false });
    } catch (e) {
      throw ioError(rel, e);
    }
    if (st === undefined) throw fsError('not-found', `${rel}: no such file or directory (ENOENT)`);
    return metadataOf(st);
  }

  /** dev and ino of the regular file at rel (never through a symlink). */
  identity(rel) {
    const parts = checkName(rel);
    const abs = this.resolve(rel, parts);
    let st;
    try {
      st = fs.lstatSync(abs, { bigint: true });
    } catch (e) {
      throw ioError(rel, e);
    }
    if (!st.isFile()) throw fsError('is-a-directory', `${rel}: not a regular file`);
    return `${st.dev}:${st.ino}`;
  }

  createDir(rel) {
    const parts = checkName(rel);
    const abs = this.resolve(rel, parts);
    try {
      fs.mkdirSync(abs);
    } catch (e) {
      throw ioError(rel, e);
    }
  }

  /** Walk a directory (at most maxListing entries, stopping at the
   * deadline); describe(dirent, abs) returns an item or undefined. */
  walk(rel, deadline, describe) {
    const parts = checkPath(rel);
    const abs = this.resolve(rel, parts);
    // The directory itself must not be a symlink either.
    if (parts.length) {
      let st;
      try {
        st = fs.lstatSync(abs);
      } catch (e) {
        throw ioError(rel, e);
      }
      if (st.isSymbolicLink()) throw fsError('access-denied', `${rel}: a symbolic link is not followed`);
      if (!st.isDirectory()) throw fsError('not-a-directory', `${rel}: not a directory`);
    }
    let dir;
    try {
      dir = fs.opendirSync(abs, { bufferSize: 256 });
    } catch (e) {
      throw ioError(rel, e);
    }
    const out = [];
    try {
      for (;;) {
        let entry;
        try {
          entry = dir.readSync();
        } catch (e) {
          throw ioError(rel, e);
        }
        if (entry === null) break;
        if (out.length >= this.maxListing) {
          throw fsError('limit-exceeded', `${rel || '.'}: more than ${this.maxListing} entries`);
        }
        if (out.length % 1024 === 1023 && deadline.passed()) {
          throw fsError('timed-out', `${rel || '.'}: stopped at the call's deadline`);
        }
        const item = describe(entry, abs + '/' + entry.name);
        if (item !== undefined) out.push(item);
      }
    } finally {
      dir.closeSync();
    }
    return out;
  }

  listDir(rel, deadline) {
    return this.walk(rel, deadline, (entry, abs) => {
      try {
        return { name: entry.name, metadata: metadataOf(fs.lstatSync(abs, { bigint: true })) };
      } catch (e) {
        if (e.code === 'ENOENT') return undefined; // removed while listing
        throw ioError(rel ? `${rel}/${entry.name}` : entry.name, e);
      }
    });
  }

  listNames(rel, deadline) {
    return this.walk(rel, deadline, (entry) => ({ name: entry.name, kind: kindOf(entry) }));
  }

  /** Rename within the root, where images cannot be forged by moving
   * files: into the top of the root only `incomplete/<name>` to `<name>` (a
   * commit), and `incomplete/<name>` otherwise only to `invalid/<name>` (an
   * abort); nothing leaves the top of the root or moves into `incomplete/`
   * or `queue/`. So the bytes at `<id>` are always a file the host filled:
   * never one the driver wrote (`open-read-write`) nor another image's. */
  rename(src, dst) {
    const sp = checkName(src);
    const dp = checkName(dst);
    if (!renameAllowed(sp, dp)) {
      throw fsError(
        'access-denied',
        `${src} -> ${dst}: not a rename a driver may make (into the top of the root ` +
          'only incomplete/<name> -> <name>, out of incomplete/ only to ' +
          'invalid/<name>; nothing leaves the top of the root)',
      );
    }
    const s = this.resolve(src, sp);
    const d = this.resolve(dst, dp);
    try {
      fs.renameSync(s, d);
    } catch (e) {
      throw ioError(`${src} -> ${dst}`, e);
    }
  }

  removeFile(rel) {
    const abs = this.resolve(rel, checkName(rel));
    try {
      fs.unlinkSync(abs);
    } catch (e) {
      throw ioError(rel, e);
    }
  }

  setTimes(rel, accessed, modified) {
    const abs = this.resolve(rel, checkName(rel));
    const a = accessed === undefined ? undefined : checkTime(accessed);
    const m = modified === undefined ? undefined : checkTime(modified);
    try {
      if (a === undefined || m === undefined) {
        const st = fs.lstatSync(abs, { bigint: true });
        fs.lutimesSync(abs, a ?? seconds(st.atimeNs), m ?? seconds(st.mtimeNs));
      } else {
        fs.lutimesSync(abs, a, m);
      }
    } catch (e) {
      throw ioError(rel, e);
    }
  }

  /** A root-relative name for messages (never the absolute path). */
  relative(abs) {
    return path.relative(this.real, abs);
  }
}

export { seconds };
