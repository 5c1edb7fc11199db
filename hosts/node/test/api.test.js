// The library API beyond the shared scenarios: streams, checksums, bad
// roots, driver swaps, faults in the middle of sessions, and bytes that
// never pass through the guest.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { Readable } from 'node:stream';
import v8 from 'node:v8';
import vm from 'node:vm';
import { spawn } from 'node:child_process';
import { createRequire } from 'node:module';
import { ImageCache, CacheError, stats } from '../src/index.js';
import { usableChecksum } from '../src/driver.js';
import { componentsDir } from '../scripts/transpile.js';

const dirs = [];
const caches = [];
after(async () => {
  for (const c of caches) await c.close().catch(() => {});
  dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true }));
});

function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-api-'));
  dirs.push(d);
  return d;
}

async function open(root = tmp(), options = {}) {
  const c = await ImageCache.open(root, options);
  caches.push(c);
  return c;
}

test('a 64 MiB image moves through a driver capped at 16 MiB of linear memory', async () => {
  const cache = await open(tmp(), { limits: { memoryBytes: 16 << 20 } });
  const image = crypto.randomBytes(64 << 20);
  const sha = crypto.createHash('sha256').update(image).digest('hex');
  assert.equal(await cache.cache('big', image, { checksum: `sha256:${sha}` }), image.length);
  const back = await cache.readImage('big');
  assert.ok(back.equals(image));
  assert.equal(await cache.getHitCount('big'), 1);
  assert.equal(await cache.getImageSize('big'), image.length);
});

test('caching a Node Readable, reading with read() and async iteration', async () => {
  const cache = await open();
  const parts = ['alpha-', 'beta-', 'gamma'];
  assert.equal(await cache.cache('r', Readable.from(parts.map((p) => Buffer.from(p)))), 16);
  const reader = await cache.openForRead('r');
  assert.equal(reader.size, 16);
  const buf = Buffer.alloc(6);
  assert.equal(await reader.read(buf), 6);
  assert.equal(buf.toString(), 'alpha-');
  await reader.close(); // unfinished: no hit
  assert.equal(await cache.getHitCount('r'), 0);
  assert.equal((await cache.readImage('r')).toString(), 'alpha-beta-gamma');
  assert.equal(await cache.getHitCount('r'), 1);
});

test('strict cache(): already cached, being cached and a bad checksum are errors', async () => {
  const cache = await open();
  await cache.cache('x', 'bytes');
  await assert.rejects(cache.cache('x', 'again'), (e) => e instanceof CacheError && e.kind === 'already-cached');
  const w = await cache.openForWrite('y');
  await assert.rejects(cache.cache('y', 'other'), (e) => e.kind === 'being-cached');
  await w.abort('test');
  await assert.rejects(cache.cache('z', 'bytes', { checksum: 'md5:00000000000000000000000000000000' }), (e) => e.kind === 'checksum-mismatch');
  assert.equal(await cache.isCached('z'), false);
  await assert.rejects(cache.cache('z', 'bytes', { checksum: 'crc32:00' }), /unknown checksum algorithm/);
});

for (const driver of ['sqlite', 'xattr']) {
  test(`${driver}: a reader reports the checksum the image was cached with; the read still counts`, async () => {
    const cache = await open(tmp(), { driver, fallbackToSqlite: false });
    assert.equal(cache.driverInfo.name, driver);
    const data = Buffer.from('checksummed image'.repeat(500));
    const md5 = crypto.createHash('md5').update(data).digest('hex');
    const sha256 = crypto.createHash('sha256').update(data).digest('hex');
    const discarded = stats.discarded;
    await cache.cache('md5', data, { checksum: `md5:${md5}` });
    await cache.cache('bare', data, { checksum: md5.toUpperCase() }); // Glance's bare md5
    const tee = await cache.cacheStream('sha', [data], { checksum: `sha256:${sha256}` });
    for await (const _ of tee);
    assert.equal(tee.report.cached, true);
    for (const [id, expected] of [['md5', `md5:${md5}`], ['bare', `md5:${md5}`], ['sha', `sha256:${sha256}`]]) {
      const reader = await cache.openForRead(id);
      assert.equal(await reader.checksum(), expected);
      assert.equal(await reader.checksum(), expected, 'asking again is fine: the read goes on');
      assert.equal(reader.ended, false);
      assert.ok((await reader.readAll()).equals(data), 'the read still completes');
      assert.equal(await reader.checksum(), null, 'the read has ended');
      assert.equal(await cache.getHitCount(id), 1, `${id}: and counts the hit`);
    }
    // Part of the image, the checksum, then the rest: one hit more.
    const reader = await cache.openForRead('md5');
    const head = Buffer.alloc(10);
    assert.equal(await reader.read(head), 10);
    assert.equal(await reader.checksum(), `md5:${md5}`);
    const rest = await reader.readAll();
    assert.ok(Buffer.concat([head, rest]).equals(data));
    assert.equal(await cache.getHitCount('md5'), 2);
    assert.equal(stats.discarded, discarded, 'no instance was discarded');
  });

  test(`${driver}: an image cached without a checksum reports null`, async () => {
    const cache = await open(tmp(), { driver, fallbackToSqlite: false });
    await cache.cache('plain', 'no checksum');
    let reader = await cache.openForRead('plain');
    assert.equal(await reader.checksum(), null);
    assert.equal((await reader.readAll()).toString(), 'no checksum');
    assert.equal(await cache.getHitCount('plain'), 1);
    // The checksum, then a reader closed early: nothing counted.
    reader = await cache.openForRead('plain');
    assert.equal(await reader.checksum(), null);
    await reader.close();
    assert.equal(await cache.getHitCount('plain'), 1);
    // The checksum, then finish() without reading: counted.
    reader = await cache.openForRead('plain');
    assert.equal(await reader.checksum(), null);
    await reader.finish();
    assert.equal(await cache.getHitCount('plain'), 2);
  });
}

test('only checksums that fit in a header are usable', () => {
  for (const good of [`md5:${'a'.repeat(32)}`, '0'.repeat(32), `sha256:${'F'.repeat(64)}`, 'x'.repeat(128), 'b64+/=_-:Zz9']) {
    assert.ok(usableChecksum(good), good);
  }
  for (const bad of ['', 'x'.repeat(129), '0123\r\nSet-Cookie: stolen=1', 'md5 abc', 'md5:"abc"', 'é', 'md5:\u0000', null, undefined, 7]) {
    assert.ok(!usableChecksum(bad), String(bad));
  }
});

test('a root that is a file is a bad configuration naming the root', async () => {
  const file = path.join(tmp(), 'not-a-dir');
  fs.writeFileSync(file, '');
  await assert.rejects(ImageCache.open(file), (e) => {
    assert.equal(e.kind, 'bad-configuration');
    assert.ok(e.message.includes(file), e.message);
    assert.match(e.message, /not a directory/);
    return true;
  });
});

test('an unknown driver file is a load error; the fallback to sqlite can be switched off', async () => {
  const root = tmp();
  const bogus = path.join(root, '..', 'bogus.wasm');
  fs.writeFileSync(bogus, 'not wasm');
  await assert.rejects(ImageCache.open(root, { driver: bogus, fallbackToSqlite: false }), (e) => e.kind === 'load');
  const warnings = [];
  const cache = await open(root, { driver: bogus, onWarning: (m) => warnings.push(m) });
  assert.equal(cache.driverInfo.name, 'sqlite');
  assert.match(warnings[0], /falling back to the sqlite driver/);
});

test('swapDriver: the new driver serves, sessions open on the old one finish there', async () => {
  const root = tmp();
  const cache = await open(root);
  await cache.cache('before', 'one');
  const w = await cache.openForWrite('during');
  await w.write('two');
  await cache.swapDriver(path.join(componentsDir(), 'sqlite_driver.wasm'));
  assert.equal(cache.driverInfo.component, 'sqlite_driver');
  await w.commit();
  assert.equal((await cache.readImage('during')).toString(), 'two');
  assert.equal((await cache.readImage('before')).toString(), 'one');
  await assert.rejects(cache.swapDriver(path.join(root, 'missing.wasm')), (e) => e.kind === 'load');
  assert.equal(await cache.isCached('before'), true, 'a failed swap keeps the driver');
});

test('a fault on the instance ends its open sessions; the next call gets a fresh instance', async () => {
  const cache = await open(tmp(), { driver: 'hostile', fallbackToSqlite: false, limits: { callDeadlineMs: 300 } });
  // The hostile driver hands out no write sessions, but a read of its
  // database is refused too; so fault it while nothing is open, then check
  // the instance is fresh.
  await assert.rejects(cache.isCached('panic'), (e) => e.kind === 'driver-fault');
  assert.equal(await cache.isCached('benign'), false);

  const good = await open();
  await good.cache('img', 'data');
  const reader = await good.openForRead('img');
  // Stop the good driver's instance under the open session (as a deadline
  // would): the session reports the fault; the cache keeps working.
  good.driver.discard(good.driver.instance, new CacheError('driver-fault', 'stopped by the test'));
  await assert.rejects(reader.finish(), (e) => e.kind === 'driver-fault');
  assert.equal((await good.readImage('img')).toString(), 'data');
});

test('listCached and queue are the Glance names of getCachedImages and queueImage', async () => {
  const cache = await open();
  await cache.cache('b', 'x');
  await cache.cache('a', 'yy');
  assert.deepEqual((await cache.listCached()).map((i) => [i.imageId, i.size]), [['a', 2], ['b', 1]]);
  assert.equal(await cache.queue('c'), true);
  assert.equal(await cache.queue('a'), false);
  assert.deepEqual(await cache.getQueuedImages(), ['c']);
});

test('a session the application forgets is closed and aborted when it is collected', async () => {
  v8.setFlagsFromString('--expose-gc');
  const gc = vm.runInNewContext('gc');
  const cache = await open();
  await (async () => {
    const w = await cache.openForWrite('forgotten');
    await w.write('partial');
  })();
  for (let i = 0; i < 20 && !fs.existsSync(path.join(cache.root, 'invalid', 'forgotten')); i++) {
    gc();
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.deepEqual(fs.readdirSync(path.join(cache.root, 'invalid')), ['forgotten'], 'aborted as an incomplete fetch');
  assert.deepEqual(fs.readdirSync(path.join(cache.root, 'incomplete')), []);
  assert.equal(await cache.isCached('forgotten'), false);
});

test('two caches on one root in one process: writers exclude each other, readers see each other', async () => {
  const root = tmp();
  const a = await open(root);
  const b = await open(root);
  const w = await a.openForWrite('img');
  await w.write('from a');
  await assert.rejects(b.openForWrite('img'), (e) => e.kind === 'being-cached');
  assert.equal(await b.isBeingCached('img'), true);
  await w.commit();
  assert.equal((await b.readImage('img')).toString(), 'from a');
  assert.equal(await a.getHitCount('img'), 1);
});

test('new ImageCache(root, options) points to ImageCache.open', () => {
  assert.throws(() => new ImageCache(tmp(), { driver: 'sqlite' }), /await ImageCache\.open\(root, options\)/);
});

test('a driver whose stopped instances keep running gets no new instance until they end', async () => {
  const cache = await open(tmp(), { limits: { maxStoppedRunning: 1 } });
  const driver = cache.driver;
  // An instance whose thread will not end (as one inside a long SQLite
  // statement): stopping it leaves it running.
  let end;
  const stuck = { ...driver.instance, dead: false, sessions: new Set(), pending: new Map() };
  stuck.worker = { terminate: () => new Promise((r) => (end = r)) };
  driver.discard(driver.instance, new CacheError('driver-fault', 'test')); // the real one
  await new Promise((r) => setTimeout(r, 100));
  driver.discard(stuck, new CacheError('driver-fault', 'test'));
  await assert.rejects(cache.isCached('x'), (e) => e.kind === 'overloaded' && /still running/.test(e.message));
  end();
  await new Promise((r) => setImmediate(r));
  assert.equal(await cache.isCached('x'), false, 'a new instance once it ended');
});

test('file locks are flock(2): a writer of another process that holds its lock is not taken over', async () => {
  const root = tmp();
  const cache = await open(root);
  const stale = path.join(root, 'incomplete', 'img');
  fs.writeFileSync(stale, 'partial');
  const old = Date.now() / 1000 - 60;
  fs.utimesSync(stale, old, old); // untouched for a minute: a takeover candidate
  const fsExt = createRequire(import.meta.url).resolve('fs-ext');
  const holder = spawn(
    process.execPath,
    ['-e', `const fe = require(${JSON.stringify(fsExt)}); const fd = require('fs').openSync(${JSON.stringify(stale)}, 'r'); fe.flockSync(fd, 'ex'); console.log('locked'); setInterval(() => {}, 1000);`],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  try {
    await new Promise((resolve, reject) => {
      holder.stdout.once('data', resolve);
      holder.once('exit', () => reject(new Error('the lock holder exited')));
    });
    await assert.rejects(cache.openForWrite('img'), (e) => e.kind === 'being-cached');
    assert.equal(fs.readFileSync(stale, 'utf8'), 'partial', 'its file is untouched');
  } finally {
    holder.kill();
    await new Promise((r) => (holder.exitCode !== null ? r() : holder.once('exit', r)));
  }
  // The holder is gone: its lock with it; the stalled file is taken over.
  const w = await cache.openForWrite('img');
  await w.write('fresh');
  await w.commit();
  assert.equal((await cache.readImage('img')).toString(), 'fresh');
  assert.deepEqual(fs.readdirSync(path.join(root, 'invalid')), ['img']);
});

test('a prune too long for one call takes several, reported as one', async () => {
  // Each driver call evicts for image_cache_evict_seconds at most; with 0
  // every call takes one batch (100 images): 250 go in three calls.
  const c = await open(tmp(), { driver: 'sqlite', driverOptions: { image_cache_evict_seconds: '0' } });
  for (let i = 0; i < 250; i++) await c.cache(`img-${String(i).padStart(3, '0')}`, Buffer.from('0123456789'));
  const report = await c.prune(0);
  const ids = report.removed.map((r) => r.imageId);
  assert.equal(ids.length, 250, report.failures.join('; '));
  assert.deepEqual(ids, [...ids].sort());
  assert.equal(report.bytesRemoved, 2500);
  assert.equal(report.sizeAfter, 0);
  for (let i = 0; i < 120; i++) await c.cache(`again-${String(i).padStart(3, '0')}`, Buffer.from('x'));
  assert.equal(await c.deleteAllCachedImages(), 120);
  assert.deepEqual(await c.listCached(), []);
});
