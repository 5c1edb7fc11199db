// Plays the shared scenarios (tests/scenarios/README.md, format 1) against
// the Node host: conformance.json for both drivers, hostile.json on the
// hostile fixture component.
//
// The xattr driver runs on the fs-xattr add-on (host/imports.js). Where user
// xattrs are unsupported (a file system without them, or `xattr: false`),
// opening it without the fallback is a bad-configuration error that says
// so, and with the fallback (the default, as in Glance) the cache runs on
// sqlite: both are tested at the end.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { ImageCache, CONTRACT } from '../src/index.js';
import { componentsDir } from '../scripts/transpile.js';
import { Cluster, unavailable as postgresUnavailable } from './support/pg.js';
import { Server as MariadbServer, unavailable as mariadbUnavailable } from './support/mariadb.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SCENARIOS = path.resolve(HERE, '..', '..', '..', 'tests', 'scenarios');
const suite = JSON.parse(fs.readFileSync(path.join(SCENARIOS, 'conformance.json'), 'utf8'));
const hostile = JSON.parse(fs.readFileSync(path.join(SCENARIOS, 'hostile.json'), 'utf8'));

const roots = [];
after(() => {
  for (const r of roots) fs.rmSync(r, { recursive: true, force: true });
});

function freshRoot() {
  const r = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-'));
  roots.push(r);
  return r;
}

/** A data value (README: string, pattern, concat) as bytes. */
export function data(v) {
  if (typeof v === 'string') return Buffer.from(v, 'utf8');
  if (v && typeof v === 'object' && 'pattern' in v) {
    const b = Buffer.alloc(v.len);
    for (let i = 0; i < v.len; i++) b[i] = (i * 31 + v.pattern) % 256;
    return b;
  }
  if (v && typeof v === 'object' && Array.isArray(v.concat)) return Buffer.concat(v.concat.map(data));
  throw new Error(`not a data value: ${JSON.stringify(v)}`);
}

const snake = (k) => k.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);
function snakeKeys(x) {
  if (Array.isArray(x)) return x.map(snakeKeys);
  if (x && typeof x === 'object' && !Buffer.isBuffer(x)) {
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [snake(k), snakeKeys(v)]));
  }
  return x;
}

/** README's matching: objects by their expected keys, lists element-wise. */
function matches(actual, expected, where = '$') {
  if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${where}: expected a list, got ${JSON.stringify(actual)}`);
    assert.equal(actual.length, expected.length, `${where}: length of ${JSON.stringify(actual)}`);
    expected.forEach((e, i) => matches(actual[i], e, `${where}[${i}]`));
  } else if (expected && typeof expected === 'object') {
    assert.ok(actual && typeof actual === 'object', `${where}: expected an object, got ${JSON.stringify(actual)}`);
    for (const [k, v] of Object.entries(expected)) matches(actual[k], v, `${where}.${k}`);
  } else {
    assert.deepEqual(actual, expected, `${where}`);
  }
}

const BYTES_OPS = new Set(['get', 'last_passed']);

class Runner {
  constructor(root, driver, openOptions = {}) {
    this.root = root;
    this.driver = driver;
    this.openOptions = openOptions;
    this.sessions = new Map();
    this.lastPassed = Buffer.alloc(0);
    this.caches = [];
  }

  async open() {
    const warnings = [];
    const cache = await ImageCache.open(this.root, {
      driver: this.driver,
      onWarning: (m) => warnings.push(m),
      ...this.openOptions,
    });
    this.caches.push(cache);
    this.cache = cache;
    return { cache, warnings };
  }

  async close() {
    for (const s of this.sessions.values()) await s.drop?.().catch(() => {});
    for (const c of this.caches) await c.close();
  }

  async get(id) {
    const reader = await this.cache.openForRead(id);
    return reader.readAll();
  }

  async step(op, a) {
    const c = this.cache;
    switch (op) {
      case 'is_cached':
        return c.isCached(a.id);
      case 'is_cacheable':
        return c.isCacheable(a.id);
      case 'is_being_cached':
        return c.isBeingCached(a.id);
      case 'is_queued':
        return c.isQueued(a.id);
      case 'queue_image':
        return c.queueImage(a.id);
      case 'get_queued_images':
        return c.getQueuedImages();
      case 'get_hit_count':
        return c.getHitCount(a.id);
      case 'get_image_size':
        return c.getImageSize(a.id);
      case 'get_cache_size':
        return c.getCacheSize();
      case 'get_cached_images':
        return snakeKeys(await c.getCachedImages());
      case 'delete_cached_image':
        await c.deleteCachedImage(a.id);
        return null;
      case 'delete_queued_image':
        await c.deleteQueuedImage(a.id);
        return null;
      case 'delete_all_cached_images':
        return c.deleteAllCachedImages();
      case 'delete_all_queued_images':
        return c.deleteAllQueuedImages();
      case 'get_least_recently_accessed':
        return c.getLeastRecentlyAccessed();
      case 'get_least_recently_accessed_batch':
        return snakeKeys(await c.getLeastRecentlyAccessedBatch(a.count));
      case 'clean': {
        const r = await c.clean(a.stall_time);
        return {
          invalid: r.invalid.map((f) => f.imageId).sort(),
          incomplete: r.incomplete.map((f) => f.imageId).sort(),
          failures: r.failures.length,
        };
      }
      case 'prune': {
        const r = await c.prune(a.max_size);
        return { removed: r.removed.map((f) => f.imageId), bytes_removed: r.bytesRemoved, size_after: r.sizeAfter };
      }
      case 'put': {
        const w = await c.openForWrite(a.id);
        await w.write(data(a.data));
        await w.commit();
        return null;
      }
      case 'get':
        return this.get(a.id);
      case 'read_partial': {
        const r = await c.openForRead(a.id);
        await r.read(Buffer.alloc(a.bytes));
        await r.close();
        return null;
      }
      case 'open_for_write':
        this.sessions.set(a.session, await c.openForWrite(a.id));
        return null;
      case 'write':
        await this.session(a.session).write(data(a.data));
        return null;
      case 'commit':
        await this.take(a.session).commit(a.checksum);
        return null;
      case 'abort':
        await this.take(a.session).abort(a.reason);
        return null;
      case 'drop':
        await this.take(a.session).drop();
        return null;
      case 'cache_stream': {
        const passed = [];
        this.lastPassed = Buffer.alloc(0);
        async function* source() {
          for (const chunk of a.chunks) yield data(chunk);
          if (a.fail_at_end) throw new Error('connection reset by the image store');
        }
        try {
          const tee = await c.cacheStream(a.id, source(), { checksum: a.checksum });
          for await (const chunk of tee) passed.push(Buffer.from(chunk));
          return { cached: tee.report.cached, bytes: tee.report.bytes };
        } finally {
          this.lastPassed = Buffer.concat(passed);
        }
      }
      case 'last_passed':
        return this.lastPassed;
      case 'concurrent_gets': {
        const want = data(a.data);
        const worker = async () => {
          let ok = 0;
          for (let i = 0; i < a.each; i++) if ((await this.get(a.id)).equals(want)) ok++;
          return ok;
        };
        const counts = await Promise.all(Array.from({ length: a.threads }, worker));
        return counts.reduce((x, y) => x + y, 0);
      }
      case 'write_file': {
        const p = path.join(this.root, a.path);
        fs.writeFileSync(p, data(a.data));
        if (a.age !== undefined) {
          const t = Date.now() / 1000 - a.age;
          fs.utimesSync(p, t, t);
        }
        return null;
      }
      case 'mkdir':
        fs.mkdirSync(path.join(this.root, a.path));
        return null;
      case 'list_files':
        return fs.readdirSync(path.join(this.root, a.dir)).sort();
      case 'reopen':
        await this.open();
        return null;
      default:
        throw new Error(`unknown scenario op ${JSON.stringify(op)}: the Node runner must implement it`);
    }
  }

  session(name) {
    const s = this.sessions.get(name);
    if (!s) throw new Error(`no session named ${name}`);
    return s;
  }

  take(name) {
    const s = this.session(name);
    this.sessions.delete(name);
    return s;
  }
}

/** Steps whose result follows the order of recorded access times. */
const LRU_OPS = new Set(['get_least_recently_accessed', 'get_least_recently_accessed_batch', 'prune']);

/** Wait until a time recorded now sorts after every time recorded so far:
 * into the next whole second where the cache keeps whole seconds (Glance's
 * DATETIME columns on MySQL and MariaDB), as the Rust conformance tests'
 * `t.tick()` does. */
async function tick(timeResolution) {
  if (!(timeResolution > 0)) return;
  const ms = timeResolution * 1000;
  await new Promise((r) => setTimeout(r, ms - (Date.now() % ms) + 20));
}

/**
 * Play `scenario` on `driver`. `timeResolution` (seconds, 0 for exact) is
 * how finely the cache records access times: where it keeps whole
 * seconds, a `get` that a later step orders by access time (an LRU query,
 * a prune) waits for the next second first, so that its access sorts after
 * every earlier one.
 */
async function play(scenario, driver, openOptions = {}, { root = freshRoot(), name = driver, timeResolution = 0 } = {}) {
  const runner = new Runner(root, driver, openOptions);
  const { cache, warnings } = await runner.open();
  if (openOptions.xattr === false && driver === 'xattr') {
    // No user xattrs: the xattr driver cannot configure; sqlite serves.
    assert.equal(cache.driverInfo.name, 'sqlite');
    assert.equal(cache.driverInfo.fellBackFrom, 'xattr');
    assert.match(warnings.join('\n'), /extended attributes are not supported/);
  } else {
    assert.equal(cache.driverInfo.name, name);
    assert.equal(cache.driverInfo.fellBackFrom, undefined, warnings.join('\n'));
  }
  try {
    for (const [i, st] of scenario.steps.entries()) {
      const where = `${scenario.name} step ${i} (${st.op} ${JSON.stringify(st.args ?? {})})`;
      let result;
      let error;
      if (timeResolution > 0 && st.op === 'get' && scenario.steps.slice(i + 1).some((later) => LRU_OPS.has(later.op))) {
        await tick(timeResolution);
      }
      try {
        result = await runner.step(st.op, st.args ?? {});
      } catch (e) {
        if (/unknown scenario op/.test(e.message)) throw e;
        error = e;
      }
      if (st.expect_error) {
        assert.ok(error, `${where}: expected a ${st.expect_error.kind} error, got ${JSON.stringify(result)}`);
        assert.equal(error.kind, st.expect_error.kind, `${where}: ${error.message}`);
        if (st.expect_error.message_contains) {
          assert.ok(error.message.includes(st.expect_error.message_contains), `${where}: message ${JSON.stringify(error.message)}`);
        }
        continue;
      }
      if (error) throw new Error(`${where}: ${error.kind ?? ''} ${error.message}`, { cause: error });
      if ('expect' in st) {
        if (BYTES_OPS.has(st.op)) {
          assert.ok(Buffer.from(result).equals(data(st.expect)), `${where}: bytes differ`);
        } else {
          matches(result, st.expect, where);
        }
      }
    }
  } finally {
    await runner.close();
  }
}

assert.equal(suite.format, 1, 'the Node runner reads scenario format 1');
assert.match(suite.contract, /^image-cache:driver@\d+\.\d+\.\d+$/);
assert.equal(hostile.format, 1, 'the Node runner reads scenario format 1');
assert.equal(hostile.contract, CONTRACT);

for (const driver of ['sqlite', 'xattr']) {
  describe(`scenarios on ${driver}`, () => {
    for (const scenario of suite.scenarios) {
      if (scenario.drivers && !scenario.drivers.includes(driver)) continue;
      test(scenario.name, () => play(scenario, driver));
    }
  });
}

// The centralized driver, each scenario on a fresh root and a database of
// its own (Glance's tables, the drivers' role fenced by the grants), when
// a PostgreSQL can be had (test/support/pg.js); skipped, saying why, when
// it cannot.
describe('scenarios on centralized (PostgreSQL)', () => {
  const why = postgresUnavailable();
  let cluster;
  before(async () => {
    if (!why) cluster = await Cluster.start();
  });
  after(() => cluster?.destroy());
  for (const scenario of suite.scenarios) {
    if (scenario.drivers && !scenario.drivers.includes('centralized')) continue;
    test(scenario.name, { skip: why ?? false }, async () => {
      const db = await cluster.database();
      await play(scenario, 'centralized', {
        fallbackToSqlite: false,
        databases: { glance: db.url },
        driverOptions: { worker_self_reference_url: `http://${db.name.replaceAll('_', '-')}:9292` },
      });
    });
  }
});

// The same on MariaDB (test/support/mariadb.js): each scenario in a
// database of its own, with an account of its own fenced by the grants.
// Glance's DATETIME columns keep whole seconds on MySQL: reads whose order
// a scenario checks are a second apart (see play).
describe('scenarios on centralized (MariaDB)', () => {
  const why = mariadbUnavailable();
  let server;
  before(async () => {
    if (!why) server = await MariadbServer.start();
  });
  after(() => server?.destroy());
  for (const scenario of suite.scenarios) {
    if (scenario.drivers && !scenario.drivers.includes('centralized')) continue;
    test(scenario.name, { skip: why ?? false }, async () => {
      const db = await server.database();
      await play(
        scenario,
        'centralized',
        {
          fallbackToSqlite: false,
          databases: { glance: db.url },
          driverOptions: { worker_self_reference_url: `http://${db.name.replaceAll('_', '-')}:9292` },
        },
        { timeResolution: 1 },
      );
    });
  }
});

describe('scenarios on xattr where user xattrs are unsupported (it falls back to sqlite)', () => {
  for (const scenario of suite.scenarios) {
    if (scenario.drivers && !scenario.drivers.includes('sqlite')) continue;
    test(scenario.name, () => play(scenario, 'xattr', { xattr: false }));
  }
});

test('where user xattrs are unsupported, the xattr driver is a bad configuration without the fallback', async () => {
  await assert.rejects(ImageCache.open(freshRoot(), { driver: 'xattr', fallbackToSqlite: false, xattr: false }), (e) => {
    assert.equal(e.kind, 'bad-configuration');
    assert.match(e.message, /extended attributes are not supported/);
    return true;
  });
});

test('an unknown scenario op fails the runner', async () => {
  await assert.rejects(play({ name: 'bogus', steps: [{ op: 'teleport' }] }, 'sqlite'), /unknown scenario op/);
});

/** An SQLite database with one table, made by the sqlite driver itself
 * (SQLite runs inside it; the Node host has no SQLite of its own). */
async function sqliteDatabase(file) {
  const scratch = freshRoot();
  const cache = await ImageCache.open(scratch, { driver: 'sqlite', fallbackToSqlite: false });
  await cache.cache('victim', Buffer.from('victim'));
  await cache.close();
  fs.copyFileSync(path.join(scratch, 'cache.db'), file);
}

/** Names and bytes of what is in a directory. */
function canary(dir) {
  return fs
    .readdirSync(dir)
    .sort()
    .map((n) => [n, fs.readFileSync(path.join(dir, n)).toString('base64')]);
}

describe('hostile scenarios (hostile.json)', () => {
  for (const scenario of hostile.scenarios) {
    test(scenario.name, async () => {
      // $OUTSIDE is a directory beside the root, with a file `secret` and
      // an SQLite database `victim.db`; nothing in it may change.
      const top = freshRoot();
      const outside = path.join(top, 'outside');
      fs.mkdirSync(outside);
      fs.writeFileSync(path.join(outside, 'secret'), 'do not read');
      await sqliteDatabase(path.join(outside, 'victim.db'));
      const before = canary(outside);
      const options = Object.fromEntries(hostile.options.map(([k, v]) => [k, v.replaceAll('$OUTSIDE', outside)]));
      await play(
        scenario,
        path.join(componentsDir(), `${hostile.component}.wasm`),
        {
          grants: hostile.grants,
          driverOptions: options,
          fallbackToSqlite: false,
          limits: { callDeadlineMs: hostile.limits.call_deadline_ms },
        },
        { root: path.join(top, 'root'), name: 'hostile' },
      );
      assert.deepEqual(canary(outside), before, 'nothing outside the root changed');
      assert.deepEqual(fs.readdirSync(top).sort(), ['outside', 'root'], 'nothing planted beside the root');
    });
  }
});
