// The hostile driver (guest/hostile) in the Node host: each attack gets the
// host's refusal (or a fault that discards only that instance), nothing
// outside the root changes, the root's location is in no message, and the
// next call works. The same attacks as tests/hostile.rs and
// tests/attacks.rs in the Rust host.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import Database from 'better-sqlite3';
import { ImageCache, stats } from '../src/index.js';
import { componentsDir } from '../scripts/transpile.js';

const componentFile = (name) => path.join(componentsDir(), name);

const DEADLINE_MS = 500;
let top;
let root;
let canary;
let cache;
let canaryBefore;

function canaryState() {
  return fs
    .readdirSync(canary)
    .sort()
    .map((n) => {
      const st = fs.statSync(path.join(canary, n));
      return `${n}:${st.size}:${st.mtimeMs}`;
    });
}

function openFds() {
  return fs.readdirSync('/proc/self/fd').length;
}

/** Open descriptors once stopped worker threads have exited (their
 * descriptors close asynchronously, later on a busy machine): waits until
 * at most `fds` are open, for up to 5 s, and returns the count. */
async function openFdsSettled(fds) {
  const until = Date.now() + 5000;
  let now = openFds();
  while (now > fds && Date.now() < until) {
    await new Promise((r) => setTimeout(r, 50));
    now = openFds();
  }
  return now;
}

before(async () => {
  top = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-hostile-'));
  root = path.join(top, 'root');
  canary = path.join(top, 'canary');
  fs.mkdirSync(canary);
  fs.writeFileSync(path.join(canary, 'secret'), 'do not read');
  const victim = new Database(path.join(canary, 'victim.db'));
  victim.exec("CREATE TABLE t (x); INSERT INTO t VALUES ('victim');");
  victim.close();
  canaryBefore = canaryState();
  cache = await ImageCache.open(root, {
    driver: 'hostile',
    fallbackToSqlite: false,
    limits: { callDeadlineMs: DEADLINE_MS, memoryBytes: 64 << 20, openFiles: 64 },
    driverOptions: { hostile_target: path.join(canary, 'victim.db') },
  });
});

after(async () => {
  await cache?.close();
  assert.deepEqual(canaryState(), canaryBefore, 'nothing outside the root changed');
  assert.ok(!fs.existsSync(path.join(top, 'hostile-planted.db')));
  assert.ok(!fs.existsSync('hostile-planted.db'), 'nothing in the working directory');
  fs.rmSync(top, { recursive: true, force: true });
});

/** The error an attack gets; the root's location is not in it; the next
 * call works. */
async function refusal(attack) {
  let error;
  try {
    const v = await cache.isCached(attack);
    assert.fail(`${attack}: the attack succeeded (${v})`);
  } catch (e) {
    if (e instanceof assert.AssertionError) throw e;
    error = e;
  }
  assert.ok(!error.message.includes(root), `${attack}: the root's location leaked: ${error.message}`);
  assert.equal(await cache.isCached('benign'), false, `${attack}: the next call works`);
  return error;
}

async function databaseRefusal(attack, code) {
  const e = await refusal(attack);
  assert.equal(e.kind, 'database', `${attack}: ${e.kind}: ${e.message}`);
  assert.ok(e.message.includes(code), `${attack}: expected ${code}: ${e.message}`);
  return e.message;
}

async function fault(attack) {
  const discarded = stats.discarded;
  const e = await refusal(attack);
  assert.equal(e.kind, 'driver-fault', `${attack}: ${e.kind}: ${e.message}`);
  assert.equal(stats.discarded, discarded + 1, `${attack}: the instance is discarded`);
  return e.message;
}

test('SQL cannot attach files outside the root', async () => {
  for (const attack of ['sql-attach', 'sql-attach-relative', 'sql-attach-uri']) {
    const m = await databaseRefusal(attack, 'AccessDenied');
    assert.match(m, /ATTACH/);
  }
});

test('SQL cannot write a file with VACUUM INTO', async () => {
  const m = await databaseRefusal('sql-vacuum-into', 'AccessDenied');
  assert.match(m, /VACUUM/);
  assert.ok(!fs.existsSync(path.join(canary, 'victim.db-journal')));
});

test('SQL cannot change process-wide SQLite state', async () => {
  for (const attack of ['sql-heap-limit', 'sql-soft-heap-limit', 'sql-temp-dir']) {
    await databaseRefusal(attack, 'AccessDenied');
  }
  // The embedding application's own SQLite is unlimited still.
  const mine = new Database(':memory:');
  assert.equal(Number(mine.pragma('hard_heap_limit', { simple: true })), 0);
  assert.equal(Number(mine.pragma('soft_heap_limit', { simple: true })), 0);
  mine.exec('CREATE TABLE x (y); INSERT INTO x VALUES (zeroblob(1000000));');
  mine.close();
});

test('SQL cannot learn where its files are, nor load code', async () => {
  await databaseRefusal('sql-database-list', 'AccessDenied');
  await databaseRefusal('sql-pragma-table', 'AccessDenied');
  const m = await databaseRefusal('sql-load-extension', 'AccessDenied');
  assert.match(m, /load_extension/);
});

test('a runaway recursive query is refused before it runs', async () => {
  // No progress handler in better-sqlite3: the gate refuses recursion, the
  // one way to loop without data (README: what Node cannot guarantee).
  const started = Date.now();
  const m = await databaseRefusal('sql-runaway', 'AccessDenied');
  assert.match(m, /RECURSIVE/);
  assert.ok(Date.now() - started < DEADLINE_MS, 'refused, not run');
});

test('huge values are refused', async () => {
  const m = await databaseRefusal('sql-zeroblob', 'LimitExceeded');
  assert.match(m, /too big/);
});

test('connections per instance are capped', async () => {
  const m = await databaseRefusal('sql-connections', 'LimitExceeded');
  assert.match(m, /after 4 connections/);
});

test('open files per instance are capped, and all of them are closed again', async () => {
  const fds = openFds();
  const e = await refusal('exhaust-handles');
  assert.equal(e.kind, 'io', e.message);
  assert.match(e.message, /after 64 handles: .*at most 64 open files/);
  assert.equal(openFds(), fds, 'no descriptor leaked');
});

test('a driver that spins is stopped at its deadline', async () => {
  const started = Date.now();
  const m = await fault('spin');
  assert.match(m, /deadline of 500 ms/);
  assert.ok(Date.now() - started < DEADLINE_MS + 3000, 'stopped, not waited out');
});

test('a lock never waits past the deadline', async () => {
  const started = Date.now();
  const m = await fault('lock-forever');
  // The lock gives up at the deadline (TimedOut), or the worker is stopped
  // first: either way a deadline fault, on time.
  assert.match(m, /deadline/);
  assert.ok(Date.now() - started < DEADLINE_MS + 3000);
});

test('a driver that allocates without end hits its memory cap', async () => {
  const started = Date.now();
  const m = await fault('alloc');
  assert.match(m, /exceeded its memory cap of 67108864 bytes/);
  assert.ok(Date.now() - started < 10_000);
});

test('a driver that panics gets an error for that call', async () => {
  const m = await fault('panic');
  assert.match(m, /unreachable/);
  assert.ok(!m.includes('\n'), `one line: ${m}`);
});

test('escapes through fs, xattr and database names are refused by the host', async () => {
  const discarded = stats.discarded;
  assert.match((await refusal('escape-parent')).message, /`\.\.` is not allowed/);
  assert.match((await refusal('escape-absolute')).message, /absolute paths are not allowed/);
  assert.match((await refusal('trusted-xattr')).message, /only user\.\* names are allowed/);
  assert.match((await refusal('escape-db')).message, /not a plain file name in the cache root/);
  assert.ok(!fs.existsSync(path.join(top, 'outside.db')));
  assert.equal(stats.discarded, discarded, 'refusals are values, not faults');
});

test('a time before 1970 is an error, not a host crash', async () => {
  const e = await refusal('set-times-negative');
  assert.equal(e.kind, 'io');
  assert.match(e.message, /InvalidArgument/);
  assert.match(e.message, /not a usable time/);
});

test('a flood of error text is cut and made printable', async () => {
  const e = await refusal('error-flood');
  assert.equal(e.kind, 'io');
  assert.ok(e.message.length < 2000, `cut: ${e.message.length}`);
  assert.ok(!e.message.includes('\u001b'), 'no terminal escapes');
  assert.match(e.message, /flood/);
});

test('a write session must hand back its own incomplete file', async () => {
  const discarded = stats.discarded;
  await assert.rejects(cache.openForWrite('wrong-file'), (e) => {
    assert.equal(e.kind, 'driver-fault');
    assert.match(e.message, /handed back "decoy".*incomplete\/wrong-file/);
    return true;
  });
  assert.equal(stats.discarded, discarded + 1);
  assert.equal(await cache.isCached('benign'), false);
});

test('a read session must hand back the cached image', async () => {
  await assert.rejects(cache.openForRead('read-db'), (e) => {
    assert.equal(e.kind, 'driver-fault');
    assert.match(e.message, /handed back "hostile\.db".*read-db/);
    return true;
  });
});

test('a checksum that would inject a header is a fault; the read ends, the next call works', async () => {
  fs.writeFileSync(path.join(cache.root, 'bad-checksum'), 'image bytes');
  const discarded = stats.discarded;
  const fds = openFds();
  const reader = await cache.openForRead('bad-checksum');
  await assert.rejects(reader.checksum(), (e) => {
    assert.equal(e.kind, 'driver-fault');
    assert.match(e.message, /the checksum of "bad-checksum" is not a short token of letters, digits and \+\/=_:-/);
    assert.ok(!e.message.includes('Set-Cookie') && !e.message.includes('\n'), e.message);
    assert.ok(!e.message.includes(root) && !e.message.includes(cache.root), e.message);
    return true;
  });
  assert.equal(stats.discarded, discarded + 1, 'the instance is discarded');
  assert.equal(reader.ended, true, 'the read has ended');
  assert.equal(await reader.checksum(), null);
  await reader.close();
  assert.equal(await cache.isCached('benign'), false, 'the next call works');
  // A fresh session on the fresh instance is refused the same way.
  const again = await cache.openForRead('bad-checksum');
  await assert.rejects(again.checksum(), (e) => e.kind === 'driver-fault');
  assert.equal(await cache.isCached('benign'), false);
  const now = await openFdsSettled(fds);
  assert.ok(now <= fds, `no descriptor leaked: ${now} open, ${fds} before`);
});

test('ids and listings from a driver are checked before the host uses them', async () => {
  assert.equal(await cache.queueImage('bad-ids'), false);
  await assert.rejects(cache.getQueuedImages(), /get-queued-images returned invalid image id "\.\.\/\.\.\/etc\/passwd"/);
  await assert.rejects(cache.getLeastRecentlyAccessedBatch(3), /asked for 3 LRU entries, got 8/);
  await assert.rejects(cache.getCachedImages(), /not ordered by id/);
  assert.equal(await cache.isCached('benign'), false);
});

test('a hostile component loaded from a file gets the same refusals', async () => {
  const component = componentFile('hostile_driver.wasm');
  assert.ok(fs.existsSync(component), `${component} (the built component)`);
  const other = await ImageCache.open(path.join(top, 'root2'), { driver: component, fallbackToSqlite: false });
  try {
    await assert.rejects(other.isCached('escape-parent'), /`\.\.` is not allowed/);
    await assert.rejects(other.isCached('sql-heap-limit'), /AccessDenied/);
    assert.equal(await other.isCached('benign'), false);
  } finally {
    await other.close();
  }
});

test('a component asking for an interface it was not granted is refused at load', async () => {
  const component = componentFile('hostile_driver.wasm');
  await assert.rejects(
    ImageCache.open(path.join(top, 'root3'), { driver: component, fallbackToSqlite: false, grants: ['sqlite'] }),
    (e) => {
      assert.equal(e.kind, 'load');
      assert.match(e.message, /imports image-cache:driver\/xattr@0\.2\.0, which it was not granted/);
      return true;
    },
  );
});

test('stopping an instance leaves no descriptor of it open', async () => {
  await databaseRefusal('sql-connections', 'LimitExceeded'); // the instance has used databases
  const fds = openFds();
  await fault('spin');
  const now = await openFdsSettled(fds);
  assert.ok(now <= fds, `${now} open, ${fds} before`);
});
