// The host's seal (as host/src/driver.rs): every image committed through
// the host carries `user.image-cache.id = <id>` on its file, set by the host
// (in the instance's worker, through /proc/self/fd) right before the
// driver's commit; a read session that hands back a file sealed as another
// id is a driver fault before a byte is served. Files without a seal
// (release 0.2's, Glance's, a file system without user attributes) read as
// before. Skipped, saying why, where the file system has no user xattrs.

import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import * as xattrLib from 'fs-xattr';
import { ImageCache, stats } from '../src/index.js';
import { SEAL } from '../src/host/imports.js';

const dirs = [];
const caches = [];
after(async () => {
  for (const c of caches) await c.close().catch(() => {});
  dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true }));
});

function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-seal-'));
  dirs.push(d);
  return d;
}

/** Why this directory's file system cannot carry seals, or null. */
function noUserXattrs(dir) {
  const probe = path.join(dir, '.seal-test-probe');
  fs.writeFileSync(probe, '');
  try {
    xattrLib.setAttributeSync(probe, 'user.seal-test', '1');
    return null;
  } catch (e) {
    if (['ENOTSUP', 'EOPNOTSUPP', 'EPERM'].includes(e?.code)) {
      return `${dir}: the file system stores no user extended attributes (${e.code}): no seals here`;
    }
    throw e;
  } finally {
    fs.rmSync(probe);
  }
}

/** A fresh cache on `driver`, or null after skipping the test (printed). */
async function sealedCache(t, driver) {
  const root = tmp();
  const why = noUserXattrs(root);
  if (why) {
    console.log(`# skipped: ${why}`);
    t.skip(why);
    return null;
  }
  const cache = await ImageCache.open(root, { driver, fallbackToSqlite: false });
  caches.push(cache);
  return { cache, root };
}

const sealOf = (file) => {
  try {
    return xattrLib.getAttributeSync(file, SEAL).toString();
  } catch (e) {
    if (e?.code === 'ENODATA') return null;
    throw e;
  }
};

for (const driver of ['sqlite', 'xattr']) {
  test(`${driver}: an image committed through the host carries its seal`, async (t) => {
    const s = await sealedCache(t, driver);
    if (!s) return;
    const { cache, root } = s;
    await cache.cache('img-1', 'sealed bytes');
    const w = await cache.openForWrite('img-2');
    await w.write('written, then committed');
    await w.commit();
    assert.equal(sealOf(path.join(root, 'img-1')), 'img-1');
    assert.equal(sealOf(path.join(root, 'img-2')), 'img-2');
    // An aborted write is never sealed (the seal comes at commit).
    const a = await cache.openForWrite('aborted');
    await a.write('half');
    await a.abort('no');
    assert.deepEqual(fs.readdirSync(path.join(root, 'invalid')), ['aborted']);
    assert.equal(sealOf(path.join(root, 'invalid', 'aborted')), null);
    assert.equal((await cache.readImage('img-1')).toString(), 'sealed bytes');
  });

  test(`${driver}: a file sealed as another image is refused before a byte is read`, async (t) => {
    const s = await sealedCache(t, driver);
    if (!s) return;
    const { cache, root } = s;
    await cache.cache('A', 'image A');
    await cache.cache('B', 'image B');
    // B's file now says it was committed as A (as if a driver had renamed
    // A's file over B).
    xattrLib.setAttributeSync(path.join(root, 'B'), SEAL, 'A');
    const discarded = stats.discarded;
    const atime = fs.statSync(path.join(root, 'B'), { bigint: true }).atimeNs;
    await assert.rejects(cache.openForRead('B'), (e) => {
      assert.equal(e.kind, 'driver-fault', e.message);
      assert.ok(
        e.message.includes('it broke the driver contract: the read session of "B" handed back the file committed as "A"'),
        e.message,
      );
      return true;
    });
    assert.equal(stats.discarded, discarded + 1, 'the instance is discarded');
    assert.equal(fs.statSync(path.join(root, 'B'), { bigint: true }).atimeNs, atime, 'nothing was read');
    await assert.rejects(cache.readImage('B'), (e) => e.kind === 'driver-fault');
    assert.equal(await cache.getHitCount('B'), 0, 'no read counted');
    // The next call works; A is untouched.
    assert.equal((await cache.readImage('A')).toString(), 'image A');
    // Its own seal, or none at all (release 0.2, Glance), reads as before.
    xattrLib.setAttributeSync(path.join(root, 'B'), SEAL, 'B');
    assert.equal((await cache.readImage('B')).toString(), 'image B');
    xattrLib.removeAttributeSync(path.join(root, 'B'), SEAL);
    assert.equal((await cache.readImage('B')).toString(), 'image B');
    assert.equal(await cache.getHitCount('B'), 2);
  });
}
