// The host imports on their own, without wasm: fs (beneath-root paths),
// sqlite (names, gate, values, caps), locks, xattr (unsupported).

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { RootFs } from '../src/host/rootfs.js';
import { makeImports, Deadline } from '../src/host/imports.js';
import { Locks, createLockTable, createFdTable } from '../src/host/locks.js';
import { gate } from '../src/host/sqlgate.js';
import * as xattrLib from 'fs-xattr';

const dirs = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));

function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-imports-'));
  dirs.push(d);
  return d;
}

function setup({ openFiles = 16, connections = 4, maxQueryBytes = 1 << 20, maxListing, xattrLib = null } = {}) {
  const dir = tmp();
  const ctx = {
    root: new RootFs(dir, { maxListing }),
    fdTable: createFdTable(openFiles),
    locks: new Locks(createLockTable()),
    wid: 1,
    limits: { connections, maxQueryBytes },
    deadline: new Deadline(Date.now() + 10_000),
    connections: 0,
    databases: new Set(),
    xattrLib,
  };
  const { File, imports } = makeImports(ctx);
  return { dir, ctx, File, imports, fsi: imports.fs };
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
    () => fsi.rename('linkdir/secret', 'stolen'),
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

test('create-new is exclusive, and open takes regular files only (a FIFO does not block)', () => {
  const { dir, fsi } = setup();
  const f = fsi.createNew('x');
  assert.equal(fsErr(() => fsi.createNew('x')).code, 'already-exists');
  f.close();
  fs.mkdirSync(path.join(dir, 'd'));
  assert.equal(fsErr(() => fsi.open('d')).code, 'is-a-directory');
  const fifo = path.join(dir, 'fifo');
  assert.ok(spawnMkfifo(fifo), 'mkfifo');
  assert.equal(fsErr(() => fsi.open('fifo')).code, 'is-a-directory');
});

function spawnMkfifo(p) {
  try {
    execFileSync('mkfifo', [p]);
    return true;
  } catch {
    return false;
  }
}

test('open files per instance are capped and closing frees the slot', () => {
  const { fsi, ctx } = setup({ openFiles: 3 });
  fsi.createNew('f').close();
  const held = [fsi.open('f'), fsi.open('f'), fsi.open('f')];
  const e = fsErr(() => fsi.open('f'));
  assert.equal(e.code, 'limit-exceeded');
  assert.match(e.message, /at most 3 open files/);
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

test('xattr attributes live on the open file (through /proc/self/fd), user.* only, capped', () => {
  const outside = tmp();
  fs.writeFileSync(path.join(outside, 'target'), '');
  const { dir, imports, fsi } = setup({ xattrLib });
  const x = imports.xattr;
  const f = fsi.createNew('img');
  assert.equal(fsErr(() => x.get(f, 'user.hits')).code, 'not-found');
  x.set(f, 'user.hits', new Uint8Array([0x33]));
  assert.deepEqual(x.get(f, 'user.hits'), new Uint8Array([0x33]));
  assert.deepEqual(x.listNames(f), ['user.hits']);
  // Renamed under it, or its name taken by a symlink out: the attribute
  // still goes to the open file, never to what the name now points at.
  fsi.rename('img', 'renamed');
  fs.symlinkSync(path.join(outside, 'target'), path.join(dir, 'img'));
  x.set(f, 'user.hits', new Uint8Array([0x34]));
  const again = fsi.open('renamed');
  assert.deepEqual(x.get(again, 'user.hits'), new Uint8Array([0x34]));
  assert.deepEqual(xattrLib.listAttributesSync(path.join(outside, 'target')).filter((n) => n.startsWith('user.')), []);
  x.remove(f, 'user.hits');
  x.remove(f, 'user.hits'); // a missing one is fine
  assert.equal(fsErr(() => x.set(f, 'trusted.hits', new Uint8Array([1]))).code, 'access-denied');
  assert.equal(fsErr(() => x.set(f, 'user.big', new Uint8Array(64 * 1024 + 1))).code, 'limit-exceeded');
  x.probe();
  assert.deepEqual(fs.readdirSync(dir).sort(), ['img', 'renamed'], 'the probe leaves nothing');
  f.close();
  again.close();
});

// ---- sqlite ----

function sqlErr(fn) {
  try {
    fn();
  } catch (e) {
    assert.ok(e.payload, `an error with a payload: ${e}`);
    return e.payload;
  }
  assert.fail('expected an error');
}

test('sqlite opens only plain names in the root, never through a symlink', () => {
  const outside = tmp();
  const { dir, imports } = setup();
  const { Connection } = imports.sqlite;
  for (const name of ['', '.', '..', '../x.db', '/tmp/x.db', 'a/b.db', ':memory:', 'file:x.db?mode=ro', 'a\\b']) {
    assert.equal(sqlErr(() => Connection.open(name)).code, 'access-denied', name);
  }
  fs.symlinkSync(path.join(outside, 'victim.db'), path.join(dir, 'link.db'));
  assert.equal(sqlErr(() => Connection.open('link.db')).code, 'access-denied');
  fs.symlinkSync(path.join(outside, 'wal'), path.join(dir, 'ok.db-wal'));
  assert.equal(sqlErr(() => Connection.open('ok.db')).code, 'access-denied');
  assert.deepEqual(fs.readdirSync(outside), []);
});

test('sqlite executes and queries with typed values', () => {
  const { imports } = setup();
  const c = imports.sqlite.Connection.open('t.db');
  c.executeBatch('CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n); CREATE INDEX ti ON t (i);');
  const values = [
    { tag: 'integer', val: 9007199254740993n },
    { tag: 'real', val: 1.5 },
    { tag: 'text', val: 'héllo' },
    { tag: 'blob', val: new Uint8Array([0, 1, 255]) },
    { tag: 'null' },
  ];
  assert.equal(c.execute('INSERT INTO t VALUES (?, ?, ?, ?, ?)', values), 1n);
  const rows = c.query('SELECT i, r, s, b, n FROM t WHERE i = ?', [{ tag: 'integer', val: 9007199254740993n }]);
  assert.deepEqual(rows, [values]);
  assert.equal(c.execute('PRAGMA journal_mode = WAL', []), 0n, 'rows a statement returns are skipped');
  assert.equal(sqlErr(() => c.execute('INSERT INTO t (i) VALUES (1); INSERT INTO t (i) VALUES (2)', [])).code, 'access-denied');
  c.execute('CREATE TABLE u (k TEXT PRIMARY KEY)', []);
  c.execute('INSERT INTO u VALUES (?)', [{ tag: 'text', val: 'a' }]);
  assert.equal(sqlErr(() => c.execute('INSERT INTO u VALUES (?)', [{ tag: 'text', val: 'a' }])).code, 'constraint');
  c.close();
});

test('sqlite results, values, SQL text and connections are capped', () => {
  const { imports } = setup({ maxQueryBytes: 10_000, connections: 2 });
  const { Connection } = imports.sqlite;
  const c = Connection.open('t.db');
  c.execute('CREATE TABLE t (s TEXT)', []);
  for (let i = 0; i < 20; i++) c.execute('INSERT INTO t VALUES (?)', [{ tag: 'text', val: 'x'.repeat(1000) }]);
  const e = sqlErr(() => c.query('SELECT s FROM t', []));
  assert.equal(e.code, 'limit-exceeded');
  assert.equal(sqlErr(() => c.query('SELECT zeroblob(100000000)', [])).code, 'limit-exceeded');
  assert.equal(sqlErr(() => c.query(`SELECT '${'x'.repeat(1024 * 1024)}'`, [])).code, 'limit-exceeded');
  const d = Connection.open('t.db');
  assert.match(sqlErr(() => Connection.open('t.db')).message, /at most 2 database connections/);
  d.close();
  Connection.open('t.db').close();
  c.close();
});

test('sqlite waits for another connection only until the deadline (busy)', () => {
  const { imports, ctx } = setup();
  const { Connection } = imports.sqlite;
  const a = Connection.open('t.db');
  const b = Connection.open('t.db');
  a.execute('CREATE TABLE t (x)', []);
  a.execute('BEGIN IMMEDIATE', []);
  ctx.deadline = new Deadline(Date.now() + 200);
  const started = Date.now();
  assert.equal(sqlErr(() => b.execute('INSERT INTO t VALUES (1)', [])).code, 'busy');
  assert.ok(Date.now() - started < 2000);
  ctx.deadline = new Deadline(Date.now() + 10_000);
  a.execute('ROLLBACK', []);
  a.close();
  b.close();
});

test('the statement gate allows what the drivers need and refuses the rest', () => {
  const allowed = [
    'CREATE TABLE IF NOT EXISTS cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0, last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0, checksum TEXT); CREATE INDEX IF NOT EXISTS cached_images_last_accessed ON cached_images (last_accessed, image_id);',
    'PRAGMA journal_mode=WAL',
    'PRAGMA synchronous=NORMAL',
    'INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits) VALUES (?, ?, ?, ?, 1) ON CONFLICT(image_id) DO UPDATE SET hits = hits + 1, last_accessed = excluded.last_accessed',
    'SELECT count(*), coalesce(sum(size), 0) FROM cached_images WHERE image_id IN (?, ?)',
    'CREATE TABLE t (a VARCHAR(32), b DECIMAL(10, 2))',
    'WITH x(a) AS (SELECT 1) SELECT a FROM x',
    'BEGIN IMMEDIATE',
    'PRAGMA main.user_version = 3',
  ];
  for (const sql of allowed) gate(sql, { batch: true });
  const refused = [
    "ATTACH DATABASE '/tmp/x' AS stolen",
    "VACUUM INTO '/tmp/x'",
    'PRAGMA hard_heap_limit = 1',
    "PRAGMA temp_store_directory = '/tmp'",
    'PRAGMA database_list',
    'PRAGMA writable_schema = 1',
    'PRAGMA journal_mode = OFF',
    'SELECT file FROM pragma_database_list',
    'WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c',
    "SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')",
    "select LOAD_EXTENSION ('x')",
    'SELECT "load_extension"(\'x\')',
    "INSERT INTO t SELECT 1, load_extension('x')",
    'INSERT INTO t VALUES ("load_extension"(\'x\'))',
    "INSERT INTO t VALUES (`load_extension`('x'))",
    "CREATE TABLE t (a DEFAULT ([load_extension]('x')))",
    "SELECT load_extension/**/('x')",
    "CREATE TABLE t AS SELECT load_extension('x')",
    "CREATE INDEX i ON t(load_extension('x'))",
    "SELECT * FROM a JOIN b ON load_extension('x')",
    "WITH a AS (SELECT 1), b AS (SELECT fts3_tokenizer('x')) SELECT 1",
    'CREATE TEMP TABLE x (a)',
    'CREATE VIEW v AS SELECT 1',
    "CREATE VIRTUAL TABLE v USING fts5(x)",
    'SELECT * FROM sqlite_dbpage',
    'SELECT * FROM "temp".sqlite_master',
    "SELECT 1; ATTACH 'x' AS y",
  ];
  for (const sql of refused) assert.throws(() => gate(sql, { batch: true }), /may not do this/, sql);
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
