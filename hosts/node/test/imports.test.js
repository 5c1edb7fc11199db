// The host imports on their own, without wasm: fs (beneath-root paths,
// open-read-write's policy, read-at/write-at caps, FIFOs and hard links),
// byte-range locks (between open files, worker threads and processes, and
// their release at the end of a driver call), flock-style locks, xattr,
// the clock.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import { Worker } from 'node:worker_threads';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { RootFs } from '../src/host/rootfs.js';
import { makeImports, Deadline, MAX_IO, SEAL } from '../src/host/imports.js';
import { Locks, createLockTable, createFdTable } from '../src/host/locks.js';
import { rangeLockAddon } from '../src/host/native.js';
import { ImageCache } from '../src/index.js';
import * as xattrLib from 'fs-xattr';

const native = rangeLockAddon();

const dirs = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-imports-'));
  dirs.push(d);
  return d;
}

function setup({ openFiles = 16, maxListing, xattrLib = null, sqliteDb, dir = tmp(), addon = native, locks = new Locks(createLockTable()), wid = 1 } = {}) {
  const ctx = {
    root: new RootFs(dir, { maxListing, native: addon }),
    fdTable: createFdTable(openFiles),
    locks,
    wid,
    limits: {},
    deadline: new Deadline(Date.now() + 10_000),
    xattrLib,
    native: addon,
    sqliteDb,
  };
  const { File, imports, releaseRangeLocks } = makeImports(ctx);
  return { dir, ctx, File, imports, fsi: imports.fs, releaseRangeLocks };
}

/** The fs-error an import call throws. */
function fsErr(fn) {
  try {
    fn();
  } catch (e) {
    assert.ok(e.payload, `an error with a payload: ${e}`);
    return e.payload;
  }
  assert.fail('expected an error');
}

test('fs refuses parent and absolute paths, NUL and backslash, before any system call', () => {
  const { fsi } = setup();
  for (const p of ['..', '../x', 'a/../../x', '/etc/passwd', '/']) {
    for (const call of [() => fsi.open(p), () => fsi.createNew(p), () => fsi.stat(p), () => fsi.removeFile(p), () => fsi.listDir(p), () => fsi.rename('x', p)]) {
      assert.equal(fsErr(call).code, 'access-denied', p);
    }
  }
  for (const p of ['a\\b', 'nul\0']) assert.equal(fsErr(() => fsi.open(p)).code, 'invalid-path', JSON.stringify(p));
  assert.equal(fsErr(() => fsi.createNew('')).code, 'invalid-path');
  assert.equal(fsErr(() => fsi.removeFile('.')).code, 'invalid-path');
});

test('fs never follows a symlink out of the root, nor a final symlink', () => {
  const outside = tmp();
  fs.writeFileSync(path.join(outside, 'secret'), 'secret');
  const { dir, fsi } = setup();
  fs.symlinkSync(path.join(outside, 'secret'), path.join(dir, 'link'));
  fs.symlinkSync(outside, path.join(dir, 'linkdir'));
  const before = fs.statSync(path.join(outside, 'secret'));

  assert.equal(fsErr(() => fsi.open('link')).code, 'access-denied');
  assert.equal(fsi.stat('link').kind, 'symlink');
  fsi.setTimes('link', 0, undefined); // the link's own times
  assert.equal(fs.statSync(path.join(outside, 'secret')).atimeMs, before.atimeMs);

  for (const call of [
    () => fsi.open('linkdir/secret'),
    () => fsi.createNew('linkdir/planted'),
    () => fsi.listDir('linkdir'),
    () => fsi.listNames('linkdir'),
    () => fsi.removeFile('linkdir/secret'),
    () => fsi.rename('linkdir/secret', 'linkdir/stolen'),
    () => fsi.setTimes('linkdir/secret', 1, 1),
    () => fsi.stat('linkdir/secret'),
  ]) {
    assert.equal(fsErr(call).code, 'access-denied');
  }
  assert.ok(!fs.existsSync(path.join(outside, 'planted')));
  assert.equal(fs.readFileSync(path.join(outside, 'secret'), 'utf8'), 'secret');
  fsi.removeFile('link');
  assert.ok(fs.existsSync(path.join(outside, 'secret')), 'removing the link removes the link');
});

test('fs messages name root-relative paths, never the root', () => {
  const { dir, fsi } = setup();
  const e = fsErr(() => fsi.open('incomplete/missing'));
  assert.equal(e.code, 'not-found');
  assert.match(e.message, /^incomplete\/missing: /);
  assert.ok(!e.message.includes(dir), e.message);
});

test('rename forges no image: into the top only incomplete/<name> -> <name>, out of incomplete/ only to invalid/<name>', () => {
  const { dir, fsi } = setup();
  for (const sub of ['incomplete', 'invalid', 'mine', 'queue']) fsi.createDir(sub);
  const make = (p) => fsi.createNew(p).close();
  make('incomplete/x');
  fsi.rename('incomplete/x', 'x');
  assert.ok(fs.statSync(path.join(dir, 'x')).isFile());
  make('incomplete/x');
  fsi.rename('incomplete/x', 'invalid/x');
  make('mine/a');
  fsi.rename('mine/a', 'mine/b');
  fsi.rename('./invalid/x', 'mine//x'); // `.` and empty components are dropped
  assert.deepEqual(fs.readdirSync(path.join(dir, 'mine')).sort(), ['b', 'x']);

  for (const p of ['mine/a', 'y', 'cache.db', 'incomplete/x', 'queue/x']) make(p);
  for (const [src, dst] of [
    ['mine/a', 'x'],
    ['x', 'y'],
    ['x', 'mine/x'],
    ['cache.db', 'x'],
    ['mine/a', 'incomplete/a'],
    ['incomplete/x', 'mine/x'],
    ['queue/x', 'invalid/x'],
    ['incomplete/x', 'y'], // another name's fill
    ['incomplete/x', 'invalid/y'],
    ['incomplete/x', 'incomplete/z'],
    ['./x', './mine/z'],
  ]) {
    const e = fsErr(() => fsi.rename(src, dst));
    assert.equal(e.code, 'access-denied', `${src} -> ${dst}`);
    assert.equal(
      e.message,
      `${src} -> ${dst}: not a rename a driver may make (into the top of the root ` +
        'only incomplete/<name> -> <name>, out of incomplete/ only to ' +
        'invalid/<name>; nothing leaves the top of the root)',
    );
  }
  assert.deepEqual(fs.readdirSync(dir).sort(), ['cache.db', 'incomplete', 'invalid', 'mine', 'queue', 'x', 'y']);
  assert.deepEqual(fs.readdirSync(path.join(dir, 'mine')).sort(), ['a', 'b', 'x']);
  assert.deepEqual(fs.readdirSync(path.join(dir, 'incomplete')), ['x']);
  assert.deepEqual(fs.readdirSync(path.join(dir, 'queue')), ['x']);
  // The path checks still come first.
  assert.equal(fsErr(() => fsi.rename('../x', 'x')).code, 'access-denied');
  assert.equal(fsErr(() => fsi.rename('incomplete/x', '.')).code, 'invalid-path');
});

test('create-new is exclusive, and open takes regular files only', () => {
  const { dir, fsi } = setup();
  const f = fsi.createNew('x');
  assert.equal(fsErr(() => fsi.createNew('x')).code, 'already-exists');
  f.close();
  fs.mkdirSync(path.join(dir, 'd'));
  const e = fsErr(() => fsi.open('d'));
  assert.equal(e.code, 'is-a-directory');
  assert.equal(e.message, 'd: not a regular file');
  assert.equal(fsErr(() => fsi.openReadWrite('own', true)).code, 'access-denied', 'not at the top of the root');
  fs.mkdirSync(path.join(dir, 'own'));
  fs.mkdirSync(path.join(dir, 'own', 'sub'));
  assert.equal(fsErr(() => fsi.openReadWrite('own/sub', false)).code, 'is-a-directory');
});

test('a FIFO in the root is refused without blocking, by open and open-read-write', () => {
  const { dir, fsi, ctx } = setup();
  fs.mkdirSync(path.join(dir, 'own'));
  for (const rel of ['fifo', 'own/fifo', 'cache.db']) {
    // Nobody ever opens the other end: a blocking open would hang here.
    execFileSync('mkfifo', [path.join(dir, rel)]);
  }
  for (const call of [() => fsi.open('fifo'), () => fsi.openReadWrite('own/fifo', false), () => fsi.openReadWrite('cache.db', true)]) {
    const e = fsErr(call);
    assert.equal(e.code, 'access-denied');
    assert.match(e.message, /^(fifo|own\/fifo|cache\.db): not a regular file$/);
  }
  assert.ok(Array.from(ctx.fdTable).every((fd) => fd === -1), 'nothing left open');
});

test('a planted hard link is refused (it may lead out of the root)', () => {
  const outside = tmp();
  const secret = path.join(outside, 'secret');
  fs.writeFileSync(secret, 'secret');
  const { dir, fsi } = setup();
  fs.mkdirSync(path.join(dir, 'own'));
  fs.linkSync(secret, path.join(dir, 'hardlink'));
  fs.linkSync(secret, path.join(dir, 'own', 'hardlink'));
  fs.linkSync(secret, path.join(dir, 'cache.db'));
  for (const [call, rel] of [
    [() => fsi.open('hardlink'), 'hardlink'],
    [() => fsi.openReadWrite('own/hardlink', false), 'own/hardlink'],
    [() => fsi.openReadWrite('cache.db', true), 'cache.db'],
  ]) {
    const e = fsErr(call);
    assert.equal(e.code, 'access-denied');
    assert.equal(e.message, `${rel}: has 4 hard links; refused (it may be a link to a file outside the root)`);
  }
  assert.equal(fs.readFileSync(secret, 'utf8'), 'secret');
});

test('open files per instance are capped (a trap, as a full resource table) and closing frees the slot', () => {
  const { fsi, ctx } = setup({ openFiles: 3 });
  fsi.createNew('f').close();
  const held = [fsi.open('f'), fsi.open('f'), fsi.open('f')];
  assert.throws(
    () => fsi.open('f'),
    (e) => e instanceof Error && e.payload === undefined && /resource table has no free keys \(an instance may hold at most 3 open files/.test(e.message),
  );
  fs.mkdirSync(path.join(ctx.root.real, 'own'));
  assert.throws(() => fsi.openReadWrite('own/db', true), /no free keys/);
  assert.ok(!fs.existsSync(path.join(ctx.root.real, 'own', 'db')), 'refused before the open');
  held.pop().close();
  held.push(fsi.open('f'));
  held.forEach((f) => f.close());
  assert.ok(Array.from(ctx.fdTable).every((fd) => fd === -1), 'every slot free');
});

test('listings are capped, and list-names reports kinds', () => {
  const { dir, fsi } = setup({ maxListing: 3 });
  for (let i = 0; i < 3; i++) fs.writeFileSync(path.join(dir, String(i)), '');
  fs.mkdirSync(path.join(dir, 'sub'));
  assert.equal(fsErr(() => fsi.listDir('')).code, 'limit-exceeded');
  fs.rmdirSync(path.join(dir, 'sub'));
  const names = fsi.listNames('').sort((a, b) => a.name.localeCompare(b.name));
  assert.deepEqual(names, ['0', '1', '2'].map((name) => ({ name, kind: 'regular-file' })));
  assert.equal(fsi.listDir('')[0].metadata.size, 0n);
});

test('times round-trip with sub-second precision; unusable times are refused', () => {
  const { fsi } = setup();
  const f = fsi.createNew('f');
  f.setTimes(1_700_000_000.25, 1_600_000_000.5);
  const m = fsi.stat('f');
  assert.deepEqual([m.accessed, m.modified], [1_700_000_000.25, 1_600_000_000.5]);
  f.setTimes(1_700_000_001, undefined);
  assert.equal(f.metadata().modified, 1_600_000_000.5, 'undefined leaves it unchanged');
  for (const t of [-1, NaN, Infinity, 1e300]) {
    assert.equal(fsErr(() => f.setTimes(t, undefined)).code, 'invalid-argument');
    assert.equal(fsErr(() => fsi.setTimes('f', undefined, t)).code, 'invalid-argument');
  }
  f.close();
});

test('remove-files answers per path', () => {
  const { fsi } = setup();
  fsi.createNew('a').close();
  const r = fsi.removeFiles(['a', 'missing', '../x']);
  assert.deepEqual(r.map((x) => x.tag), ['ok', 'err', 'err']);
  assert.equal(r[1].val.code, 'not-found');
  assert.equal(r[2].val.code, 'access-denied');
});

test('locks exclude other open files of the same file, in and across instances, and die with a worker', () => {
  const { fsi, ctx } = setup();
  fsi.createNew('l').close();
  const a = fsi.open('l');
  const b = fsi.open('l');
  assert.equal(a.tryLock(), true);
  assert.equal(a.tryLock(), true, 'the holder may lock again');
  assert.equal(b.tryLock(), false);
  ctx.deadline = new Deadline(Date.now() + 100);
  const started = Date.now();
  assert.equal(fsErr(() => b.lock()).code, 'timed-out');
  assert.ok(Date.now() - started < 1000);
  a.unlock();
  assert.equal(b.tryLock(), true);
  ctx.locks.releaseWorker(ctx.wid); // as when a worker is stopped
  assert.equal(a.tryLock(), true);
  a.close();
  b.close();
});

test('xattr without the add-on: only user.* names, and every call unsupported', () => {
  const { imports, fsi } = setup();
  const f = fsi.createNew('x');
  assert.equal(fsErr(() => imports.xattr.set(f, 'trusted.x', new Uint8Array([1]))).code, 'access-denied');
  assert.equal(fsErr(() => imports.xattr.get(f, 'security.selinux')).code, 'access-denied');
  assert.equal(fsErr(() => imports.xattr.set(f, 'user.hits', new Uint8Array([1]))).code, 'unsupported');
  assert.equal(fsErr(() => imports.xattr.probe()).code, 'unsupported');
  f.close();
});

test("xattr: the host's own names (user.image-cache.*) are refused and never listed", (t) => {
  const own = (name) => `extended attribute ${JSON.stringify(name)}: user.image-cache.* is the host's own`;
  // Refused before anything else, with the add-on or without.
  for (const lib of [null, xattrLib]) {
    const { imports, fsi } = setup({ xattrLib: lib });
    const f = fsi.createNew('x');
    for (const name of [SEAL, 'user.image-cache.probe', 'user.image-cache.x']) {
      for (const call of [() => imports.xattr.get(f, name), () => imports.xattr.set(f, name, new Uint8Array([1])), () => imports.xattr.remove(f, name)]) {
        const e = fsErr(call);
        assert.equal(e.code, 'access-denied', name);
        assert.equal(e.message, own(name));
      }
    }
    f.close();
  }
  const { imports, fsi } = setup({ xattrLib });
  const f = fsi.createNew('img');
  try {
    xattrLib.setAttributeSync(`/proc/self/fd/${f.fd}`, SEAL, 'img');
  } catch (e) {
    f.close();
    const why = `the file system stores no user extended attributes (${e?.code})`;
    console.log(`# skipped: ${why}`);
    return t.skip(why);
  }
  // Names next to the prefix are the driver's.
  for (const name of ['user.image-cache-probe', 'user.image-cache', 'user.hits']) imports.xattr.set(f, name, new Uint8Array([0x31]));
  assert.deepEqual(imports.xattr.listNames(f).sort(), ['user.hits', 'user.image-cache', 'user.image-cache-probe'], 'the seal is not listed');
  assert.equal(xattrLib.getAttributeSync(`/proc/self/fd/${f.fd}`, SEAL).toString(), 'img', 'nor changed');
  f.close();
});

test('xattr attributes live on the open file (through /proc/self/fd), user.* only, capped', () => {
  const outside = tmp();
  fs.writeFileSync(path.join(outside, 'target'), '');
  const { dir, imports, fsi } = setup({ xattrLib });
  const x = imports.xattr;
  fsi.createDir('incomplete');
  const f = fsi.createNew('incomplete/img');
  assert.equal(fsErr(() => x.get(f, 'user.hits')).code, 'not-found');
  x.set(f, 'user.hits', new Uint8Array([0x33]));
  assert.deepEqual(x.get(f, 'user.hits'), new Uint8Array([0x33]));
  assert.deepEqual(x.listNames(f), ['user.hits']);
  // Renamed under it, or its name taken by a symlink out: the attribute
  // still goes to the open file, never to what the name now points at.
  fsi.rename('incomplete/img', 'img');
  fs.symlinkSync(path.join(outside, 'target'), path.join(dir, 'incomplete', 'img'));
  x.set(f, 'user.hits', new Uint8Array([0x34]));
  const again = fsi.open('img');
  assert.deepEqual(x.get(again, 'user.hits'), new Uint8Array([0x34]));
  assert.deepEqual(xattrLib.listAttributesSync(path.join(outside, 'target')).filter((n) => n.startsWith('user.')), []);
  x.remove(f, 'user.hits');
  x.remove(f, 'user.hits'); // a missing one is fine
  assert.equal(fsErr(() => x.set(f, 'trusted.hits', new Uint8Array([1]))).code, 'access-denied');
  assert.equal(fsErr(() => x.set(f, 'user.big', new Uint8Array(64 * 1024 + 1))).code, 'limit-exceeded');
  x.probe();
  assert.deepEqual(fs.readdirSync(dir).sort(), ['img', 'incomplete'], 'the probe leaves nothing');
  f.close();
  again.close();
});

test('the clock is the wall clock, to the microsecond, and never goes back', () => {
  const { imports } = setup();
  const now = imports.clock.now;
  assert.ok(Math.abs(now() - Date.now() / 1000) < 1);
  let last = now();
  let distinct = 0;
  for (let i = 0; i < 1000; i++) {
    const t = now();
    assert.ok(t >= last);
    if (t > last) distinct++;
    last = t;
  }
  assert.ok(distinct > 100, 'sub-millisecond steps');
  assert.notEqual(now() % 0.001, 0);
});

test('clock.sleep pauses at most 100 ms and never past the deadline; false once it has passed', () => {
  const { imports, ctx } = setup();
  const { sleep } = imports.clock;
  assert.equal(sleep(0), true);
  assert.equal(sleep(1000), true);
  // u32::MAX microseconds (71 minutes) returns: the pause is capped.
  assert.equal(sleep(0xffffffff), true);
  ctx.deadline = new Deadline(Date.now() + 20);
  // Up to the deadline, not past it; then false.
  let answers = 0;
  while (sleep(0xffffffff) && answers < 1000) answers++;
  assert.ok(answers < 1000, 'the deadline ends the waiting');
  assert.ok(ctx.deadline.passed(), 'false only once the deadline has passed');
  assert.equal(sleep(0), false, 'and at once after it');
});

// ---- open-read-write, read-at, write-at ----

test('open-read-write: at the top of the root only the metadata database and its journal; nothing under the image directories', () => {
  const { dir, fsi } = setup();
  for (const d of ['incomplete', 'invalid', 'queue', 'own']) fs.mkdirSync(path.join(dir, d));
  fs.writeFileSync(path.join(dir, 'incomplete', 'img'), 'image bytes');
  fs.writeFileSync(path.join(dir, 'img'), 'image bytes');
  for (const name of ['cache.db', 'cache.db-journal', 'cache.db-wal', './cache.db', 'own/x.db', 'own/x.db-journal']) {
    fsi.openReadWrite(name, true).close();
  }
  for (const p of ['img', 'other.db', 'cache.db-shm', 'cache.dbx', 'incomplete/img', 'invalid/x', 'queue/x', './incomplete/img', 'incomplete/new']) {
    const e = fsErr(() => fsi.openReadWrite(p, true));
    assert.equal(e.code, 'access-denied', p);
    assert.equal(
      e.message,
      `${p}: not a file a driver may write (at the top of the root only the metadata database cache.db and its journal; nothing under incomplete/, invalid/, queue/)`,
    );
  }
  assert.ok(!fs.existsSync(path.join(dir, 'incomplete', 'new')) && !fs.existsSync(path.join(dir, 'other.db')), 'nothing created');
  assert.equal(fs.readFileSync(path.join(dir, 'img'), 'utf8'), 'image bytes');
  // Paths are checked as everywhere else.
  for (const p of ['../x.db', '/tmp/x.db', 'own/../../x.db']) assert.equal(fsErr(() => fsi.openReadWrite(p, true)).code, 'access-denied', p);
  assert.equal(fsErr(() => fsi.openReadWrite('', true)).code, 'invalid-path');
  assert.equal(fsErr(() => fsi.openReadWrite('own/missing', false)).code, 'not-found');
  // A final symlink is not followed, nor one on the way.
  const outside = tmp();
  fs.writeFileSync(path.join(outside, 'victim.db'), 'victim');
  fs.symlinkSync(path.join(outside, 'victim.db'), path.join(dir, 'own', 'link.db'));
  fs.symlinkSync(outside, path.join(dir, 'linkdir'));
  assert.equal(fsErr(() => fsi.openReadWrite('own/link.db', true)).code, 'access-denied');
  assert.equal(fsErr(() => fsi.openReadWrite('linkdir/victim.db', false)).code, 'access-denied');
  assert.equal(fs.readFileSync(path.join(outside, 'victim.db'), 'utf8'), 'victim');
});

test('open-read-write: the database name is the image_cache_sqlite_db option', () => {
  const { fsi } = setup({ sqliteDb: 'meta.sqlite' });
  fsi.openReadWrite('meta.sqlite', true).close();
  fsi.openReadWrite('meta.sqlite-journal', true).close();
  const e = fsErr(() => fsi.openReadWrite('cache.db', true));
  assert.equal(e.code, 'access-denied');
  assert.match(e.message, /only the metadata database meta\.sqlite and its journal/);
});

test('open-read-write never truncates; create makes a missing file', () => {
  const { dir, fsi } = setup();
  fs.writeFileSync(path.join(dir, 'cache.db'), 'kept bytes');
  const f = fsi.openReadWrite('cache.db', true);
  assert.equal(f.size(), 10n);
  assert.equal(Buffer.from(f.readAt(0n, 100)).toString(), 'kept bytes');
  f.close();
  assert.equal(fs.readFileSync(path.join(dir, 'cache.db'), 'utf8'), 'kept bytes');
  assert.equal(fsErr(() => fsi.openReadWrite('cache.db-journal', false)).code, 'not-found');
  const j = fsi.openReadWrite('cache.db-journal', true);
  assert.equal(j.size(), 0n);
  j.close();
});

test('read-at, write-at, set-len, size and sync-data, with their caps', () => {
  const { dir, fsi } = setup();
  const f = fsi.openReadWrite('cache.db', true);
  f.writeAt(0n, new Uint8Array(Buffer.from('hello world')));
  f.writeAt(6n, new Uint8Array(Buffer.from('WORLD')));
  f.syncData();
  f.sync();
  assert.equal(f.size(), 11n);
  assert.equal(Buffer.from(f.readAt(0n, 11)).toString(), 'hello WORLD');
  assert.equal(Buffer.from(f.readAt(6n, 100)).toString(), 'WORLD', 'short at the end of the file');
  assert.equal(f.readAt(11n, 10).length, 0, 'empty at the end');
  assert.equal(f.readAt(1000n, 10).length, 0, 'empty past it');
  assert.equal(f.readAt(0n, MAX_IO).length, 11, 'a full MiB may be asked for');
  // Caps and offsets.
  let e = fsErr(() => f.readAt(0n, MAX_IO + 1));
  assert.equal(e.code, 'limit-exceeded');
  assert.equal(e.message, `cache.db: more than ${MAX_IO} bytes in one read`);
  e = fsErr(() => f.readAt((1n << 63n) - 1n, 1));
  assert.equal(e.code, 'invalid-argument');
  assert.match(e.message, /^cache\.db: 1 bytes at offset 9223372036854775807 are past any file offset$/);
  assert.equal(fsErr(() => f.readAt((1n << 64n) - 1n, 0)).code, 'invalid-argument');
  assert.equal(f.readAt((1n << 63n) - 2n, 1).length, 0, 'the last offset is fine');
  e = fsErr(() => f.writeAt(0n, new Uint8Array(MAX_IO + 1)));
  assert.equal(e.code, 'limit-exceeded');
  assert.equal(e.message, `cache.db: more than ${MAX_IO} bytes in one write`);
  e = fsErr(() => f.writeAt(16n << 30n, new Uint8Array(1)));
  assert.equal(e.code, 'limit-exceeded');
  assert.equal(e.message, "cache.db: a driver's own file may not grow past 17179869184 bytes");
  assert.equal(fsErr(() => f.writeAt((1n << 64n) - 1n, new Uint8Array(1))).code, 'invalid-argument');
  assert.equal(fsErr(() => f.setLen((16n << 30n) + 1n)).code, 'limit-exceeded');
  assert.equal(f.size(), 11n, 'nothing written by a refused call');
  f.setLen(5n);
  assert.equal(f.size(), 5n);
  f.setLen(4096n);
  assert.equal(f.size(), 4096n);
  assert.equal(f.readAt(4000n, 200).length, 96);
  f.close();
  assert.equal(fs.statSync(path.join(dir, 'cache.db')).size, 4096);
});

test('write-at and set-len only on files from open-read-write: an image is written by the host alone', () => {
  const { dir, fsi } = setup();
  fs.writeFileSync(path.join(dir, 'img'), 'image bytes');
  const r = fsi.open('img');
  const w = fsi.createNew('new-img');
  for (const f of [r, w]) {
    const e = fsErr(() => f.writeAt(0n, new Uint8Array([1])));
    assert.equal(e.code, 'access-denied');
    assert.equal(e.message, `${f.path}: not opened with open-read-write (only the host writes an image's bytes)`);
    assert.equal(fsErr(() => f.setLen(0n)).code, 'access-denied');
  }
  assert.equal(Buffer.from(r.readAt(0n, 5)).toString(), 'image', 'read-at works on any open file');
  assert.equal(r.size(), 11n);
  r.close();
  w.close();
  assert.equal(fs.readFileSync(path.join(dir, 'img'), 'utf8'), 'image bytes');
});

// ---- byte-range locks ----

const L = (n) => BigInt(n);

test('range locks exclude another open file of the same file; shared ones coexist; own locks never conflict', () => {
  assert.ok(native, 'the range_lock add-on is built (npm ci builds it)');
  const { fsi, ctx } = setup();
  const a = fsi.openReadWrite('cache.db', true);
  const b = fsi.openReadWrite('cache.db', false);
  assert.equal(a.setRangeLock(L(10), L(10), 'exclusive'), true);
  assert.equal(a.setRangeLock(L(10), L(10), 'exclusive'), true, 'again, by its holder');
  assert.equal(b.setRangeLock(L(15), L(1), 'shared'), false);
  assert.equal(b.setRangeLock(L(0), L(10), 'exclusive'), true, 'the bytes before are free');
  assert.equal(b.rangeLockedElsewhere(L(19), L(5)), true);
  assert.equal(b.rangeLockedElsewhere(L(20), L(5)), false);
  assert.equal(a.rangeLockedElsewhere(L(10), L(10)), false, "one's own lock is not elsewhere");
  // Shared with shared; exclusive against shared.
  assert.equal(a.setRangeLock(L(10), L(10), 'shared'), true, 'downgraded');
  assert.equal(b.setRangeLock(L(12), L(2), 'shared'), true);
  assert.equal(a.setRangeLock(L(12), L(1), 'exclusive'), false);
  assert.equal(b.setRangeLock(L(0), L(0), 'unlocked'), true);
  assert.equal(a.setRangeLock(L(12), L(1), 'exclusive'), true);
  // Length 0: to the end of the file and beyond.
  assert.equal(a.setRangeLock(L(1000), L(0), 'exclusive'), true);
  assert.equal(b.setRangeLock(L(1) << L(40), L(1), 'shared'), false);
  assert.equal(b.rangeLockedElsewhere(L(5000), L(0)), true);
  // Closing a file drops its locks.
  a.close();
  assert.equal(b.setRangeLock(L(0), L(0), 'exclusive'), true);
  assert.equal(ctx.locks.find(1n), -1, 'no flock-table entry involved');
  b.close();
});

test('range-lock arguments must fit a signed 64-bit file offset', () => {
  const { fsi } = setup();
  const f = fsi.openReadWrite('cache.db', true);
  const max = (L(1) << L(63)) - L(1);
  for (const [start, length] of [
    [max + L(1), L(0)],
    [L(0), max + L(1)],
    [max, L(1)],
    [L(1) << L(62), L(1) << L(62)],
    [(L(1) << L(64)) - L(1), L(1)],
  ]) {
    const e = fsErr(() => f.setRangeLock(start, length, 'exclusive'));
    assert.equal(e.code, 'invalid-argument', `${start}+${length}`);
    assert.match(e.message, /are past any file offset/);
    assert.equal(fsErr(() => f.rangeLockedElsewhere(start, length)).code, 'invalid-argument');
  }
  assert.equal(f.setRangeLock(max, L(0), 'shared'), true, 'the last offset, to the end');
  assert.equal(f.setRangeLock(L(0), max, 'exclusive'), true);
  f.close();
});

test('without the add-on, range locks are unsupported (and nothing else changes)', () => {
  const { fsi } = setup({ addon: null });
  const f = fsi.openReadWrite('cache.db', true);
  const e = fsErr(() => f.setRangeLock(L(0), L(1), 'shared'));
  assert.equal(e.code, 'unsupported');
  assert.match(e.message, /range_lock add-on/);
  assert.equal(fsErr(() => f.rangeLockedElsewhere(L(0), L(1))).code, 'unsupported');
  f.writeAt(0n, new Uint8Array([1]));
  f.close();
});

test('the end of a driver call releases every range lock of the instance, not its flock-style locks', () => {
  const { fsi, ctx, releaseRangeLocks } = setup();
  const other = setup({ dir: ctx.root.real, locks: ctx.locks, wid: 2 });
  fs.mkdirSync(path.join(ctx.root.real, 'own'));
  const a = fsi.openReadWrite('cache.db', true);
  const b = fsi.openReadWrite('own/other.db', true);
  const x = other.fsi.openReadWrite('cache.db', false);
  const y = other.fsi.openReadWrite('own/other.db', false);
  assert.equal(a.setRangeLock(L(0), L(0), 'exclusive'), true);
  assert.equal(b.setRangeLock(L(100), L(1), 'shared'), true);
  assert.equal(a.tryLock(), true, 'a flock-style lock too');
  assert.equal(x.rangeLockedElsewhere(L(0), L(1)), true);
  assert.equal(y.setRangeLock(L(100), L(1), 'exclusive'), false);
  releaseRangeLocks();
  assert.equal(x.rangeLockedElsewhere(L(0), L(0)), false);
  assert.equal(y.setRangeLock(L(100), L(1), 'exclusive'), true);
  assert.equal(x.tryLock(), false, 'the flock-style lock stays (a write session holds it across calls)');
  // The files stay open and usable; they lock again in the next call.
  assert.equal(a.setRangeLock(L(0), L(1), 'shared'), true);
  for (const f of [a, b, x, y]) f.close();
});

/** A worker thread with its own instance's imports on `root`: it opens
 * `rel` read-write and answers {op: 'lock' | 'elsewhere' | 'end-call' |
 * 'close'} messages, as a second driver instance would. */
function lockWorker(root, rel) {
  const imports = new URL('../src/host/imports.js', import.meta.url).href;
  const rootfs = new URL('../src/host/rootfs.js', import.meta.url).href;
  const locks = new URL('../src/host/locks.js', import.meta.url).href;
  const nativeJs = new URL('../src/host/native.js', import.meta.url).href;
  const code = `
    const { parentPort, workerData } = require('node:worker_threads');
    (async () => {
      const { makeImports, Deadline } = await import(${JSON.stringify(imports)});
      const { RootFs } = await import(${JSON.stringify(rootfs)});
      const { Locks, createLockTable, createFdTable } = await import(${JSON.stringify(locks)});
      const { rangeLockAddon } = await import(${JSON.stringify(nativeJs)});
      const native = rangeLockAddon();
      const ctx = { root: new RootFs(workerData.root, { native }), fdTable: createFdTable(8), locks: new Locks(createLockTable()),
        wid: 2, limits: {}, deadline: new Deadline(Date.now() + 60000), native };
      const { imports, releaseRangeLocks } = makeImports(ctx);
      const file = imports.fs.openReadWrite(workerData.rel, true);
      parentPort.on('message', ({ op, start, length, lock }) => {
        if (op === 'lock') parentPort.postMessage(file.setRangeLock(start, length, lock));
        else if (op === 'elsewhere') parentPort.postMessage(file.rangeLockedElsewhere(start, length));
        else if (op === 'end-call') parentPort.postMessage(releaseRangeLocks() ?? true);
        else if (op === 'close') { file.close(); parentPort.postMessage(true); }
      });
      parentPort.postMessage('ready');
    })();`;
  const worker = new Worker(code, { eval: true, workerData: { root, rel } });
  const ask = async (msg) => {
    worker.postMessage(msg);
    const [answer] = await once(worker, 'message');
    return answer;
  };
  return { worker, ask, ready: once(worker, 'message') };
}

test('two instances in two worker threads exclude each other on byte ranges', async () => {
  const { fsi, releaseRangeLocks, ctx } = setup();
  const w = lockWorker(ctx.root.real, 'cache.db');
  try {
    assert.deepEqual(await w.ready, ['ready']);
    const mine = fsi.openReadWrite('cache.db', false);
    // Native SQLite's lock bytes: PENDING, RESERVED, SHARED.
    const PENDING = L(0x40000000);
    assert.equal(await w.ask({ op: 'lock', start: PENDING + L(2), length: L(510), lock: 'shared' }), true);
    assert.equal(mine.setRangeLock(PENDING + L(2), L(510), 'shared'), true, 'two readers');
    assert.equal(await w.ask({ op: 'lock', start: PENDING + L(1), length: L(1), lock: 'exclusive' }), true, 'RESERVED');
    assert.equal(mine.rangeLockedElsewhere(PENDING + L(1), L(1)), true);
    assert.equal(mine.setRangeLock(PENDING + L(1), L(1), 'exclusive'), false, 'one writer');
    assert.equal(await w.ask({ op: 'lock', start: PENDING + L(2), length: L(510), lock: 'exclusive' }), false, 'EXCLUSIVE waits for the other reader');
    releaseRangeLocks(); // the end of this instance's call
    assert.equal(await w.ask({ op: 'lock', start: PENDING + L(2), length: L(510), lock: 'exclusive' }), true);
    assert.equal(mine.setRangeLock(PENDING + L(2), L(510), 'shared'), false);
    assert.equal(await w.ask({ op: 'end-call' }), true); // the end of the other's call
    assert.equal(mine.rangeLockedElsewhere(L(0), L(0)), false, 'nothing outlives the call');
    assert.equal(mine.setRangeLock(L(0), L(0), 'exclusive'), true);
    assert.equal(await w.ask({ op: 'elsewhere', start: L(0), length: L(1) }), true);
    assert.equal(await w.ask({ op: 'lock', start: L(0), length: L(1), lock: 'shared' }), false);
    mine.close();
    assert.equal(await w.ask({ op: 'lock', start: L(0), length: L(1), lock: 'shared' }), true, 'closing the file released its locks');
    await w.ask({ op: 'close' });
  } finally {
    await w.worker.terminate();
  }
});

/** Python's fcntl.lockf: classic POSIX record locks, as native SQLite (and
 * Glance's own processes) take them. */
function python3() {
  return spawnSync('python3', ['-c', 'import fcntl'], { stdio: 'ignore' }).status === 0 ? 'python3' : null;
}

test('across processes: range locks conflict with the POSIX record locks native SQLite takes', { skip: python3() ? false : 'no python3 here' }, async () => {
  const { fsi, ctx } = setup();
  const file = path.join(ctx.root.real, 'cache.db');
  fs.writeFileSync(file, '');
  // Another process holds an exclusive POSIX lock on bytes 100..109 and a
  // shared one on 200..209 until told to stop; then it tries to take
  // bytes 0..9 exclusively (which this process holds by then).
  const script = `
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 100)
fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 10, 200)
print("locked", flush=True)
sys.stdin.readline()
try:
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
    print("took", flush=True)
except OSError:
    print("busy", flush=True)
sys.stdin.readline()
`;
  const child = spawn('python3', ['-c', script, file], { stdio: ['pipe', 'pipe', 'inherit'] });
  const lines = [];
  let waiting = null;
  let buffered = '';
  child.stdout.on('data', (d) => {
    buffered += d;
    let i;
    while ((i = buffered.indexOf('\n')) >= 0) {
      lines.push(buffered.slice(0, i));
      buffered = buffered.slice(i + 1);
      waiting?.();
    }
  });
  const line = () =>
    new Promise((resolve) => {
      const take = () => (lines.length ? resolve(lines.shift()) : (waiting = take));
      take();
    });
  try {
    assert.equal(await line(), 'locked');
    const f = fsi.openReadWrite('cache.db', false);
    assert.equal(f.setRangeLock(L(105), L(1), 'shared'), false, "the other process's exclusive lock");
    assert.equal(f.rangeLockedElsewhere(L(100), L(10)), true);
    assert.equal(f.setRangeLock(L(200), L(10), 'shared'), true, 'shared with its shared lock');
    assert.equal(f.setRangeLock(L(205), L(1), 'exclusive'), false);
    assert.equal(f.rangeLockedElsewhere(L(200), L(1)), true);
    assert.equal(f.rangeLockedElsewhere(L(110), L(90)), false, 'between its locks');
    assert.equal(f.setRangeLock(L(0), L(10), 'exclusive'), true);
    child.stdin.write('\n');
    assert.equal(await line(), 'busy', 'the other process is kept out of what this one holds');
    f.close();
  } finally {
    child.stdin.end('\n');
    await once(child, 'exit');
  }
});

test('a range lock a driver keeps past its call is released when the call ends (hostile driver)', async () => {
  const root = tmp();
  fs.writeFileSync(path.join(root, 'cache.db'), 'database');
  const cache = await ImageCache.open(root, { driver: 'hostile', fallbackToSqlite: false });
  try {
    // The attack opens cache.db read-write, takes an exclusive lock on all
    // of it, keeps the file open past the call and answers whether it got
    // the lock.
    assert.equal(await cache.isCached('hold-range-lock'), true);
    const { fsi } = setup({ dir: root });
    const f = fsi.openReadWrite('cache.db', false);
    assert.equal(f.rangeLockedElsewhere(L(0), L(0)), false, 'the lock did not outlive the call');
    assert.equal(f.setRangeLock(L(0), L(0), 'exclusive'), true);
    // Held here now: the driver's next call cannot take it.
    assert.equal(await cache.isCached('hold-range-lock'), false);
    f.close();
    assert.equal(await cache.isCached('hold-range-lock'), true);
  } finally {
    await cache.close();
  }
});
