// The centralized driver on the Node host, on a real PostgreSQL 15 (see
// test/support/pg.js): the `database` import, its statement policy (the
// Rust host's, same attack strings), its role check, parameters and
// results, bounds, errors and TLS; and the driver itself: nodes sharing one
// database, Glance's own tables, the database going away and coming back.
// The same behaviour as the Rust host's tests/centralized.rs.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ImageCache, CacheError } from '../src/index.js';
import { checkContract, loadBuiltin } from '../src/component.js';
import { check, firstWord, endsTransaction } from '../src/database/policy.js';
import { libpqUrl, parseUrl, databaseSettings, grantStatements, ident } from '../src/database/settings.js';
import { Backend, convertParam, columnValue, parseTime, timeText, OID } from '../src/database/backend.js';
import { Databases } from '../src/database/service.js';
import { makeDatabaseImports } from '../src/host/database.js';
import { Cluster, PASSWORD, ROLE, makeCa } from './support/pg.js';

const UUID_A = '6f1e9d2a-4a8b-4c3e-9d7f-0a1b2c3d4e5f';
const UUID_B = '0c9b8a7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d';

const dirs = [];
function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-central-'));
  dirs.push(d);
  return d;
}

/** Bytes of the Rust tests' image_bytes(seed, n). */
function imageBytes(seed, n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

// ---- the statement policy (no server needed) -----------------------------

describe('the statement policy (policy.rs, ported)', () => {
  // The shared cases every host's check plays (tests/scenarios/sql_policy.json).
  const POLICY = JSON.parse(
    fs.readFileSync(new URL('../../../tests/scenarios/sql_policy.json', import.meta.url), 'utf8'),
  );

  test('allows what the centralized driver runs', () => {
    for (const sql of POLICY.postgresql.allowed) {
      assert.equal(check(sql), null, sql);
    }
  });

  test('refuses what reaches beyond the tables', () => {
    assert.ok(POLICY.postgresql.refused.length > 30);
    for (const sql of POLICY.postgresql.refused) {
      assert.notEqual(check(sql), null, `${JSON.stringify(sql)} was allowed`);
    }
    assert.notEqual(check('SELECT 1 '.repeat(20_000)), null);
    // The messages say what to change, as the Rust host's.
    assert.equal(check('COPY t TO STDOUT'), 'a driver may not run COPY statements');
    assert.equal(check('CREATE ROLE x'), 'a driver may create tables and indexes, not ROLE');
    assert.equal(check('SELECT 1; SELECT 2'), 'one statement per call');
    assert.equal(check("SELECT pg_read_file('x')"), 'a driver\'s SQL may not use "pg_read_file"');
  });

  test('first words and plain ends of a transaction', () => {
    assert.equal(firstWord('  -- x\n begin'), 'begin');
    assert.equal(firstWord('COMMIT;'), 'commit');
    for (const sql of ['COMMIT', 'commit;', ' ROLLBACK  WORK ', 'end transaction', 'Abort']) assert.ok(endsTransaction(sql), sql);
    for (const sql of ['COMMIT AND CHAIN', 'ROLLBACK AND CHAIN', 'ROLLBACK\tTO sp', 'ROLLBACK TO SAVEPOINT sp', 'ROLLBACK\nTO sp', 'COMMIT; BEGIN']) {
      assert.ok(!endsTransaction(sql), sql);
    }
  });
});

describe('settings, parameters and values (no server needed)', () => {
  test('SQLAlchemy URLs become libpq URLs; errors never show the URL', () => {
    assert.equal(libpqUrl('postgresql+psycopg2://glance:s3cret@db.example/glance'), 'postgresql://glance:s3cret@db.example/glance');
    assert.equal(libpqUrl(' postgres://u@h/d '), 'postgresql://u@h/d');
    assert.throws(() => libpqUrl('mysql+pymysql://glance:s3cret@db/glance'), (e) => /"mysql"/.test(e.message) && !e.message.includes('s3cret'));
    assert.equal(libpqUrl('host=/run/postgresql dbname=glance'), 'host=/run/postgresql dbname=glance');
    assert.throws(() => libpqUrl('glance:s3cret@db'), (e) => !e.message.includes('s3cret'));
  });

  test('TLS parameters come out of URLs as libpq reads them', () => {
    const p = parseUrl('postgresql://u:p%40ss@h:5433/db?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&connect_timeout=5&client_encoding=utf8');
    assert.deepEqual(
      { host: p.host, port: p.port, user: p.user, password: p.password, database: p.database, mode: p.tls.mode, root: p.tls.rootCert },
      { host: 'h', port: 5433, user: 'u', password: 'p@ss', database: 'db', mode: 'verify-full', root: '/etc/ca.pem' },
    );
    assert.equal(p.connectTimeoutMs, 5000);
    assert.equal(parseUrl('postgresql://u@h/db?sslmode=require').tls.mode, 'require');
    assert.equal(parseUrl('postgresql://u@h/db?sslmode=allow').tls.mode, 'prefer');
    assert.equal(parseUrl('postgresql://u@h/db').tls.mode, 'prefer');
    const kv = parseUrl("host=/run/pg dbname=g user=u password='a b' sslmode=disable");
    assert.deepEqual([kv.host, kv.database, kv.password, kv.tls.mode], ['/run/pg', 'g', 'a b', 'disable']);
    assert.throws(() => parseUrl('postgresql://u@h/db?sslmode=sometimes'), /sslmode="sometimes" is not one of/);
    assert.throws(() => parseUrl('postgresql://u@h/db?client_encoding=latin1'), /UTF8 only/);
    assert.throws(() => parseUrl('postgresql://u@h/db?sslcert=/c.pem'), /sslcert and sslkey go together/);
    // The configured database: the name in every message, never the URL.
    assert.throws(
      () => databaseSettings('glance', 'postgresql://glance:hunter22@db.internal/glance?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem'),
      (e) => /the connection URL of database "glance": sslrootcert \/nonexistent\/ca.pem: ENOENT/.test(e.message) && !e.message.includes('hunter22'),
    );
    const s = databaseSettings('glance', 'postgresql+psycopg2://glance:hunter22@db.internal:5433/glance', { callDeadlineMs: 7000 });
    assert.deepEqual([s.poolSize, s.statementTimeoutMs, s.connectTimeoutMs, s.maxResultBytes, s.allowPrivilegedRole], [4, 7000, 10_000, 64 << 20, false]);
    const b = new Backend(s);
    const m = b.scrub('could not connect to db.internal:5433 with password hunter22');
    assert.ok(!m.includes('hunter22') && !m.includes('db.internal'), m);
  });

  test('the grants to run are those `image-cache db grants` prints', () => {
    assert.deepEqual(grantStatements('image_cache', 'glance'), [
      'GRANT CONNECT ON DATABASE glance TO image_cache;',
      'GRANT USAGE ON SCHEMA public TO image_cache;',
      'GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference TO image_cache;',
      'GRANT USAGE ON SEQUENCE cached_images_id_seq, node_reference_node_reference_id_seq TO image_cache;',
      'REVOKE CREATE ON SCHEMA public FROM PUBLIC;',
    ]);
    assert.equal(ident('Odd"Name'), '"Odd""Name"');
  });

  test('parameters take the server\'s types; results come back as the WIT says', () => {
    const int = (n) => ({ tag: 'integer', val: BigInt(n) });
    assert.equal(convertParam(int(7), OID.INT4), '7');
    assert.throws(() => convertParam(int(2 ** 40), OID.INT4), /does not fit in int4/);
    assert.throws(() => convertParam(int(70_000), OID.INT2), /does not fit in int2/);
    assert.throws(() => convertParam({ tag: 'text', val: '1' }, OID.INT8), /the server expects int8, not text/);
    assert.throws(() => convertParam({ tag: 'real', val: 1.5 }, OID.INT8), /expects int8, not a real/);
    assert.throws(() => convertParam({ tag: 'boolean', val: true }, OID.INT4), /not a boolean/);
    assert.throws(() => convertParam({ tag: 'blob', val: new Uint8Array([1]) }, OID.TEXT), /not a blob/);
    assert.equal(convertParam({ tag: 'null' }, OID.TIMESTAMP), null);
    assert.equal(convertParam({ tag: 'real', val: 1_700_000_000.25 }, OID.TIMESTAMP), '2023-11-14 22:13:20.250000');
    assert.equal(convertParam(int(0), OID.TIMESTAMPTZ), '1970-01-01 00:00:00.000000+00');
    assert.throws(() => convertParam({ tag: 'real', val: NaN }, OID.TIMESTAMP), /NaN is not a time/);
    assert.throws(() => convertParam({ tag: 'real', val: 1e300 }, OID.TIMESTAMP), /is not a time/);
    assert.throws(() => convertParam({ tag: 'text', val: 'x' }, 869), /expects inet/);
    assert.equal(convertParam(int(2 ** 53), OID.FLOAT8), String(2 ** 53));
    assert.throws(() => convertParam(int(2 ** 53 + 2), OID.FLOAT8), /expects float8, not an integer/);
    // Times: naive is UTC, both ways, BC and fractions included.
    assert.equal(parseTime('2024-01-01 00:00:00'), 1_704_067_200);
    assert.equal(parseTime('2024-01-01 01:30:00+01:30'), 1_704_067_200);
    assert.equal(parseTime('2023-11-14 22:13:20.25'), 1_700_000_000.25);
    assert.equal(parseTime(timeText(-62_135_596_800, false)), -62_135_596_800);
    assert.equal(timeText(-62_135_596_801, false).endsWith(' BC'), true);
    assert.deepEqual(columnValue('t', OID.BOOL), { tag: 'boolean', val: true });
    assert.deepEqual(columnValue('9007199254740993', OID.INT8), { tag: 'integer', val: 9007199254740993n });
    assert.deepEqual(columnValue('\\x0102', OID.BYTEA).val, new Uint8Array([1, 2]));
    assert.deepEqual(columnValue(null, OID.INT4), { tag: 'null' });
    assert.throws(() => columnValue('127.0.0.1', 869), /its type inet is not one this interface carries; cast it/);
  });

  test('the centralized driver imports the database and the host now provides it, by grant', () => {
    const meta = loadBuiltin('centralized');
    assert.deepEqual(
      [...meta.imports].sort(),
      ['clock', 'database', 'fs', 'types'].map((n) => `image-cache:driver/${n}@0.3.0`).sort(),
    );
    checkContract(meta, ['database']);
    assert.throws(() => checkContract(meta, ['xattr']), /database@0\.3\.0, which it was not granted/);
  });
});

// ---- on a real server ----------------------------------------------------

let cluster;
const caches = [];
before(async () => {
  cluster = await Cluster.start();
});
after(async () => {
  for (const c of caches) await c.close().catch(() => {});
  cluster?.destroy();
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/** A cache with the centralized driver as node `node` of `db`. */
async function node(db, nodeUrl, { root = tmp(), database = {}, limits, onWarning } = {}) {
  const cache = await ImageCache.open(root, {
    driver: 'centralized',
    fallbackToSqlite: false,
    databases: { glance: { url: db.url, ...database } },
    driverOptions: { worker_self_reference_url: nodeUrl },
    limits,
    onWarning: onWarning ?? (() => {}),
  });
  caches.push(cache);
  return cache;
}

const ids = async (cache) => (await cache.listCached()).map((i) => i.imageId);

/** The `database` import as a driver's thread sees it, driven from the
 * test: synchronous calls, each with `ms` to run. */
function driverSide(config, { maxConnections = 4 } = {}) {
  const dbs = new Databases({ glance: config }, { onWarning: () => {} });
  const channel = dbs.attach();
  const ctx = { deadline: { at: Date.now() + 10_000 } };
  const { imports, endOfCall } = makeDatabaseImports({ ...channel, maxConnections }, ctx);
  const within = (ms) => {
    ctx.deadline = { at: Date.now() + ms };
  };
  const attempt = (fn) => {
    try {
      return { ok: fn() };
    } catch (e) {
      assert.ok(e.payload, `not a database-error: ${e.stack}`);
      return { err: e.payload };
    }
  };
  return {
    Connection: imports.Connection,
    endOfCall,
    within,
    attempt,
    close() {
      channel.detach();
      dbs.close();
    },
  };
}

const text = (s) => ({ tag: 'text', val: s });
const integer = (n) => ({ tag: 'integer', val: BigInt(n) });

test('two nodes share one database and keep their own caches', async () => {
  const db = await cluster.database();
  const one = await node(db, 'http://node-1:9292');
  const two = await node(db, 'http://node-2:9292');
  await one.cache(UUID_A, imageBytes(1, 1000));
  await two.cache(UUID_A, imageBytes(1, 1000));
  await two.cache(UUID_B, imageBytes(2, 3000));

  assert.deepEqual(await ids(one), [UUID_A]);
  assert.deepEqual(await ids(two), [UUID_B, UUID_A]);
  const both = ['http://node-1:9292', 'http://node-2:9292'];
  assert.deepEqual(await one.getCachedNodes(UUID_A), both);
  assert.deepEqual(await two.getCachedNodes(UUID_A), both);
  assert.deepEqual(await one.getCachedNodes(UUID_B), ['http://node-2:9292']);
  assert.deepEqual(await one.getCachedNodes('never'), []);

  // Hits are per node.
  assert.ok((await one.readImage(UUID_A)).equals(imageBytes(1, 1000)));
  await one.readImage(UUID_A);
  assert.equal(await one.getHitCount(UUID_A), 2);
  assert.equal(await two.getHitCount(UUID_A), 0);
  assert.equal(await one.getCacheSize(), 1000);
  assert.equal(await two.getCacheSize(), 4000);

  // Pruning node 2 leaves node 1 alone.
  const report = await two.prune(0);
  assert.equal(report.removed.length, 2);
  assert.deepEqual(await ids(two), []);
  assert.deepEqual(await ids(one), [UUID_A]);
  assert.equal(await one.getHitCount(UUID_A), 2);
  assert.deepEqual(await one.getCachedNodes(UUID_A), ['http://node-1:9292']);

  // Deleting on node 1 touches only its rows.
  await two.cache(UUID_A, imageBytes(1, 1000));
  await one.deleteCachedImage(UUID_A);
  assert.deepEqual(await two.getCachedNodes(UUID_A), ['http://node-2:9292']);
  assert.equal(await one.deleteAllCachedImages(), 0);
  assert.deepEqual(await ids(two), [UUID_A]);

  // What Glance sees in its tables.
  assert.deepEqual(
    await db.sql(
      "SELECT n.node_reference_url || ' ' || c.image_id || ' ' || c.hits FROM cached_images c JOIN node_reference n USING (node_reference_id) ORDER BY 1",
    ),
    [[`http://node-2:9292 ${UUID_A} 0`]],
  );
  assert.equal(await db.value('SELECT count(*) FROM node_reference'), '2', 'one node_reference row per node');
});

test("Glance's own tables work as they are; without them the driver names glance-manage db sync", async () => {
  const glance = await cluster.bareDatabase();
  // Glance's migrations made the tables (the administrator owns them);
  // the cache's role has what `image-cache db grants` says.
  await glance.sql((await import('../src/database/settings.js')).GLANCE_CACHE_SCHEMA.replaceAll(' IF NOT EXISTS', ''));
  await glance.grantCachePrivileges(ROLE);
  await glance.sql(
    "INSERT INTO node_reference (node_reference_url) VALUES ('http://glance-api:9292'), ('http://us:9292'); " +
      'INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) ' +
      `SELECT '${UUID_A}', '2024-01-01 00:00:00', '2023-12-31 00:00:00', 5, 7, 'd41d8cd98f00b204e9800998ecf8427e', node_reference_id FROM node_reference`,
  );
  const root = tmp();
  fs.writeFileSync(path.join(root, UUID_A), '12345');
  const cache = await node(glance, 'http://us:9292', { root });
  const images = await cache.listCached();
  assert.equal(images.length, 1);
  assert.equal(images[0].hits, 7);
  assert.equal(images[0].lastAccessed, 1_704_067_200);
  assert.equal(images[0].lastModified, 1_703_980_800);
  assert.deepEqual(await cache.getCachedNodes(UUID_A), ['http://glance-api:9292', 'http://us:9292']);
  // What this driver writes, Glance reads: naive UTC, hits, md5 hex.
  await cache.cache(UUID_B, 'hello', { checksum: 'md5:5d41402abc4b2a76b9719d911017c592' });
  assert.deepEqual(
    await glance.sql(
      "SELECT hits, size, checksum, abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - last_modified)) < 60 " +
        `FROM cached_images WHERE image_id = '${UUID_B}'`,
    ),
    [[0, '5', '5d41402abc4b2a76b9719d911017c592', true]],
  );
  const reader = await cache.openForRead(UUID_B);
  assert.equal(await reader.checksum(), '5d41402abc4b2a76b9719d911017c592');
  await reader.close();

  // A database without the tables: refused, naming Glance's migrations.
  const bare = await cluster.bareDatabase();
  await assert.rejects(node(bare, 'http://fresh:9292'), (e) => {
    assert.equal(e.kind, 'bad-configuration', e.message);
    assert.match(e.message, /Glance's table node_reference is missing/);
    assert.ok(e.message.includes('glance-manage db sync') && e.message.includes('image-cache db init'), e.message);
    assert.ok(!e.message.includes(PASSWORD), e.message);
    return true;
  });
  assert.deepEqual(await bare.sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"), [['0']]);
});

test('a node without worker_self_reference_url is a bad configuration', async () => {
  const db = await cluster.database();
  await assert.rejects(
    ImageCache.open(tmp(), { driver: 'centralized', fallbackToSqlite: false, databases: { glance: db.url } }),
    (e) => e.kind === 'bad-configuration' && /worker_self_reference_url/.test(e.message),
  );
});

test('an unreachable database is a database error that never shows the password or the address; no fallback', async () => {
  const server = await import('node:net').then((net) => net.createServer());
  const port = await new Promise((r) => server.listen(0, '127.0.0.1', () => r(server.address().port)));
  await new Promise((r) => server.close(r));
  const url = `postgresql+psycopg2://glance:${PASSWORD}@127.0.0.1:${port}/glance`;
  const open = (fallbackToSqlite) =>
    ImageCache.open(tmp(), {
      driver: 'centralized',
      fallbackToSqlite,
      databases: { glance: url },
      driverOptions: { worker_self_reference_url: 'http://n:9292' },
      onWarning: () => {},
    });
  for (const fallback of [false, true]) {
    await assert.rejects(open(fallback), (e) => {
      assert.equal(e.kind, 'database', e.message);
      assert.ok(e.message.includes('"glance"') && e.message.includes('cannot be reached'), e.message);
      assert.ok(!e.message.includes(PASSWORD), e.message);
      assert.ok(!e.message.includes(String(port)), e.message);
      assert.ok(!e.message.includes('127.0.0.1'), e.message);
      return true;
    });
  }
  // No database configured at all.
  await assert.rejects(
    ImageCache.open(tmp(), { driver: 'centralized', fallbackToSqlite: false, driverOptions: { worker_self_reference_url: 'http://n:9292' } }),
    (e) => e.kind === 'bad-configuration' && /no database named "glance" is configured/.test(e.message) && /image_cache_database_url/.test(e.message),
  );
  // A URL of a server the host does not speak to: a bad configuration
  // that hides it.
  await assert.rejects(
    ImageCache.open(tmp(), { driver: 'centralized', databases: { glance: `oracle+cx_oracle://glance:${PASSWORD}@db/glance` } }),
    (e) => e.kind === 'bad-configuration' && /"oracle" URL/.test(e.message) && /MySQL or MariaDB/.test(e.message) && !e.message.includes(PASSWORD),
  );
});

test('a superuser or owner role is refused with the grants to run, unless allowed', async () => {
  const db = await cluster.database();
  if (!db.superuserUrl) return; // an external server: its admin is not ours to hand out
  const warnings = [];
  const open = (allow) =>
    ImageCache.open(tmp(), {
      driver: 'centralized',
      fallbackToSqlite: false,
      databases: { glance: { url: db.superuserUrl, allowPrivilegedRole: allow } },
      driverOptions: { worker_self_reference_url: 'http://n:9292' },
      onWarning: (m) => warnings.push(m),
    });
  await assert.rejects(open(false), (e) => {
    assert.equal(e.kind, 'bad-configuration', e.message);
    assert.match(e.message, /superuser/);
    assert.ok(e.message.includes('GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference'), e.message);
    assert.ok(e.message.includes('image-cache db grants'), e.message);
    assert.ok(!e.message.includes(PASSWORD), e.message);
    return true;
  });
  const allowed = await open(true);
  caches.push(allowed);
  await allowed.cache('x', 'y');
  assert.match(warnings.join('\n'), /is a superuser.*allowed by configuration/);

  // The import refuses at open, access-denied, as the Rust host does;
  // Glance's own role (owner of its database) likewise, and extra grants.
  const owned = await cluster.ownedDatabase();
  const side = driverSide(owned.url);
  try {
    const r = side.attempt(() => side.Connection.open('glance'));
    assert.equal(r.err?.code, 'access-denied', JSON.stringify(r));
    assert.match(r.err.message, /owns database/);
    assert.match(r.err.message, /GRANT USAGE ON SEQUENCE cached_images_id_seq, node_reference_node_reference_id_seq TO image_cache;/);
  } finally {
    side.close();
  }
  await db.sql('CREATE TABLE image_locations (image_id TEXT, value TEXT)');
  for (const [grant, revoke, expected] of [
    ['GRANT SELECT ON image_locations TO glance', 'REVOKE SELECT ON image_locations FROM glance', 'SELECT on image_locations'],
    ['GRANT TRUNCATE, TRIGGER ON cached_images TO glance', 'REVOKE TRUNCATE, TRIGGER ON cached_images FROM glance', 'TRIGGER on cached_images'],
    ['GRANT CREATE ON SCHEMA public TO glance', 'REVOKE CREATE ON SCHEMA public FROM glance', 'may create objects in schema public'],
  ]) {
    await db.sql(grant);
    const s = driverSide(db.url);
    try {
      const r = s.attempt(() => s.Connection.open('glance'));
      assert.equal(r.err?.code, 'access-denied', `${grant}: ${JSON.stringify(r)}`);
      assert.ok(r.err.message.includes(expected), r.err.message);
    } finally {
      s.close();
    }
    await db.sql(revoke);
    const t = driverSide(db.url);
    try {
      assert.ok(t.attempt(() => t.Connection.open('glance')).ok, `${revoke}: accepted again`);
    } finally {
      t.close();
    }
  }
  // A role that may run server programs, and one that may become a role
  // with role attributes (roles of their own: memberships are
  // cluster-wide).
  await db.sql(
    'DO $$ BEGIN ' +
      "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runner_node') THEN CREATE ROLE runner_node LOGIN PASSWORD 'runner-pw'; END IF; " +
      "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'member_node') THEN CREATE ROLE member_node LOGIN PASSWORD 'member-pw'; END IF; " +
      "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mighty_node') THEN CREATE ROLE mighty_node CREATEDB; END IF; END $$; " +
      'GRANT pg_execute_server_program TO runner_node; GRANT mighty_node TO member_node',
  );
  for (const [role, pw, expected] of [
    ['runner_node', 'runner-pw', 'pg_execute_server_program'],
    ['member_node', 'member-pw', 'mighty_node'],
  ]) {
    await db.grantCachePrivileges(role);
    const s = driverSide(db.url.replace(`${ROLE}:${PASSWORD}`, `${role}:${pw}`));
    try {
      const r = s.attempt(() => s.Connection.open('glance'));
      assert.equal(r.err?.code, 'access-denied', JSON.stringify(r));
      assert.ok(r.err.message.includes(expected), r.err.message);
    } finally {
      s.close();
    }
  }
});

test('SQL that reaches beyond the tables is refused (access-denied) and changes nothing', async () => {
  const owned = await cluster.ownedDatabase();
  const side = driverSide({ url: owned.url, allowPrivilegedRole: true });
  const canary = tmp();
  const target = path.join(canary, 'pwned');
  try {
    const c = side.Connection.open('glance');
    assert.equal(c.dialect(), 'postgresql');
    c.execute('CREATE TABLE t (s TEXT)', []);
    for (const sql of [
      `COPY t TO '${target}'`,
      `COPY (SELECT 1) TO PROGRAM 'touch ${target}'`,
      "SELECT pg_read_file('/etc/passwd')",
      "SELECT lo_import('/etc/passwd')",
      `SELECT lo_export(1, '${target}')`,
      "SELECT dblink('host=127.0.0.1', 'select 1')",
      'SET ROLE postgres',
      'SET statement_timeout = 0',
      "ALTER SYSTEM SET archive_command = 'touch /tmp/x'",
      'SELECT inet_server_addr()',
      "SELECT current_setting('port')",
      'SELECT current_user',
      'SELECT * FROM pg_stat_activity',
      "SELECT query_to_xml('select 1', true, true, '')",
      'SELECT 1; DROP TABLE t',
      "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
      'DO $$ BEGIN END $$',
    ]) {
      const r = side.attempt(() => c.query(sql, []));
      assert.equal(r.err?.code, 'access-denied', `${sql}: ${JSON.stringify(r)}`);
      assert.match(r.err.message, /^database "glance": /);
    }
    assert.ok(!fs.existsSync(target));
    // The table is still there and the connection still works.
    assert.equal(c.execute('INSERT INTO t VALUES ($1)', [text('ok')]), 1n);
    assert.deepEqual(c.query('SELECT s FROM t', []), [[text('ok')]]);
  } finally {
    side.close();
  }
});

test("parameters must fit the server's types; values come back typed", async () => {
  const owned = await cluster.ownedDatabase();
  const side = driverSide({ url: owned.url, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    c.execute('CREATE TABLE t (i INTEGER, b BIGINT, f DOUBLE PRECISION, s VARCHAR(4), x BYTEA, at TIMESTAMP, ok BOOLEAN)', []);
    const insert = 'INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7)';
    const good = [integer(7), integer(2n ** 40n), integer(3), text('abcd'), { tag: 'blob', val: new Uint8Array([0, 1, 2]) }, { tag: 'real', val: 1_700_000_000.25 }, { tag: 'boolean', val: true }];
    assert.equal(c.execute(insert, good), 1n);
    for (const [i, bad] of [
      [0, integer(2n ** 40n)],
      [0, text('7')],
      [1, { tag: 'real', val: 1.5 }],
      [4, text('x')],
      [5, { tag: 'real', val: Infinity }],
      [6, integer(1)],
    ]) {
      const values = [...good];
      values[i] = bad;
      const r = side.attempt(() => c.execute(insert, values));
      assert.equal(r.err?.code, 'other', JSON.stringify(r));
      assert.ok(r.err.message.includes(`$${i + 1}`), r.err.message);
    }
    // Too long for VARCHAR(4): the server says so.
    const long = [...good];
    long[3] = text('abcde');
    assert.ok(side.attempt(() => c.execute(insert, long)).err);
    const rows = c.query('SELECT * FROM t', []);
    assert.equal(rows.length, 1);
    assert.deepEqual(rows[0][1], integer(2n ** 40n));
    assert.deepEqual(rows[0][4], { tag: 'blob', val: new Uint8Array([0, 1, 2]) });
    assert.deepEqual(rows[0][5], { tag: 'real', val: 1_700_000_000.25 });
    assert.deepEqual(rows[0][6], { tag: 'boolean', val: true });
    const r = side.attempt(() => c.execute(insert, [{ tag: 'null' }]));
    assert.match(r.err.message, /7 parameters/);
    // Types the interface does not carry must be cast; numeric is a real.
    assert.match(side.attempt(() => c.query("SELECT '127.0.0.1'::inet", [])).err.message, /column 1: its type inet is not one this interface carries; cast it/);
    assert.deepEqual(c.query('SELECT 1.5::numeric, $1::float8, now() AT TIME ZONE \'UTC\' > $2', [{ tag: 'real', val: 0.1 }, { tag: 'real', val: 1e9 }]), [
      [{ tag: 'real', val: 1.5 }, { tag: 'real', val: 0.1 }, { tag: 'boolean', val: true }],
    ]);
    // A missing table names 42P01, as the centralized guest expects.
    const missing = side.attempt(() => c.query('SELECT * FROM no_such_table', []));
    assert.equal(missing.err.code, 'other');
    assert.match(missing.err.message, /^database "glance": ERROR \(42P01\): relation "no_such_table" does not exist$/);
    // A constraint violated.
    c.execute('CREATE TABLE u (k INTEGER PRIMARY KEY)', []);
    c.execute('INSERT INTO u VALUES ($1)', [integer(1)]);
    assert.equal(side.attempt(() => c.execute('INSERT INTO u VALUES ($1)', [integer(1)])).err.code, 'constraint');
  } finally {
    side.close();
  }
});

test('results, time and connections are bounded', async () => {
  const owned = await cluster.ownedDatabase();
  const side = driverSide({ url: owned.url, maxResultBytes: 10_000, poolSize: 2, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    const big = side.attempt(() => c.query("SELECT repeat('x', 1000) FROM generate_series(1, 100)", []));
    assert.equal(big.err?.code, 'limit-exceeded', JSON.stringify(big));
    assert.deepEqual(c.query('SELECT 1', []), [[integer(1)]], 'the connection still works');

    // A statement that runs past the deadline is stopped there, and on the
    // server too.
    side.within(500);
    let started = Date.now();
    const slow = side.attempt(() => c.query('SELECT count(*) FROM generate_series(1, 10000000000)', []));
    assert.equal(slow.err?.code, 'timed-out', JSON.stringify(slow));
    assert.ok(Date.now() - started < 1500, `${Date.now() - started} ms`);
    const until = Date.now() + 10_000;
    while (
      (await owned.value(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 10000000000)%' AND state = 'active' AND pid <> pg_backend_pid()",
      )) !== '0'
    ) {
      assert.ok(Date.now() < until, 'the query still runs on the server');
      await new Promise((r) => setTimeout(r, 50));
    }
    side.within(10_000);
    assert.equal(side.attempt(() => c.query('SELECT 1', [])).err?.code, 'unavailable', 'a connection stopped half-way is not used again');
    c[Symbol.dispose]();

    // The pool's size bounds the connections: a third waits, then gives up
    // at its deadline.
    const a = side.Connection.open('glance');
    const b = side.Connection.open('glance');
    side.within(300);
    started = Date.now();
    const third = side.attempt(() => side.Connection.open('glance'));
    assert.equal(third.err?.code, 'timed-out', JSON.stringify(third));
    assert.ok(Date.now() - started < 1000);
    side.within(10_000);
    a[Symbol.dispose]();
    const again = side.Connection.open('glance');
    assert.deepEqual(again.query('SELECT 2', []), [[integer(2)]]);
    b[Symbol.dispose]();
    again[Symbol.dispose]();
    assert.ok(
      Number(await owned.value("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = 'image-cache'")) <= 2,
    );
    // An instance holds at most 4 connections.
    const many = [side.Connection.open('glance'), side.Connection.open('glance')];
    const s2 = driverSide({ url: owned.url, poolSize: 8, allowPrivilegedRole: true }, { maxConnections: 2 });
    try {
      const held = [s2.Connection.open('glance'), s2.Connection.open('glance')];
      const over = s2.attempt(() => s2.Connection.open('glance'));
      assert.equal(over.err?.code, 'limit-exceeded');
      assert.match(over.err.message, /at most 2 database connections/);
      held.forEach((h) => h[Symbol.dispose]());
    } finally {
      s2.close();
    }
    many.forEach((m) => m[Symbol.dispose]());
  } finally {
    side.close();
  }
});

test('a transaction left open is rolled back: on drop, and when the driver call returns', async () => {
  const owned = await cluster.ownedDatabase();
  const side = driverSide({ url: owned.url, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    c.execute('CREATE TABLE t (i INTEGER)', []);
    c.execute('BEGIN', []);
    c.execute('INSERT INTO t VALUES (1)', []);
    c[Symbol.dispose]();
    const d = side.Connection.open('glance');
    assert.deepEqual(d.query('SELECT count(*) FROM t', []), [[integer(0)]]);
    // Not inside the abandoned transaction: this commits by itself.
    d.execute('INSERT INTO t VALUES (2)', []);
    const e = side.Connection.open('glance');
    assert.deepEqual(e.query('SELECT count(*) FROM t', []), [[integer(1)]]);

    // A lock taken in a transaction holds while the call runs, and goes
    // when it returns (the host's end of every export call).
    e.execute('BEGIN', []);
    e.execute('LOCK TABLE t IN ACCESS EXCLUSIVE MODE', []);
    await assert.rejects(owned.sql("SET lock_timeout = '200ms'; SELECT count(*) FROM t"), /lock timeout/);
    side.endOfCall();
    assert.deepEqual(await owned.sql("SET lock_timeout = '2s'; SELECT count(*) FROM t"), [['1']]);
    assert.deepEqual(e.query('SELECT count(*) FROM t', []), [[integer(1)]], 'the connection is usable');
  } finally {
    side.close();
  }
});

test('errors never show the password or the host; an unknown name is access-denied', async () => {
  const owned = await cluster.ownedDatabase();
  const side = driverSide({ url: owned.url, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    for (const sql of ['SELECT * FROM no_such_table', `SELECT '${PASSWORD}'::int`, 'INSERT INTO nowhere VALUES (1)']) {
      const r = side.attempt(() => c.query(sql, []));
      assert.ok(r.err, sql);
      assert.ok(!r.err.message.includes(PASSWORD), r.err.message);
      assert.ok(!r.err.message.includes('127.0.0.1'), r.err.message);
    }
    const r = side.attempt(() => side.Connection.open('not-configured'));
    assert.equal(r.err.code, 'access-denied');
    assert.equal(
      r.err.message,
      'no database named "not-configured" is configured for this driver (the operator sets it with image_cache_database_url, IMAGE_CACHE_DATABASE_URL, --database-url or Glance\'s [database] connection)',
    );
  } finally {
    side.close();
  }
  // A wrong password: unavailable, and the password is not in it.
  const wrong = driverSide(owned.url.replace(PASSWORD, 'not-the-password'));
  try {
    const r = wrong.attempt(() => wrong.Connection.open('glance'));
    assert.equal(r.err?.code, 'unavailable', JSON.stringify(r));
    assert.match(r.err.message, /28P01/);
    assert.ok(!r.err.message.includes('not-the-password') && !r.err.message.includes('127.0.0.1'), r.err.message);
  } finally {
    wrong.close();
  }
});

test('TLS is required by the server and verified as libpq does', async (t) => {
  const ca = cluster.tlsCa;
  if (!ca) {
    t.skip('an external server, or no openssl: the server takes no TLS the tests made');
    return;
  }
  const db = await cluster.database();
  const opens = (url) => {
    const side = driverSide(url);
    try {
      const r = side.attempt(() => side.Connection.open('glance'));
      if (r.err) assert.ok(!r.err.message.includes(PASSWORD), r.err.message);
      return r;
    } finally {
      side.close();
    }
  };
  const withParams = (params) => `${db.url}?${params}`;
  const localhost = (params) => withParams(params).replace('@127.0.0.1:', '@localhost:');
  // The default (prefer) and require: encrypted, as libpq.
  assert.ok(opens(db.url).ok);
  assert.ok(opens(withParams('sslmode=require')).ok);
  // Without TLS the server refuses.
  assert.ok(opens(withParams('sslmode=disable')).err);
  // verify-full: the CA and the name must match.
  assert.ok(opens(localhost(`sslmode=verify-full&sslrootcert=${ca}`)).ok);
  const mismatch = opens(withParams(`sslmode=verify-full&sslrootcert=${ca}`));
  assert.equal(mismatch.err?.code, 'unavailable', JSON.stringify(mismatch));
  // verify-ca: the CA must match, any name.
  assert.ok(opens(withParams(`sslmode=verify-ca&sslrootcert=${ca}`)).ok);
  // Another CA: refused, whatever the name; require with a root checks it.
  const other = makeCa(tmp(), 'other');
  assert.ok(opens(localhost(`sslmode=verify-full&sslrootcert=${other.ca}`)).err);
  assert.ok(opens(withParams(`sslmode=verify-ca&sslrootcert=${other.ca}`)).err);
  assert.ok(opens(withParams(`sslmode=require&sslrootcert=${other.ca}`)).err);
  // What psycopg2 also accepts: SQLAlchemy's form, client_encoding.
  const sqlalchemy = localhost(`sslmode=verify-full&sslrootcert=${ca}&client_encoding=utf8`).replace('postgresql://', 'postgresql+psycopg2://');
  assert.ok(opens(sqlalchemy).ok);
  // A driver works over it.
  const cache = await ImageCache.open(tmp(), {
    driver: 'centralized',
    fallbackToSqlite: false,
    databases: { glance: localhost(`sslmode=verify-full&sslrootcert=${ca}`) },
    driverOptions: { worker_self_reference_url: 'http://tls:9292' },
  });
  caches.push(cache);
  await cache.cache('over-tls', 'bytes');
  assert.equal((await cache.readImage('over-tls')).toString(), 'bytes');
});

test('losing the database mid-run fails calls by their deadline; they recover when it is back', async (t) => {
  if (!cluster.local) {
    t.skip('an external server is not ours to stop');
    return;
  }
  const db = await cluster.database();
  const root = tmp();
  const cache = await node(db, 'http://n:9292', { root, limits: { callDeadlineMs: 3000 } });
  await cache.cache('kept', imageBytes(1, 2000));
  await cache.readImage('kept');

  cluster.stopServer();
  try {
    let started = Date.now();
    await assert.rejects(cache.cache('new', imageBytes(2, 2000)), (e) => {
      // The commit could not record the image: the write is aborted.
      assert.ok(['io', 'database', 'driver-fault'].includes(e.kind), `${e.kind}: ${e.message}`);
      assert.ok(e.message.includes('glance'), e.message);
      assert.ok(!e.message.includes(PASSWORD), e.message);
      return true;
    });
    assert.ok(Date.now() - started < 4000, `${Date.now() - started} ms`);
    await assert.rejects(cache.listCached(), (e) => e.kind === 'database' && !e.message.includes(PASSWORD));
    await assert.rejects(cache.readImage('kept'), 'the hit cannot be counted');
    // No image file lost, none half-published.
    assert.ok(fs.existsSync(path.join(root, 'kept')));
    assert.ok(!fs.existsSync(path.join(root, 'new')));
    assert.ok(!fs.existsSync(path.join(root, 'incomplete', 'new')));
    assert.equal(await cache.isCached('kept'), true);
  } finally {
    cluster.startServer();
  }
  // Back by itself: dead connections are dropped.
  const until = Date.now() + 20_000;
  for (;;) {
    try {
      const images = await cache.listCached();
      assert.equal(images.length, 1);
      assert.equal(images[0].hits, 1);
      break;
    } catch (e) {
      assert.ok(Date.now() < until, `the driver did not recover: ${e.message}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  await cache.cache('new', imageBytes(2, 2000));
  await cache.readImage('kept');
  assert.equal(await cache.getHitCount('kept'), 2);
  assert.deepEqual(await ids(cache), ['kept', 'new']);

  // A server that stops answering (frozen, not gone): the call still ends
  // by its deadline.
  const postmaster = Number(fs.readFileSync(path.join(cluster.local.data, 'postmaster.pid'), 'utf8').split('\n')[0]);
  const pids = [postmaster];
  for (const entry of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = fs.readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]) === postmaster) pids.push(Number(entry));
    } catch {}
  }
  for (const pid of pids) process.kill(pid, 'SIGSTOP');
  let took;
  try {
    const started = Date.now();
    await assert.rejects(cache.listCached());
    took = Date.now() - started;
  } finally {
    for (const pid of pids) process.kill(pid, 'SIGCONT');
  }
  assert.ok(took < 5000, `took ${took} ms`);
  const back = Date.now() + 20_000;
  for (;;) {
    try {
      await cache.listCached();
      break;
    } catch (e) {
      assert.ok(Date.now() < back, `no recovery after the freeze: ${e.message}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }
});

test('rows and files are reconciled; ids longer than Glance\'s 36 characters get no row', async () => {
  const db = await cluster.database();
  const root = tmp();
  const nodeUrl = 'http://reconcile:9292';
  const cache = await node(db, nodeUrl, { root });
  await cache.cache('a', 'aaaa');
  await cache.cache('b', 'bb');
  fs.writeFileSync(path.join(root, 'copied-in'), 'xyz');
  fs.rmSync(path.join(root, 'b'));
  assert.deepEqual(await ids(cache), ['a', 'copied-in']);
  assert.deepEqual(await cache.getCachedNodes('b'), [nodeUrl]);
  assert.deepEqual(await cache.getCachedNodes('copied-in'), []);
  await cache.readImage('copied-in');
  assert.equal(await cache.getHitCount('copied-in'), 1);
  assert.deepEqual(await cache.getCachedNodes('copied-in'), [nodeUrl]);
  await db.sql("UPDATE cached_images SET last_modified = last_modified - interval '1 hour'");
  await cache.clean(86_400);
  assert.deepEqual(await db.sql("SELECT string_agg(image_id, ',' ORDER BY image_id) FROM cached_images"), [['a,copied-in']]);
  const long = 'l'.repeat(100);
  await cache.cache(long, 'long');
  assert.equal((await cache.readImage(long)).toString(), 'long');
  assert.equal(await cache.getHitCount(long), 0);
  assert.deepEqual(await cache.getCachedNodes(long), []);
});

test('hot swap from sqlite to centralized and back on a live root', async () => {
  const db = await cluster.database();
  const root = tmp();
  const cache = await ImageCache.open(root, {
    driver: 'sqlite',
    fallbackToSqlite: false,
    databases: { glance: db.url },
    driverOptions: { worker_self_reference_url: 'http://swap:9292' },
  });
  caches.push(cache);
  await cache.cache(UUID_A, imageBytes(1, 100));
  await cache.readImage(UUID_A);
  await cache.readImage(UUID_A);
  assert.equal(await cache.getHitCount(UUID_A), 2);
  await cache.swapDriver('centralized');
  assert.equal(cache.driverInfo.name, 'centralized');
  assert.deepEqual(await ids(cache), [UUID_A]);
  assert.equal(await cache.getHitCount(UUID_A), 0);
  await cache.readImage(UUID_A);
  assert.equal(await cache.getHitCount(UUID_A), 1);
  assert.deepEqual(await cache.getCachedNodes(UUID_A), ['http://swap:9292']);
  await cache.swapDriver('sqlite');
  assert.equal(await cache.getHitCount(UUID_A), 2);
  await assert.rejects(cache.getCachedNodes(UUID_A), (e) => e instanceof CacheError && e.kind === 'unsupported');
});
