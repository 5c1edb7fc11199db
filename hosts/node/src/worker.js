// One driver instance, in a worker thread. The main thread sends one call
// at a time and stops this worker (worker.terminate) when a call overruns
// its deadline: a guest spinning in wasm, or a host import that does not
// return, cannot hold the embedding application's thread.
//
// Image bytes never pass through here: a session's file descriptor is
// handed to the main thread, which reads or writes it natively.

import fs from 'node:fs';
import { parentPort, workerData } from 'node:worker_threads';
import vm from 'node:vm';
import { RootFs } from './host/rootfs.js';
import { Locks } from './host/locks.js';
import { makeImports, Deadline, sealFile, readSeal } from './host/imports.js';
import { makeDatabaseImports } from './host/database.js';
import { rangeLockAddon } from './host/native.js';
import { printable } from './errors.js';

const { source, sourcePath, codeCache, modules, imports: componentImports, exports: componentExports, root, options, limits, lockTable, fdTable, wid, xattr, lockChannel, database } =
  workerData;

/** flock(fd, op) done by the main thread (see driver.js): 'done', 'busy',
 * or 'timed-out' when no answer came before the call's deadline. */
let lockSeq = 0;
function mainThreadFlock(fd, op) {
  const seq = ++lockSeq;
  parentPort.postMessage({ flock: { fd, op, seq } });
  for (;;) {
    const answered = Atomics.load(lockChannel, 0);
    if (answered === seq) break;
    const left = ctx.deadline.remaining();
    if (left <= 0) return 'timed-out';
    Atomics.wait(lockChannel, 0, answered, Math.min(left, 1000));
  }
  const answer = Atomics.load(lockChannel, 1);
  return answer === 1 ? 'done' : answer === 0 ? 'busy' : 'failed';
}

/** fs-xattr (through /proc/self/fd), or null without the add-on or /proc.
 * The host's own seal (user.image-cache.id) uses it whatever the driver
 * imports: set on every image the host commits, checked on every file a
 * read session hands back; without it nothing is sealed or checked. The
 * xattr import gets it only when the driver imports xattr and the cache
 * allows it (else every call is unsupported). */
async function loadXattr() {
  try {
    fs.accessSync('/proc/self/fd');
    return await import('fs-xattr');
  } catch {
    return null;
  }
}
const sealLib = await loadXattr();

const native = rangeLockAddon();
const ctx = {
  root: new RootFs(root, { maxListing: limits.maxListing, native }),
  fdTable,
  locks: new Locks(lockTable),
  wid,
  limits,
  deadline: new Deadline(),
  xattrLib: xattr ? sealLib : null,
  flock: lockChannel ? mainThreadFlock : null,
  native,
  // The one database name at the top of the root a driver may write
  // (open-read-write), from the options the cache configures it with.
  sqliteDb: options.findLast(([k]) => k === 'image_cache_sqlite_db')?.[1] ?? 'cache.db',
};
const { File, imports, releaseRangeLocks } = makeImports(ctx);
// The database import: requests to the database worker, which owns the
// pools (src/database/worker.js); rolled back at the end of every call.
const db = makeDatabaseImports(database, ctx);
imports.database = db.imports;

// jco's instantiation mode takes imports by interface name: the plain
// spelling and each versioned one the component imports (its contract
// version was checked in component.js).
const importObject = {};
for (const [iface, impl] of Object.entries(imports)) importObject[`image-cache:driver/${iface}`] = impl;
for (const spec of componentImports ?? []) {
  const m = /^image-cache:driver\/([a-z-]+)@/.exec(spec);
  if (m && imports[m[1]]) importObject[spec] = imports[m[1]];
}

// The transpiled glue is one large function; V8 compiles it on first use
// in every worker (tens of ms). It runs as a classic script so that the
// code V8 compiled in the first worker (its code cache, handed back to the
// main thread) is reused by the next ones.
globalThis.JCO_DEBUG = Boolean(process.env.JCO_DEBUG);
const glue = new vm.Script(
  `${(sourcePath ? fs.readFileSync(sourcePath, 'utf8') : source)
    .replace(/^export function instantiate\(/m, 'function instantiate(')
    .replace(/^export const _util = /m, 'const _util = ')
    // jco's debug log reads process.env (a call into C++) on every
    // lowering, ~20 times a driver call: read it once.
    .replace('if (!globalThis?.process?.env?.JCO_DEBUG) { return; }', 'if (!JCO_DEBUG) { return; }')}\n;({ instantiate });`,
  { filename: 'driver-glue.js', cachedData: codeCache ?? undefined },
);
const generated = glue.runInThisContext();
const codeCacheUsed = codeCache ? !glue.cachedDataRejected : false;

/** A broken driver: the main thread discards this instance. */
class Fault extends Error {}

const FUNCTIONS = new Set([
  'info', 'configure', 'getCacheSize', 'getHitCount', 'getCachedImages', 'isCached',
  'isBeingCached', 'isCacheable', 'isQueued', 'queueImage', 'getQueuedImages',
  'deleteCachedImage', 'deleteAllCachedImages', 'deleteQueuedImage', 'deleteAllQueuedImages',
  'getLeastRecentlyAccessed', 'getLeastRecentlyAccessedBatch', 'getImageSize', 'getCachedNodes',
  'clean', 'prune',
]);

let driver;
/** The guest's linear memories, to tell a trap at the memory cap. */
const memories = [];
const sessions = new Map();
let nextSession = 1;

function start() {
  const instance = generated.instantiate((name) => modules[name], importObject, (module, imports) => {
    const core = new WebAssembly.Instance(module, imports);
    for (const x of Object.values(core.exports)) if (x instanceof WebAssembly.Memory) memories.push(x);
    return core;
  });
  const exported = (componentExports ?? []).find((e) => e.startsWith('image-cache:driver/cache-driver@'));
  driver = (exported && instance[exported]) ?? instance['image-cache:driver/cache-driver'] ?? instance.cacheDriver;
  if (!driver) throw new Fault('it exports no cache-driver interface');
}

function dispose(resource) {
  const d = resource?.[Symbol.dispose] ?? resource?.[Symbol.for('dispose')];
  if (typeof d === 'function') d.call(resource);
}

function identityOfFd(fd) {
  const st = fs.fstatSync(fd, { bigint: true });
  return `${st.dev}:${st.ino}`;
}

/** The file a session hands back must be its own: `incomplete/<id>` it
 * created (write) or the cached `<id>` (read), same device and inode. */
function checkSessionFile(kind, id, file) {
  const where = kind === 'write' ? `incomplete/${id}` : id;
  const broke = (why) =>
    new Fault(`it broke the driver contract: the ${kind} session of ${JSON.stringify(id)} handed back ${why}`);
  if (!(file instanceof File) || file.fd < 0) throw broke('something that is not an open file');
  if (kind === 'write' && !file.writable) throw broke(`${JSON.stringify(file.path)}, not a file it created`);
  const handed = identityOfFd(file.fd);
  let expected;
  try {
    expected = ctx.root.identity(where);
  } catch (e) {
    throw broke(`${JSON.stringify(file.path)}, which is not ${where} (${e.payload?.message ?? e.message})`);
  }
  if (expected !== handed) throw broke(`${JSON.stringify(file.path)}, which is not ${where}`);
  return handed;
}

/** A host-side I/O failure as the guest's `io` error (not a fault): the
 * context and the system's reason, with its fs error code. */
function hostIoError(context, e) {
  const code = { ENOSPC: 'no-space', EDQUOT: 'no-space', EACCES: 'access-denied', EPERM: 'access-denied', EROFS: 'access-denied' }[e?.code] ?? 'io';
  const err = new Error(context);
  err.payload = { tag: 'io', val: { code, message: `${context}: ${printable(e?.message ?? e?.code ?? e, 256)}` } };
  return err;
}

/** A cached image's file carries the id the host sealed it with at commit
 * (an attribute the driver cannot reach): a driver that renamed another
 * image's file over this one is caught here, before a byte is served.
 * Unsealed files (release 0.2's, Glance's, or on a file system without
 * user attributes) pass. */
function checkSeal(id, file) {
  let sealed;
  try {
    sealed = readSeal(sealLib, file.fd);
  } catch (e) {
    throw hostIoError(`reading the seal of ${JSON.stringify(id)}`, e);
  }
  if (sealed !== null && !sealed.equals(Buffer.from(id, 'utf8'))) {
    throw new Fault(
      `it broke the driver contract: the read session of ${JSON.stringify(id)} handed back the file committed as ${JSON.stringify(printable(sealed.toString('utf8'), 80))}`,
    );
  }
}

function openSession(kind, id) {
  const [resource, file] = kind === 'write' ? driver.openForWrite(id) : driver.openForRead(id);
  let identity;
  try {
    identity = checkSessionFile(kind, id, file);
    if (kind === 'read') checkSeal(id, file);
  } catch (e) {
    try {
      dispose(resource);
    } catch {}
    if (file instanceof File) file.close();
    throw e;
  }
  file.handOver();
  const sid = nextSession++;
  sessions.set(sid, { kind, id, resource, file, identity });
  return { sid, fd: file.fd, size: file.sizeAtOpen };
}

function endSession(sid, how, arg) {
  const s = sessions.get(sid);
  if (!s) throw new Fault(`session ${sid} is not open`);
  sessions.delete(sid);
  try {
    if (how === 'commit') {
      // Sealed as this image right before the driver publishes it (see
      // checkSeal); a seal that cannot be written ends the session
      // uncommitted.
      try {
        sealFile(sealLib, s.file.fd, s.id);
      } catch (e) {
        throw hostIoError(`sealing image ${JSON.stringify(s.id)}`, e);
      }
      s.resource.commit(arg);
    } else if (how === 'abort') s.resource.abort(arg);
    else if (how === 'finish') s.resource.finish(s.file);
  } finally {
    try {
      dispose(s.resource);
    } finally {
      s.file.close(); // the lock goes; the main thread closes the descriptor
    }
  }
  if (how === 'commit') {
    let published;
    try {
      published = ctx.root.identity(s.id);
    } catch {}
    if (published !== s.identity) {
      throw new Fault(
        `it broke the driver contract: after the commit of ${JSON.stringify(s.id)}, ${JSON.stringify(s.id)} is not the file that was written`,
      );
    }
  }
}

/** The checksum a read session's driver recorded (null if none), the
 * session's file lent to it as for `finish`. The session stays open; any
 * failure ends it here, uncounted (a fault discards the instance anyway).
 * The main thread checks the value (driver.js). */
function sessionChecksum(sid) {
  const s = sessions.get(sid);
  if (!s) throw new Fault(`session ${sid} is not open`);
  if (s.kind !== 'read') throw new Fault(`session ${sid} is not a read session`);
  try {
    return s.resource.checksum(s.file) ?? null;
  } catch (e) {
    sessions.delete(sid);
    try {
      dispose(s.resource);
    } catch {}
    s.file.close(); // the lock goes; the main thread closes the descriptor
    throw e;
  }
}

function run(op, args) {
  switch (op) {
    case 'start': {
      start();
      const info = driver.info();
      driver.configure(args.options);
      // After configure, the cache holds the code of what a call runs.
      return { info, codeCache: codeCacheUsed ? null : glue.createCachedData() };
    }
    case 'call':
      if (!FUNCTIONS.has(args.fn)) throw new Fault(`no driver function ${args.fn}`);
      return driver[args.fn](...args.args);
    case 'openForWrite':
      return openSession('write', args.id);
    case 'openForRead':
      return openSession('read', args.id);
    case 'commit':
      return endSession(args.sid, 'commit', args.checksum);
    case 'abort':
      return endSession(args.sid, 'abort', args.reason);
    case 'checksum':
      return sessionChecksum(args.sid);
    case 'finish':
      return endSession(args.sid, 'finish');
    case 'drop':
      return endSession(args.sid, 'drop');
    default:
      throw new Fault(`unknown operation ${op}`);
  }
}

/** The fs error codes an `io` error may carry (types.io-error). */
const FS_CODES = new Set([
  'not-found', 'already-exists', 'access-denied', 'invalid-path', 'not-a-directory', 'is-a-directory',
  'no-space', 'unsupported', 'limit-exceeded', 'timed-out', 'invalid-argument', 'io',
]);

/** What the guest's error variant says, bounded: {kind, message} and, for
 * `io`, the fs error code it carries (ioCode). */
function guestError(e) {
  // jco throws the error variant itself ({tag, val}); older versions wrap
  // it in a ComponentError's payload.
  const p = e instanceof Error ? e.payload : e;
  if (!p || typeof p !== 'object' || typeof p.tag !== 'string') return null;
  if (typeof p.val === 'string') return { kind: p.tag, message: printable(p.val, 1024) };
  if (p.tag === 'io' && p.val && typeof p.val === 'object' && typeof p.val.message === 'string') {
    const code = FS_CODES.has(p.val.code) ? p.val.code : 'io';
    return { kind: 'io', message: printable(p.val.message, 1024), ioCode: code };
  }
  return null;
}

function faultMessage(e) {
  if (e instanceof Fault) return printable(e.message, 512);
  if (e instanceof WebAssembly.RuntimeError) {
    const m = printable(String(e.message), 256);
    // The cap is the memories' maximum (component.js): a guest that trapped
    // within 2 MiB of it ran out of memory there.
    const cap = limits.memoryBytes;
    if (cap && memories.some((mem) => mem.buffer.byteLength > cap - (2 << 20))) {
      return `it trapped: it exceeded its memory cap of ${cap} bytes (${m})`;
    }
    return `it trapped: ${m}`;
  }
  return `it trapped: ${printable(e?.message ?? e, 256)}`;
}

parentPort.on('message', ({ id, op, args, deadlineMs }) => {
  ctx.deadline = new Deadline(Date.now() + deadlineMs);
  let reply;
  try {
    const value = run(op, args);
    reply = { id, ok: true, value };
  } catch (e) {
    const g = guestError(e);
    reply = g ? { id, ok: false, error: g } : { id, ok: false, fault: faultMessage(e) };
  } finally {
    // No byte-range lock outlives the call that took it (success, error
    // or trap).
    releaseRangeLocks();
  }
  const late = ctx.deadline.passed();
  // Nor does a database transaction: one still open is rolled back (or
  // its connection closed) before the call's answer goes out.
  try {
    db.endOfCall();
  } catch {}
  if (late && !reply.fault) {
    const what = reply.ok ? '' : ` (${reply.error.kind}: ${printable(reply.error.message, 256)})`;
    reply = {
      id,
      ok: false,
      fault: `it ran past its deadline of ${deadlineMs} ms inside a host call and was stopped${what}`,
    };
  }
  parentPort.postMessage(reply);
});

parentPort.postMessage({ ready: true });
