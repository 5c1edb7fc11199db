// The centralized driver on the Node host, on a real MariaDB (see
// test/support/mariadb.js): the `database` import's MySQL backend, its
// statement policy (the Rust host's MySQL rules, same attack strings), its
// account fence (SHOW GRANTS), parameters and results, bounds, errors and
// TLS; and the driver itself: nodes sharing one database, Glance's own
// tables, the database going away and coming back. The same behaviour as
// the Rust host's host/src/database/mysql.rs.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ImageCache } from '../src/index.js';
import { check } from '../src/database/policy.js';
import {
  dialectOfUrl,
  parseMysqlUrl,
  databaseSettings,
  mysqlGrantStatements,
  MYSQL_GLANCE_CACHE_SCHEMA,
} from '../src/database/settings.js';
import {
  MysqlBackend,
  grantProblems,
  daysFromCivil,
  binaryTime,
  columnValue,
  mysqlParam,
  sessionSetup,
  serverLimits,
  errorCode,
} from '../src/database/mysql.js';
import { Databases } from '../src/database/service.js';
import { makeDatabaseImports } from '../src/host/database.js';
import { Server, PASSWORD, ADMIN } from './support/mariadb.js';
import { makeCa } from './support/pg.js';

const UUID_A = '6f1e9d2a-4a8b-4c3e-9d7f-0a1b2c3d4e5f';
const UUID_B = '0c9b8a7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d';

const dirs = [];
function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-central-my-'));
  dirs.push(d);
  return d;
}

/** Bytes of the Rust tests' image_bytes(seed, n). */
function imageBytes(seed, n) {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

const text = (s) => ({ tag: 'text', val: s });
const integer = (n) => ({ tag: 'integer', val: BigInt(n) });
const real = (x) => ({ tag: 'real', val: x });

// ---- the statement policy on MySQL (no server needed) ----------------------

describe('the statement policy on MySQL (policy.rs, ported)', () => {
  test('allows what the centralized driver runs', () => {
    for (const sql of POLICY.mysql.allowed) {
      assert.equal(check(sql, 'mysql'), null, sql);
    }
  });

  test('refuses what reaches beyond the tables', () => {
    for (const sql of MYSQL_ATTACKS) {
      assert.notEqual(check(sql, 'mysql'), null, `${sql} was allowed on MySQL`);
    }
    // What PostgreSQL reads as a dollar quote is plain text on MySQL.
    assert.match(check("SELECT $a$, load_file('x'), $a$", 'mysql'), /"load_file"/);
    assert.equal(check("SELECT $a$, load_file('x'), $a$", 'postgresql'), null);
    // The messages say what to change.
    assert.equal(check('SELECT 1 -- x', 'mysql'), 'comments are not allowed in MySQL statements (the server runs /*! ... */ and reads 1--1 as arithmetic)');
    assert.equal(check('SELECT @@datadir', 'mysql'), 'variables (@name, @@name) are not allowed');
    assert.equal(check('SELECT * FROM `mysql`.`user`', 'mysql'), 'a driver\'s SQL may not use "mysql"');
    assert.equal(check('SELECT `unterminated', 'mysql'), 'unterminated quoted identifier in SQL');
    // PostgreSQL's rules are unchanged: comments are skipped there.
    assert.equal(check('SELECT /* SET ROLE postgres; */ 1'), null);
    assert.notEqual(check('SELECT /* x */ 1', 'mysql'), null);
  });
});

/** The shared cases every host's check plays (tests/scenarios/sql_policy.json). */
const POLICY = JSON.parse(
  fs.readFileSync(new URL('../../../tests/scenarios/sql_policy.json', import.meta.url), 'utf8'),
);
const MYSQL_ATTACKS = POLICY.mysql.refused;

// ---- settings, the account fence and values (no server needed) -------------

describe('MySQL settings, grants and values (no server needed)', () => {
  test('the URL says which server: PostgreSQL or MySQL/MariaDB, with or without +driver', () => {
    assert.equal(dialectOfUrl('postgresql+psycopg2://u:p@h/d'), 'postgresql');
    assert.equal(dialectOfUrl('postgres://u@h/d'), 'postgresql');
    assert.equal(dialectOfUrl('host=/run/postgresql dbname=glance'), 'postgresql');
    assert.equal(dialectOfUrl('mysql+pymysql://u:p@h/d'), 'mysql');
    assert.equal(dialectOfUrl(' mysql://u:p@h/d '), 'mysql');
    assert.equal(dialectOfUrl('mariadb+mariadbconnector://u:p@h/d'), 'mysql');
    assert.throws(
      () => dialectOfUrl('oracle://glance:hunter22@db/glance'),
      (e) => /"oracle" URL; the centralized driver needs PostgreSQL \(postgresql:\/\/\.\.\.\), MySQL or MariaDB/.test(e.message) && !e.message.includes('hunter22'),
    );
    assert.throws(() => dialectOfUrl('glance:hunter22@db'), (e) => /not a URL/.test(e.message) && !e.message.includes('hunter22'));
  });

  test("Glance's URLs parse as the Rust host's Target::parse reads them, and never show the password", () => {
    const t = parseMysqlUrl('mysql+pymysql://glance:s%40cret@db.example:3307/glance?charset=utf8');
    assert.deepEqual([t.host, t.port, t.user, t.password, t.database, t.tls.mode], ['db.example', 3307, 'glance', 's@cret', 'glance', 'disabled']);
    assert.equal(parseMysqlUrl('mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem').tls.mode, 'verify-identity');
    assert.equal(parseMysqlUrl('mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_check_hostname=false').tls.mode, 'verify-ca');
    assert.equal(parseMysqlUrl('mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_verify_cert=false').tls.mode, 'required');
    assert.equal(parseMysqlUrl('mysql://u:p@h/d?ssl_mode=REQUIRED').tls.mode, 'required');
    assert.equal(parseMysqlUrl('mysql://u:p@h/d?ssl_mode=verify_ca').tls.mode, 'verify-ca');
    assert.equal(parseMysqlUrl('mysql://u:p@h/d?ssl_verify_cert=true').tls.mode, 'verify-identity');
    assert.equal(parseMysqlUrl('mysql://u:p@h/d?ssl_ca=/ca.pem&ssl_disabled=false').tls.mode, 'verify-identity');
    assert.equal(parseMysqlUrl('mysql://u:p@h/d').port, 3306);
    const sock = parseMysqlUrl('mysql://u:p@localhost/d?unix_socket=/run/mysqld/mysqld.sock&connect_timeout=2.5&read_timeout=30&write_timeout=30');
    assert.deepEqual([sock.socket, sock.connectTimeoutMs], ['/run/mysqld/mysqld.sock', 2500]);
    for (const [bad, says] of [
      ['mysql://u:hunter22@h/d?ssl_mode=PREFERRED', /PREFERRED is not supported: it falls back to plain text/],
      ['mysql://u:hunter22@h/d?ssl_mode=sometimes', /ssl_mode "SOMETIMES" is not one of DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY/],
      ['mysql://u:hunter22@h/d?sslmode=require', /a parameter this host does not know: "sslmode"/],
      ['mysql://u:hunter22@h/d?charset=latin1', /charset "latin1" is not supported: the host speaks utf8mb4/],
      ['mysql://u:hunter22@h/d?ssl_cert=/c.pem', /ssl_cert and ssl_key go together/],
      ['mysql://u:hunter22@h/d?ssl_ca=/ca.pem&ssl_mode=DISABLED', /TLS files are given but TLS is disabled/],
      ['mysql://u:hunter22@h:notaport/d', /not a valid MySQL URL/],
      ['mysql://u:hunter22@h/d?ssl_verify_cert=maybe', /ssl_verify_cert must be true or false, not "maybe"/],
      ['mysql://u:hunter22@h/d?connect_timeout=soon', /connect_timeout must be seconds/],
    ]) {
      assert.throws(() => parseMysqlUrl(bad), (e) => says.test(e.message) && !e.message.includes('hunter22'), bad);
    }
    // The configured database: its name in every message, never the URL.
    assert.throws(
      () => databaseSettings('glance', 'mysql+pymysql://glance:hunter22@db.internal/'),
      (e) => e.message === 'the connection URL of database "glance" names no database (mysql+pymysql://user:password@host/glance)',
    );
    assert.throws(
      () => databaseSettings('glance', 'mysql+pymysql://glance:hunter22@db.internal/glance?ssl_ca=/nonexistent/ca.pem'),
      (e) => /the connection URL of database "glance": ssl_ca \/nonexistent\/ca.pem: ENOENT/.test(e.message) && !e.message.includes('hunter22'),
    );
    const s = databaseSettings('glance', 'mysql+pymysql://glance:hunter22@db.internal:3307/glance', { callDeadlineMs: 7000 });
    assert.deepEqual(
      [s.dialect, s.poolSize, s.statementTimeoutMs, s.connectTimeoutMs, s.maxResultBytes, s.allowPrivilegedRole, s.tls],
      ['mysql', 4, 7000, 10_000, 64 << 20, false, null],
    );
    const m = new MysqlBackend(s).scrub('Access denied for user glance@db.internal:3307 (using password hunter22)');
    assert.ok(!m.includes('hunter22') && !m.includes('db.internal'), m);
  });

  test('TLS per the URL becomes mysql2\'s ssl option', () => {
    const dir = tmp();
    const ca = makeCa(dir, 'ca');
    if (!ca) return; // no openssl here
    const with_ = (q) => databaseSettings('glance', `mysql://u:p@h/d?${q}`).tls;
    assert.deepEqual(Object.keys(with_(`ssl_ca=${ca.ca}`)).sort(), ['ca', 'rejectUnauthorized', 'verifyIdentity']);
    assert.deepEqual([with_(`ssl_ca=${ca.ca}`).rejectUnauthorized, with_(`ssl_ca=${ca.ca}`).verifyIdentity], [true, true]);
    assert.deepEqual([with_(`ssl_ca=${ca.ca}&ssl_check_hostname=false`).rejectUnauthorized, with_(`ssl_ca=${ca.ca}&ssl_check_hostname=false`).verifyIdentity], [true, false]);
    assert.deepEqual(with_('ssl_mode=REQUIRED'), { rejectUnauthorized: false, verifyIdentity: false });
    const client = with_(`ssl_mode=VERIFY_CA&ssl_ca=${ca.ca}&ssl_cert=${ca.ca}&ssl_key=${ca.key}`);
    assert.ok(client.cert.includes('BEGIN CERTIFICATE') && client.key.includes('PRIVATE KEY'));
  });

  test('grants beyond the cache tables are problems (grant_problems, ported)', () => {
    const fenced = [
      "GRANT USAGE ON *.* TO `glance`@`%` IDENTIFIED BY PASSWORD '*ABC'",
      'GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`cached_images` TO `glance`@`%`',
      'GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`node_reference` TO `glance`@`%`',
    ];
    assert.deepEqual(grantProblems(fenced, 'ic_1'), { problems: [], missing: [] });
    // As the server prints them under ANSI_QUOTES.
    assert.deepEqual(grantProblems(fenced.map((g) => g.replaceAll('`', '"')), 'ic_1'), { problems: [], missing: [] });
    for (const [extra, says] of [
      ['GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION', 'ALL PRIVILEGES on *.*'],
      ['GRANT FILE ON *.* TO `glance`@`%`', 'FILE on *.*'],
      ['GRANT ALL PRIVILEGES ON `ic\\_1`.* TO `glance`@`%`', 'ALL PRIVILEGES on ic_1.*'],
      ['GRANT SELECT ON `ic_1`.`images` TO `glance`@`%`', 'SELECT on ic_1.images'],
      ['GRANT DROP ON `ic_1`.`cached_images` TO `glance`@`%`', 'DROP on ic_1.cached_images'],
      ['GRANT SELECT ON `other`.`cached_images` TO `glance`@`%`', 'SELECT on other.cached_images'],
      ['GRANT `dba` TO `glance`@`%`', 'role `dba`'],
      ["GRANT PROXY ON ''@'%' TO 'glance'@'%'", 'proxy'],
      ['GRANT EXECUTE ON PROCEDURE `ic_1`.`p` TO `glance`@`%`', 'EXECUTE on PROCEDURE'],
      ['GRANT SELECT (`id`), UPDATE (`hits`) ON `ic_1`.`secrets` TO `glance`@`%`', 'SELECT on ic_1.secrets'],
    ]) {
      const { problems } = grantProblems([...fenced, extra], 'ic_1');
      assert.ok(problems.some((p) => p.includes(says)), `${extra}: ${JSON.stringify(problems)}`);
    }
    assert.equal(grantProblems(fenced.slice(0, 2), 'ic_1').missing.length, 4);
    const { problems } = grantProblems([`${fenced[1]} WITH GRANT OPTION`], 'ic_1');
    assert.ok(problems.some((p) => p.includes('GRANT OPTION')), JSON.stringify(problems));
    // `image-cache db grants --mysql`.
    assert.equal(
      mysqlGrantStatements('image_cache', 'glance')[0],
      "GRANT SELECT, INSERT, UPDATE, DELETE ON `glance`.`cached_images` TO 'image_cache'@'%';",
    );
    assert.ok(mysqlGrantStatements('cache@10.0.0.%', 'g')[1].endsWith("TO 'cache'@'10.0.0.%';"));
  });

  test('values go as they are and come back as the WIT says; sessions are set up as the Rust host sets them', () => {
    assert.equal(daysFromCivil(1970, 1, 1), 0);
    assert.equal(daysFromCivil(2000, 3, 1), 11_017);
    const dt = Buffer.alloc(11);
    dt.writeUInt16LE(2026, 0);
    dt.set([12, 7, 9, 30, 0], 2);
    dt.writeUInt32LE(500_000, 7);
    assert.equal(binaryTime(dt), 1_796_635_800.5);
    assert.equal(binaryTime(dt.subarray(0, 4)), 1_796_601_600);
    assert.throws(() => binaryTime(Buffer.alloc(0)), /0-0-0 is not a time/);
    const field = (type, characterSet = 224) => ({ columnType: type, characterSet });
    assert.deepEqual(columnValue('9007199254740993', field(0x08)), integer(9007199254740993n));
    assert.throws(() => columnValue('18446744073709551615', field(0x08)), /does not fit in a signed 64-bit integer/);
    assert.deepEqual(columnValue(Buffer.from('12.50'), field(0xf6)), real(12.5));
    assert.deepEqual(columnValue(Buffer.from([0, 255]), field(0xfd, 63)), { tag: 'blob', val: new Uint8Array([0, 255]) });
    assert.deepEqual(columnValue(Buffer.from('héllo'), field(0xfd)), text('héllo'));
    assert.throws(() => columnValue(Buffer.from([0xff]), field(0xfd)), /text that is not UTF-8/);
    assert.throws(() => columnValue(Buffer.from([0]), field(0x0b)), /its type TIME is not one this interface carries; cast it/);
    assert.deepEqual(columnValue(null, field(0x0b)), { tag: 'null' });
    assert.throws(() => mysqlParam(real(Infinity)), /inf is not a number the server can store/);
    assert.equal(mysqlParam({ tag: 'boolean', val: true }).value, 1n);
    assert.equal(mysqlParam(integer(2n ** 62n)).value, 2n ** 62n);
    assert.equal(mysqlParam({ tag: 'null' }), null);
    assert.ok(Buffer.isBuffer(mysqlParam({ tag: 'blob', val: new Uint8Array([1]) })));
    assert.deepEqual(sessionSetup(30_000), [
      "SET SESSION time_zone = '+00:00', sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,NO_ENGINE_SUBSTITUTION,NO_BACKSLASH_ESCAPES,ANSI_QUOTES', character_set_results = 'utf8mb4'",
      'SET SESSION innodb_lock_wait_timeout = 30, lock_wait_timeout = 30',
    ]);
    assert.equal(serverLimits('10.11.19-MariaDB-0+deb12u1', 2500), 'SET SESSION max_statement_time = 2.500, idle_transaction_timeout = 2');
    assert.equal(serverLimits('8.0.36', 2500), 'SET SESSION max_execution_time = 2500');
    assert.deepEqual([1062, 1205, 1969, 1317, 1142, 1045, 2013, 1153, 1146].map(errorCode), [
      'constraint', 'timed-out', 'timed-out', 'timed-out', 'access-denied', 'unavailable', 'unavailable', 'limit-exceeded', 'other',
    ]);
  });
});

// ---- on a real server ----------------------------------------------------

let server;
const caches = [];
before(async () => {
  server = await Server.start();
});
after(async () => {
  for (const c of caches) await c.close().catch(() => {});
  server?.destroy();
  for (const d of dirs) fs.rmSync(d, { recursive: true, force: true });
});

/** A cache with the centralized driver as node `nodeUrl` of `db`. */
async function node(db, nodeUrl, { root = tmp(), url = db.url, database = {}, limits, onWarning } = {}) {
  const cache = await ImageCache.open(root, {
    driver: 'centralized',
    fallbackToSqlite: false,
    databases: { glance: { url, ...database } },
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
function driverSide(config, { maxConnections = 4, warnings = [] } = {}) {
  const dbs = new Databases({ glance: config }, { onWarning: (m) => warnings.push(m) });
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

/** Whether the driver's account (`url`) may open the database; the
 * error's payload otherwise. */
function opens(url) {
  const side = driverSide(url);
  try {
    const r = side.attempt(() => side.Connection.open('glance'));
    if (r.err) assert.ok(!r.err.message.includes(PASSWORD), r.err.message);
    return r;
  } finally {
    side.close();
  }
}

test('two nodes share one database and keep their own caches', async () => {
  const db = await server.database();
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
      "SELECT CONCAT(n.node_reference_url, ' ', c.image_id, ' ', c.hits) FROM cached_images c JOIN node_reference n USING (node_reference_id) ORDER BY 1",
    ),
    [[`http://node-2:9292 ${UUID_A} 0`]],
  );
  assert.equal(await db.value('SELECT COUNT(*) FROM node_reference'), '2', 'one node_reference row per node');
});

test("Glance's own tables work as they are; without them the driver names glance-manage db sync", async () => {
  const glance = await server.bareDatabase();
  // Glance's migrations made the tables (the administrator owns them); the
  // cache's account has what `image-cache db grants --mysql` says.
  await glance.sql(MYSQL_GLANCE_CACHE_SCHEMA.map((t) => t.replace(' IF NOT EXISTS', '')).join(';\n'));
  await glance.grantCachePrivileges(glance.name);
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
  // What this driver writes, Glance reads: UTC, whole seconds, hits, md5 hex.
  await cache.cache(UUID_B, 'hello', { checksum: 'md5:5d41402abc4b2a76b9719d911017c592' });
  assert.deepEqual(
    await glance.sql(
      'SELECT hits, size, checksum, ABS(TIMESTAMPDIFF(SECOND, last_modified, UTC_TIMESTAMP())) < 60 ' +
        `FROM cached_images WHERE image_id = '${UUID_B}'`,
    ),
    [[0, '5', '5d41402abc4b2a76b9719d911017c592', 1]],
  );
  const reader = await cache.openForRead(UUID_B);
  assert.equal(await reader.checksum(), '5d41402abc4b2a76b9719d911017c592');
  await reader.close();

  // The tables gone (the account keeps its grants on them, as MySQL keeps
  // table privileges past DROP TABLE): refused, naming Glance's
  // migrations; the driver creates nothing.
  const bare = await server.database();
  await bare.sql('DROP TABLE cached_images; DROP TABLE node_reference');
  await assert.rejects(node(bare, 'http://fresh:9292'), (e) => {
    assert.equal(e.kind, 'bad-configuration', e.message);
    assert.match(e.message, /Glance's table node_reference is missing/);
    assert.ok(e.message.includes('glance-manage db sync') && e.message.includes('image-cache db init'), e.message);
    assert.ok(!e.message.includes(PASSWORD), e.message);
    return true;
  });
  // Likewise for an account that may do everything (allowed).
  await assert.rejects(node(bare, 'http://fresh:9292', { url: bare.adminUrl, database: { allowPrivilegedRole: true } }), (e) => {
    assert.equal(e.kind, 'bad-configuration', e.message);
    assert.match(e.message, /glance-manage db sync/);
    return true;
  });
  assert.deepEqual(await bare.sql('SHOW TABLES'), []);
});

test('an account with more than the cache tables is refused with the grants to run, unless allowed', async () => {
  const db = await server.database();
  // cache_admin: ALL PRIVILEGES ON *.*.
  const warnings = [];
  const open = (allow) =>
    node(db, 'http://n:9292', { url: db.adminUrl, database: { allowPrivilegedRole: allow }, onWarning: (m) => warnings.push(m) });
  await assert.rejects(open(false), (e) => {
    assert.equal(e.kind, 'bad-configuration', e.message);
    assert.match(e.message, /refused: the configured role holds ALL PRIVILEGES on \*\.\*/);
    assert.ok(e.message.includes('image-cache db grants --mysql'), e.message);
    assert.ok(e.message.includes(`GRANT SELECT, INSERT, UPDATE, DELETE ON \`${db.name}\`.\`cached_images\` TO 'image_cache'@'%';`), e.message);
    assert.ok(!e.message.includes(PASSWORD), e.message);
    return true;
  });
  const allowed = await open(true);
  await allowed.cache('x', 'y');
  assert.match(warnings.join('\n'), /holds ALL PRIVILEGES on \*\.\*.*allowed by configuration/);

  // The import refuses at open, access-denied, as the Rust host does: the
  // driver's own account with one grant too many, then without it.
  const account = `'${db.name}'@'%'`;
  const other = await server.database();
  await db.sql('CREATE TABLE images (id VARCHAR(36))');
  for (const [grant, revoke, expected] of [
    [`GRANT ALL PRIVILEGES ON ${db.name}.* TO ${account}`, `REVOKE ALL PRIVILEGES ON ${db.name}.* FROM ${account}`, `ALL PRIVILEGES on ${db.name}.*`],
    [`GRANT SELECT ON ${db.name}.images TO ${account}`, `REVOKE SELECT ON ${db.name}.images FROM ${account}`, `SELECT on ${db.name}.images`],
    [`GRANT DROP ON ${db.name}.cached_images TO ${account}`, `REVOKE DROP ON ${db.name}.cached_images FROM ${account}`, `DROP on ${db.name}.cached_images`],
    [`GRANT FILE ON *.* TO ${account}`, `REVOKE FILE ON *.* FROM ${account}`, 'FILE on *.*'],
    // An account granted two databases' cache tables holds more than a
    // driver of either needs.
    [
      mysqlGrantStatements(db.name, other.name).join(' '),
      `REVOKE SELECT, INSERT, UPDATE, DELETE ON ${other.name}.cached_images FROM ${account}; REVOKE SELECT, INSERT, UPDATE, DELETE ON ${other.name}.node_reference FROM ${account}`,
      `SELECT on ${other.name}.cached_images`,
    ],
    [
      `GRANT SELECT ON ${db.name}.cached_images TO ${account} WITH GRANT OPTION`,
      `REVOKE GRANT OPTION ON ${db.name}.cached_images FROM ${account}`,
      'may grant its privileges (WITH GRANT OPTION)',
    ],
  ]) {
    await server.sql(null, grant);
    const r = opens(db.url);
    assert.equal(r.err?.code, 'access-denied', `${grant}: ${JSON.stringify(r)}`);
    assert.ok(r.err.message.includes(expected), r.err.message);
    assert.ok(r.err.message.includes('image-cache db grants --mysql'), r.err.message);
    await server.sql(null, revoke);
    assert.ok(opens(db.url).ok, `${revoke}: accepted again`);
  }
});

test('SQL that reaches beyond the tables is refused (access-denied) and changes nothing', async () => {
  const db = await server.database();
  const side = driverSide({ url: db.adminUrl, allowPrivilegedRole: true });
  const canary = tmp();
  const target = path.join(canary, 'pwned');
  try {
    const c = side.Connection.open('glance');
    assert.equal(c.dialect(), 'mysql');
    c.execute('CREATE TABLE t (s VARCHAR(10))', []);
    for (const sql of [
      ...MYSQL_ATTACKS,
      `SELECT * FROM t INTO OUTFILE '${target}'`,
      `SELECT 'x' INTO DUMPFILE '${target}'`,
      "SELECT 1 /*!50000 , LOAD_FILE('/etc/passwd') */",
      'SELECT 1; DROP TABLE t',
      'DROP TABLE t',
      'TRUNCATE t',
      'ALTER TABLE t ADD COLUMN x INT',
      "SELECT $a$, load_file('x'), $a$",
      'CREATE DATABASE evil',
      "SELECT sys_eval('id')",
    ]) {
      const r = side.attempt(() => c.query(sql, []));
      assert.equal(r.err?.code, 'access-denied', `${sql}: ${JSON.stringify(r)}`);
      assert.match(r.err.message, /^database "glance": /);
    }
    assert.ok(!fs.existsSync(target));
    // The table is still there and the connection still works.
    assert.equal(c.execute('INSERT INTO t VALUES (?)', [text('ok')]), 1n);
    assert.deepEqual(c.query('SELECT s FROM t', []), [[text('ok')]]);
  } finally {
    side.close();
  }
});

test('parameters go as they are; values come back typed; server errors keep their number and SQLSTATE', async () => {
  const db = await server.database();
  const side = driverSide({ url: db.adminUrl, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    c.execute(
      'CREATE TABLE t (i INTEGER, b BIGINT, f DOUBLE, s VARCHAR(4), x VARBINARY(8), at DATETIME(6), ok BOOLEAN, d DECIMAL(10, 2), u BIGINT UNSIGNED, tm TIME)',
      [],
    );
    const insert = 'INSERT INTO t VALUES (?, ?, ?, ?, ?, FROM_UNIXTIME(?), ?, ?, ?, ?)';
    const good = [
      integer(7),
      integer(2n ** 62n + 1n),
      real(0.1),
      text('abcd'),
      { tag: 'blob', val: new Uint8Array([0, 1, 255]) },
      real(1_700_000_000.25),
      { tag: 'boolean', val: true },
      real(12.5),
      { tag: 'null' },
      { tag: 'null' },
    ];
    assert.equal(c.execute(insert, good), 1n);
    const rows = c.query('SELECT * FROM t', []);
    assert.deepEqual(rows, [
      [
        integer(7),
        integer(2n ** 62n + 1n),
        real(0.1),
        text('abcd'),
        { tag: 'blob', val: new Uint8Array([0, 1, 255]) },
        real(1_700_000_000.25),
        integer(1),
        real(12.5),
        { tag: 'null' },
        { tag: 'null' },
      ],
    ]);
    // Rows matched, as PostgreSQL counts them (client_found_rows).
    assert.equal(c.execute('UPDATE t SET i = ? WHERE i = ?', [integer(7), integer(7)]), 1n);
    // Parameters are checked before anything runs.
    const r = side.attempt(() => c.execute(insert, [{ tag: 'null' }]));
    assert.equal(r.err?.code, 'other');
    assert.match(r.err.message, /the statement has 10 parameters, 1 values were given/);
    const inf = [...good];
    inf[2] = real(Infinity);
    assert.match(side.attempt(() => c.execute(insert, inf)).err.message, /parameter 3: inf is not a number the server can store/);
    // Too long for VARCHAR(4) in strict mode: the server says so.
    const long = [...good];
    long[3] = text('abcde');
    assert.match(side.attempt(() => c.execute(insert, long)).err.message, /^database "glance": ERROR 1406 \(22001\): Data too long for column/);
    // Types the interface does not carry must be cast; DECIMAL is a real;
    // a value past i64 is an error naming the column.
    c.execute("UPDATE t SET u = 18446744073709551615, tm = '10:00:00'", []);
    assert.match(side.attempt(() => c.query('SELECT u FROM t', [])).err.message, /column 1: 18446744073709551615 does not fit in a signed 64-bit integer/);
    assert.match(side.attempt(() => c.query('SELECT tm FROM t', [])).err.message, /column 1: its type TIME is not one this interface carries; cast it/);
    assert.deepEqual(c.query('SELECT CAST(tm AS CHAR), CAST(1.25 AS DECIMAL(5, 2)), ? + 1, ? FROM t', [integer(41), text('é')]), [
      [text('10:00:00'), real(1.25), integer(42), text('é')],
    ]);
    // Strings are read as the check reads them: no backslash escapes;
    // "x" is a name (ANSI_QUOTES); times are UTC.
    assert.deepEqual(c.query("SELECT 'a\\b', CAST(UNIX_TIMESTAMP('1970-01-02 00:00:00') AS SIGNED), \"s\" FROM t", []), [[text('a\\b'), integer(86_400), text('abcd')]]);
    // A missing table names 42S02, as the centralized guest expects.
    const missing = side.attempt(() => c.query('SELECT * FROM no_such_table', []));
    assert.equal(missing.err.code, 'other');
    assert.match(missing.err.message, /^database "glance": ERROR 1146 \(42S02\): Table '.*\.no_such_table' doesn't exist$/);
    // A constraint violated.
    c.execute('CREATE TABLE u (k INTEGER PRIMARY KEY)', []);
    c.execute('INSERT INTO u VALUES (?)', [integer(1)]);
    const dup = side.attempt(() => c.execute('INSERT INTO u VALUES (?)', [integer(1)]));
    assert.equal(dup.err.code, 'constraint');
    assert.match(dup.err.message, /^database "glance": ERROR 1062 \(23000\): Duplicate entry/);
    assert.deepEqual(c.query('SELECT k FROM u', []), [[integer(1)]], 'the connection still works');
  } finally {
    side.close();
  }
});

test('results, time and connections are bounded', async () => {
  const db = await server.database();
  const side = driverSide({ url: db.adminUrl, maxResultBytes: 10_000, poolSize: 2, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    const rows100 = "WITH RECURSIVE n (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 100) SELECT REPEAT('x', 1000) FROM n";
    const big = side.attempt(() => c.query(rows100, []));
    assert.equal(big.err?.code, 'limit-exceeded', JSON.stringify(big));
    assert.match(big.err.message, /query result exceeds 10000 bytes/);
    assert.deepEqual(c.query('SELECT 1', []), [[integer(1)]], 'the connection still works');

    // A statement that runs past the deadline is stopped there, and on the
    // server too (KILL QUERY).
    side.within(500);
    let started = Date.now();
    const slow = side.attempt(() => c.query('SELECT SLEEP(5)', []));
    assert.equal(slow.err?.code, 'timed-out', JSON.stringify(slow));
    assert.ok(Date.now() - started < 1500, `${Date.now() - started} ms`);
    const until = Date.now() + 3000;
    while ((await db.value("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'SELECT SLEEP(5)%'")) !== '0') {
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
      Number(await db.value(`SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '${ADMIN}' AND DB = '${db.name}'`)) <= 2,
    );
    // An instance holds at most its share.
    const s2 = driverSide({ url: db.adminUrl, poolSize: 8, allowPrivilegedRole: true }, { maxConnections: 2 });
    try {
      const held = [s2.Connection.open('glance'), s2.Connection.open('glance')];
      const over = s2.attempt(() => s2.Connection.open('glance'));
      assert.equal(over.err?.code, 'limit-exceeded');
      assert.match(over.err.message, /at most 2 database connections/);
      held.forEach((h) => h[Symbol.dispose]());
    } finally {
      s2.close();
    }
  } finally {
    side.close();
  }
  // The session's own limit (max_statement_time) stops what the deadline
  // would not: a statement timeout shorter than the call.
  const limited = driverSide({ url: db.adminUrl, statementTimeoutMs: 1000, allowPrivilegedRole: true });
  try {
    const c = limited.Connection.open('glance');
    const started = Date.now();
    const r = limited.attempt(() => c.query('SELECT COUNT(*) FROM (SELECT SLEEP(3)) s', []));
    assert.ok(Date.now() - started < 2500, `${Date.now() - started} ms`);
    // MariaDB ends SLEEP early and says so, or answers ERROR 1969.
    if (r.err) assert.equal(r.err.code, 'timed-out', JSON.stringify(r));
  } finally {
    limited.close();
  }
});

test('a transaction left open is rolled back: on drop, and when the driver call returns', async () => {
  const db = await server.database();
  const side = driverSide({ url: db.adminUrl, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    c.execute('CREATE TABLE t (i INTEGER PRIMARY KEY) ENGINE=InnoDB', []);
    c.execute('BEGIN', []);
    c.execute('INSERT INTO t VALUES (1)', []);
    c[Symbol.dispose]();
    const d = side.Connection.open('glance');
    assert.deepEqual(d.query('SELECT COUNT(*) FROM t', []), [[integer(0)]]);
    // Not inside the abandoned transaction: this commits by itself.
    d.execute('INSERT INTO t VALUES (2)', []);
    const e = side.Connection.open('glance');
    assert.deepEqual(e.query('SELECT COUNT(*) FROM t', []), [[integer(1)]]);

    // A row lock taken in a transaction holds while the call runs, and
    // goes when it returns (the host's end of every export call).
    e.execute('BEGIN', []);
    assert.deepEqual(e.query('SELECT i FROM t WHERE i = 2 FOR UPDATE', []), [[integer(2)]]);
    await assert.rejects(db.sql('SET SESSION innodb_lock_wait_timeout = 1; UPDATE t SET i = 3 WHERE i = 2'), /Lock wait timeout/);
    side.endOfCall();
    await db.sql('SET SESSION innodb_lock_wait_timeout = 5; UPDATE t SET i = 3 WHERE i = 2');
    assert.deepEqual(e.query('SELECT i FROM t', []), [[integer(3)]], 'the connection is usable');
  } finally {
    side.close();
  }
});

test('errors never show the password or the host; a wrong password is unavailable', async () => {
  const db = await server.database();
  const side = driverSide({ url: db.adminUrl, allowPrivilegedRole: true });
  try {
    const c = side.Connection.open('glance');
    for (const sql of ['SELECT * FROM no_such_table', `SELECT '${PASSWORD}' + 'x' FROM no_such_table`, 'INSERT INTO nowhere VALUES (1)', `SELECT ${PASSWORD}`]) {
      const r = side.attempt(() => c.query(sql, []));
      assert.ok(r.err, sql);
      assert.ok(!r.err.message.includes(PASSWORD), r.err.message);
      assert.ok(!r.err.message.includes('127.0.0.1'), r.err.message);
    }
  } finally {
    side.close();
  }
  // The fenced account, refused a table: the server names the account and
  // its address; the address is hidden.
  const fenced = driverSide(db.url);
  try {
    const r = fenced.attempt(() => fenced.Connection.open('glance').query('SELECT 1 FROM secrets', []));
    assert.equal(r.err?.code, 'access-denied', JSON.stringify(r));
    assert.ok(!r.err.message.includes('127.0.0.1') && !r.err.message.includes(PASSWORD), r.err.message);
  } finally {
    fenced.close();
  }
  // A wrong password: unavailable, and the password is not in it.
  const wrong = driverSide(db.url.replace(PASSWORD, 'not-the-password'));
  try {
    const r = wrong.attempt(() => wrong.Connection.open('glance'));
    assert.equal(r.err?.code, 'unavailable', JSON.stringify(r));
    assert.match(r.err.message, /ERROR 1045 \(28000\)/);
    assert.ok(!r.err.message.includes('not-the-password') && !r.err.message.includes('127.0.0.1'), r.err.message);
  } finally {
    wrong.close();
  }
});

test('an unreachable server is a database error that never shows the password or the address; other URLs are refused', async () => {
  const netServer = await import('node:net').then((net) => net.createServer());
  const port = await new Promise((r) => netServer.listen(0, '127.0.0.1', () => r(netServer.address().port)));
  await new Promise((r) => netServer.close(r));
  for (const fallbackToSqlite of [false, true]) {
    await assert.rejects(
      ImageCache.open(tmp(), {
        driver: 'centralized',
        fallbackToSqlite,
        databases: { glance: `mysql+pymysql://glance:${PASSWORD}@127.0.0.1:${port}/glance` },
        driverOptions: { worker_self_reference_url: 'http://n:9292' },
        onWarning: () => {},
      }),
      (e) => {
        assert.equal(e.kind, 'database', e.message);
        assert.ok(e.message.includes('"glance"') && e.message.includes('cannot be reached'), e.message);
        assert.ok(!e.message.includes(PASSWORD) && !e.message.includes(String(port)) && !e.message.includes('127.0.0.1'), e.message);
        return true;
      },
    );
  }
  await assert.rejects(
    ImageCache.open(tmp(), { driver: 'centralized', databases: { glance: `mysql+pymysql://glance:${PASSWORD}@db/glance?ssl_mode=PREFERRED` } }),
    (e) => e.kind === 'bad-configuration' && /PREFERRED is not supported/.test(e.message) && !e.message.includes(PASSWORD),
  );
});

test('TLS is required by the server and verified per the URL', async (t) => {
  const ca = server.tlsCa;
  if (!ca) {
    t.skip('an external server: its TLS is its own business');
    return;
  }
  const db = await server.database();
  const url = (params) => server.url(db.name, db.name, `?${params}`);
  const localhost = (params) => url(params).replace('@127.0.0.1:', '@localhost:');
  // Without TLS the server refuses (require_secure_transport).
  const plain = opens(url('ssl_mode=DISABLED'));
  assert.ok(plain.err, JSON.stringify(plain));
  assert.ok(opens(server.url(db.name, db.name, '')).err, 'no TLS parameter: plain, refused');
  // REQUIRED: encrypted, not checked.
  assert.ok(opens(url('ssl_mode=REQUIRED')).ok);
  // ssl_ca: the CA and the name must match (PyMySQL's default).
  assert.ok(opens(localhost(`ssl_ca=${ca}`)).ok);
  assert.ok(opens(localhost(`ssl_mode=VERIFY_IDENTITY&ssl_ca=${ca}`)).ok);
  const mismatch = opens(url(`ssl_ca=${ca}`));
  assert.equal(mismatch.err?.code, 'unavailable', JSON.stringify(mismatch));
  assert.match(mismatch.err.message, /TLS handshake/);
  // ssl_check_hostname=false (VERIFY_CA): the CA must match, any name.
  assert.ok(opens(url(`ssl_ca=${ca}&ssl_check_hostname=false`)).ok);
  assert.ok(opens(url(`ssl_mode=VERIFY_CA&ssl_ca=${ca}`)).ok);
  // Another CA: refused, whatever the name; unless told not to verify.
  const other = makeCa(tmp(), 'other');
  assert.equal(opens(localhost(`ssl_ca=${other.ca}`)).err?.code, 'unavailable');
  assert.equal(opens(url(`ssl_ca=${other.ca}&ssl_check_hostname=false`)).err?.code, 'unavailable');
  assert.ok(opens(url(`ssl_ca=${other.ca}&ssl_verify_cert=false`)).ok);
  // A driver works over it.
  const cache = await node(db, 'http://tls:9292', { url: localhost(`ssl_ca=${ca}&charset=utf8mb4`) });
  await cache.cache('over-tls', 'bytes');
  assert.equal((await cache.readImage('over-tls')).toString(), 'bytes');
});

test('losing the database mid-run fails calls by their deadline; they recover when it is back', async (t) => {
  if (!server.local) {
    t.skip('an external server is not ours to stop');
    return;
  }
  const db = await server.database();
  const root = tmp();
  const cache = await node(db, 'http://n:9292', { root, limits: { callDeadlineMs: 3000 } });
  await cache.cache('kept', imageBytes(1, 2000));
  await cache.readImage('kept');

  await server.stopServer();
  try {
    const started = Date.now();
    await assert.rejects(cache.cache('new', imageBytes(2, 2000)), (e) => {
      // The commit could not record the image: the write is aborted.
      assert.ok(['io', 'database', 'driver-fault'].includes(e.kind), `${e.kind}: ${e.message}`);
      assert.ok(e.message.includes('glance'), e.message);
      assert.ok(!e.message.includes(PASSWORD), e.message);
      return true;
    });
    assert.ok(Date.now() - started < 4000, `${Date.now() - started} ms`);
    await assert.rejects(cache.listCached(), (e) => e.kind === 'database' && !e.message.includes(PASSWORD) && !e.message.includes('127.0.0.1'));
    await assert.rejects(cache.readImage('kept'), 'the hit cannot be counted');
    // No image file lost, none half-published.
    assert.ok(fs.existsSync(path.join(root, 'kept')));
    assert.ok(!fs.existsSync(path.join(root, 'new')));
    assert.ok(!fs.existsSync(path.join(root, 'incomplete', 'new')));
    assert.equal(await cache.isCached('kept'), true);
  } finally {
    await server.startServer();
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
  const pid = server.local.child.pid;
  process.kill(pid, 'SIGSTOP');
  let took;
  try {
    const started = Date.now();
    await assert.rejects(cache.listCached());
    took = Date.now() - started;
  } finally {
    process.kill(pid, 'SIGCONT');
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
