// Image ids: the image-id crate's rule (image-id/src/lib.rs), ported, and
// applied in the main thread before any worker sees an id; integers (as
// Glance passes them) taken as their digits; anything else refused.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ImageCache, CacheError, validateImageId } from '../src/index.js';
import { idProblem, refusal, hidden, rustDebug, MAX_ID_BYTES } from '../src/errors.js';

const dirs = [];
const caches = [];
after(async () => {
  for (const c of caches) await c.close().catch(() => {});
  dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true }));
});

async function open(options = {}) {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-ids-'));
  dirs.push(d);
  const c = await ImageCache.open(d, options);
  caches.push(c);
  return c;
}

test('the rule is the image-id crate\'s: its test cases, fast path and full check agree', () => {
  // image-id/src/lib.rs, the_fast_path_and_the_full_check_agree.
  const cases = ['1', 'xxx', 'a.b', '...', 'é', '.', '..', '', 'a/b', 'a\\b', 'a\0b', 'a\nb', '\u0085', '\u007f', ' ', 'a\u202eb', '\u200b', '\ufeffx'];
  for (const id of cases) {
    const fast =
      id.length > 0 &&
      Buffer.byteLength(id) <= MAX_ID_BYTES &&
      id !== '.' &&
      id !== '..' &&
      !id.includes('/') &&
      !id.includes('\\') &&
      !Array.from(id).some(hidden);
    assert.equal(idProblem(id) === null, fast, JSON.stringify(id));
  }
  assert.equal(idProblem('x'.repeat(255)), null);
  assert.equal(idProblem('x'.repeat(256)), 'it is longer than 255 bytes');
});

test('each reason, in the crate\'s order', () => {
  const expect = {
    '': 'it is empty',
    ['é'.repeat(128)]: 'it is longer than 255 bytes', // 256 bytes, 128 characters
    '.': 'it is a relative directory name',
    '..': 'it is a relative directory name',
    '../etc/passwd': 'it contains a path separator',
    'a\\b': 'it contains a path separator',
    'a\nb': 'it contains a control character',
    '\u0085': 'it contains a control character',
    '\u007f': 'it contains a control character',
    'x\u202e': 'it contains an invisible formatting character',
    '\u00ad': 'it contains an invisible formatting character',
    '\u061c': 'it contains an invisible formatting character',
    '\u180e': 'it contains an invisible formatting character',
    '\u2060': 'it contains an invisible formatting character',
    '\u2064': 'it contains an invisible formatting character',
    '\u2069': 'it contains an invisible formatting character',
    '\ufeff': 'it contains an invisible formatting character',
    '\ud800x': 'it is not well-formed Unicode (a lone surrogate)',
    'x\udc00': 'it is not well-formed Unicode (a lone surrogate)',
    // A separator wins over a control character, as in the crate.
    'a/\n': 'it contains a path separator',
  };
  for (const [id, reason] of Object.entries(expect)) assert.equal(idProblem(id), reason, JSON.stringify(id));
  for (const ok of ['6f1e9d2a-8b1c-4c59-9f51-3d1f2a6b7c8d', '...', ' ', '~', 'é', '日本', '😀', 'a b', 'x'.repeat(255), '\u00a0', 'e\u0301']) {
    assert.equal(idProblem(ok), null, JSON.stringify(ok));
  }
});

test('refusals quote the id as Rust\'s {:?}, cut to 64 characters, one line', () => {
  // image-id/src/lib.rs, refusals_are_one_short_line.
  const m = refusal(`a\n${'b'.repeat(100)}`, 'it contains a control character');
  assert.ok(!m.includes('\n') && m.includes('\\n') && m.includes('..."'), m);
  assert.equal(m, `invalid image id "a\\n${'b'.repeat(62)}...": it contains a control character`);
  assert.equal(rustDebug('a"b\\c\'d\te\0f'), '"a\\"b\\\\c\'d\\te\\0f"');
  assert.equal(rustDebug('x\u202ey\u200bz\u0085\u00a0'), '"x\\u{202e}y\\u{200b}z\\u{85}\\u{a0}"');
  assert.equal(rustDebug('e\u0301 é 日本 😀'), '"e\\u{301} é 日本 😀"');
});

test('validateImageId: strings as they are, integers as their digits, anything else refused', () => {
  assert.equal(validateImageId('img-1'), 'img-1');
  assert.equal(validateImageId(12), '12');
  assert.equal(validateImageId(-3), '-3');
  assert.equal(validateImageId(0), '0');
  assert.equal(validateImageId(2 ** 53 - 1), '9007199254740991');
  assert.equal(validateImageId(123456789012345678901234567890n), '123456789012345678901234567890');
  const refused = (v, re) =>
    assert.throws(
      () => validateImageId(v),
      (e) => e instanceof CacheError && e.kind === 'invalid-image-id' && re.test(e.message),
      String(v),
    );
  refused(1.5, /invalid image id 1\.5: a number is taken as an id only when it is a safe integer/);
  refused(NaN, /NaN/);
  refused(Infinity, /Infinity/);
  refused(2 ** 64, /safe integer/);
  refused(true, /invalid image id \(boolean\): an image id is a string, an integer or a BigInt/);
  refused(null, /\(null\)/);
  refused(undefined, /\(undefined\)/);
  refused({ toString: () => 'sneaky' }, /\(object\)/);
  refused(['a'], /\(object\)/);
  refused(Symbol('s'), /\(symbol\)/);
  refused('', /invalid image id "": it is empty/);
  refused('a/b', /invalid image id "a\/b": it contains a path separator/);
  refused('x\u202e', /invalid image id "x\\u\{202e\}": it contains an invisible formatting character/);
});

test('every method checks its id in the main thread: nothing reaches the worker', async () => {
  const cache = await open();
  await cache.cache('ok', 'bytes');
  const sent = [];
  const send = cache.driver.send.bind(cache.driver);
  cache.driver.send = (inst, op, args) => {
    sent.push([op, args]);
    return send(inst, op, args);
  };
  const methods = [
    (id) => cache.getHitCount(id),
    (id) => cache.isCached(id),
    (id) => cache.isBeingCached(id),
    (id) => cache.isCacheable(id),
    (id) => cache.isQueued(id),
    (id) => cache.queueImage(id),
    (id) => cache.queue(id),
    (id) => cache.deleteCachedImage(id),
    (id) => cache.deleteQueuedImage(id),
    (id) => cache.getImageSize(id),
    (id) => cache.getCachedNodes(id),
    (id) => cache.openForWrite(id),
    (id) => cache.openForRead(id),
    (id) => cache.readImage(id),
    (id) => cache.cache(id, 'x'),
    (id) => cache.cacheStream(id, ['x']),
  ];
  for (const bad of ['', '.', '..', 'a/b', '../../etc/passwd', 'a\\b', 'a\0b', 'a\nb', 'x'.repeat(256), 'x\u202e', '\u200b', '\ud800', 1.5, null, undefined, true, {}]) {
    for (const call of methods) {
      let promise;
      assert.doesNotThrow(() => {
        promise = call(bad);
      }, 'a bad id is a rejected promise, never a synchronous throw');
      await assert.rejects(promise, (e) => e instanceof CacheError && e.kind === 'invalid-image-id', `${call} ${String(bad)}`);
    }
  }
  assert.deepEqual(sent, [], 'no invalid id reached the worker');
  assert.equal(await cache.isCached('ok'), true);
  assert.deepEqual(sent.map(([op, args]) => [op, args.fn, args.args]), [['call', 'isCached', ['ok']]]);
});

test('integer ids (Glance\'s) are cached, read and listed as their digits', async () => {
  const cache = await open();
  assert.equal(await cache.cache(12, 'twelve'), 6);
  assert.equal(await cache.isCached('12'), true);
  assert.equal(await cache.isCached(12n), true);
  assert.equal((await cache.readImage(12)).toString(), 'twelve');
  assert.equal(await cache.getHitCount(12n), 1);
  const w = await cache.openForWrite(7n);
  assert.equal(w.imageId, '7');
  await w.write('seven');
  await w.commit();
  const r = await cache.openForRead(7);
  assert.equal(r.imageId, '7');
  assert.equal((await r.readAll()).toString(), 'seven');
  const tee = await cache.cacheStream(99, ['nine', 'ty-nine']);
  for await (const _ of tee);
  assert.equal(tee.report.cached, true);
  assert.deepEqual((await cache.listCached()).map((i) => i.imageId), ['12', '7', '99']);
  assert.equal(await cache.queue(5), true);
  assert.deepEqual(await cache.getQueuedImages(), ['5']);
  await cache.deleteCachedImage(12);
  assert.equal(await cache.isCached('12'), false);
});
