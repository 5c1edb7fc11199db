// A throwaway PostgreSQL 15 for the centralized driver's tests, as the Rust
// tests' tests/support/pg.rs makes it: one cluster per test process,
// initdb + pg_ctl in a temporary directory (run as the `postgres` user when
// the tests run as root), a Unix socket there for the administrator and a
// free loopback port for the drivers, stopped when the process exits.
// IMAGE_CACHE_TEST_POSTGRES=postgresql://admin@host:port/postgres uses a
// running server instead (the admin may create roles and databases).
//
// Drivers connect over TCP as the role `glance` with a password (so the
// tests see that no error ever shows it), each test in a database of its
// own. Our own cluster takes TCP connections over TLS only (hostssl), with
// a certificate for `localhost` from a CA made here with openssl (when
// openssl is there; otherwise over plain TCP).

import fs from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { grantStatements, GLANCE_CACHE_SCHEMA } from '../../src/database/settings.js';

const require = createRequire(import.meta.url);
const pg = require('pg');

export const PG_BIN = '/usr/lib/postgresql/15/bin';
export const PG_ENV = 'IMAGE_CACHE_TEST_POSTGRES';
export const ROLE = 'glance';
export const PASSWORD = 'Pw-9f3c2e-s3cr3t';
const PREFIX = 'image-cache-node-pg-';

const isRoot = () => process.getuid?.() === 0;

function run(cmd, args, what, { asPostgres = false } = {}) {
  const [c, a] = asPostgres ? ['runuser', ['-u', 'postgres', '--', cmd, ...args]] : [cmd, args];
  const r = spawnSync(c, a, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}${r.error ?? ''}`);
  return r.stdout;
}

/** Why no PostgreSQL can be had here, or null. */
export function unavailable() {
  if (process.env[PG_ENV]?.trim()) return null;
  if (!fs.existsSync(path.join(PG_BIN, 'initdb')) || !fs.existsSync(path.join(PG_BIN, 'pg_ctl'))) {
    return `PostgreSQL server binaries are missing (${PG_BIN}/initdb): install them with \`apt-get install -y postgresql-15\`, or point ${PG_ENV} at a running server`;
  }
  return null;
}

async function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** Clusters of test processes that were killed: stopped and removed. */
function stopAbandoned(asPostgres) {
  for (const name of fs.readdirSync(os.tmpdir())) {
    if (!name.startsWith(PREFIX)) continue;
    const dir = path.join(os.tmpdir(), name);
    let owner;
    try {
      owner = fs.readFileSync(path.join(dir, 'owner.pid'), 'utf8').trim();
    } catch {
      continue;
    }
    if (fs.existsSync(`/proc/${owner}`)) continue;
    try {
      run(path.join(PG_BIN, 'pg_ctl'), ['stop', '-m', 'immediate', '-D', path.join(dir, 'data')], 'pg_ctl stop', { asPostgres });
    } catch {}
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A CA and a certificate for `localhost` it signed (openssl): the CA's
 * PEM file, or null without openssl. */
export function makeCa(dir, name = 'ca') {
  const ca = path.join(dir, `${name}.crt`);
  const key = path.join(dir, `${name}.key`);
  const r = spawnSync('openssl', [
    'req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', ca,
    '-days', '3', '-subj', '/CN=image-cache test CA', '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign',
  ], { encoding: 'utf8' });
  if (r.status !== 0) return null;
  return { ca, key };
}

function serveTlsOnly(data, dir) {
  const ca = makeCa(dir);
  if (!ca) return null;
  const serverKey = path.join(data, 'server.key');
  const csr = path.join(dir, 'server.csr');
  const ext = path.join(dir, 'server.ext');
  fs.writeFileSync(ext, 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n');
  run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', serverKey, '-out', csr, '-subj', '/CN=localhost'], 'server key');
  run('openssl', ['x509', '-req', '-in', csr, '-CA', ca.ca, '-CAkey', ca.key, '-CAcreateserial', '-out', path.join(data, 'server.crt'), '-days', '3', '-extfile', ext], 'server certificate');
  fs.chmodSync(serverKey, 0o600);
  fs.chmodSync(ca.ca, 0o644);
  fs.appendFileSync(path.join(data, 'postgresql.conf'), "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
  const hba = path.join(data, 'pg_hba.conf');
  const lines = fs.readFileSync(hba, 'utf8').split('\n').map((l) => (l.startsWith('host ') ? `hostssl ${l.slice(5)}` : l));
  lines.push('hostnossl all all all reject', '');
  fs.writeFileSync(hba, lines.join('\n'));
  return ca.ca;
}

export class Cluster {
  constructor({ admin, host, port, local }) {
    this.admin = admin; // pg client config of an administrator (no database)
    this.host = host;
    this.port = port;
    this.local = local; // {dir, data, asPostgres, ca} or null
    this.next = 0;
  }

  static async start() {
    const url = process.env[PG_ENV]?.trim();
    if (url) {
      const u = new URL(url);
      const c = new Cluster({
        admin: { connectionString: url },
        host: u.hostname,
        port: Number(u.port || 5432),
        local: null,
      });
      await c.createRole();
      return c;
    }
    const why = unavailable();
    if (why) throw new Error(why);
    const asPostgres = isRoot();
    stopAbandoned(asPostgres);
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), PREFIX));
    fs.writeFileSync(path.join(dir, 'owner.pid'), String(process.pid));
    if (asPostgres) run('chown', ['-R', 'postgres:postgres', dir], 'chown of the cluster directory');
    const data = path.join(dir, 'data');
    run(path.join(PG_BIN, 'initdb'), ['-U', 'postgres', '-E', 'UTF8', '--no-sync', '-A', 'trust', '--auth-host=scram-sha-256', '-D', data], 'initdb', { asPostgres });
    const ca = serveTlsOnly(data, dir);
    if (asPostgres) run('chown', ['-R', 'postgres:postgres', data], 'chown of the cluster TLS files');
    const port = await freePort();
    const c = new Cluster({
      admin: { host: dir, port, user: 'postgres' },
      host: '127.0.0.1',
      port,
      local: { dir, data, asPostgres, ca },
    });
    process.once('exit', () => c.destroy());
    c.startServer();
    await c.createRole();
    return c;
  }

  /** Start our cluster (again), waiting until it takes connections. */
  startServer() {
    const l = this.local;
    run(
      path.join(PG_BIN, 'pg_ctl'),
      ['start', '-w', '-t', '60', '-D', l.data, '-l', path.join(l.dir, 'server.log'), '-o',
        `-p ${this.port} -k ${l.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300`],
      'pg_ctl start',
      { asPostgres: l.asPostgres },
    );
  }

  /** Stop our cluster at once (connections are cut, as in a crash). */
  stopServer() {
    const l = this.local;
    run(path.join(PG_BIN, 'pg_ctl'), ['stop', '-w', '-m', 'immediate', '-D', l.data], 'pg_ctl stop', { asPostgres: l.asPostgres });
  }

  /** Stop and remove our cluster (at exit). */
  destroy() {
    if (!this.local || this.destroyed) return;
    this.destroyed = true;
    try {
      this.stopServer();
    } catch {}
    fs.rmSync(this.local.dir, { recursive: true, force: true });
  }

  /** The CA of our cluster's certificate (null: an external server, or no
   * openssl here). */
  get tlsCa() {
    return this.local?.ca ?? null;
  }

  /** Run SQL as the administrator in `database`; the rows (arrays). */
  async sql(database, text) {
    const config = this.admin.connectionString
      ? { connectionString: withDatabase(this.admin.connectionString, database) }
      : { ...this.admin, database };
    const client = new pg.Client(config);
    await client.connect();
    try {
      const r = await client.query({ text, rowMode: 'array' });
      const last = Array.isArray(r) ? r[r.length - 1] : r;
      return last.rows ?? [];
    } finally {
      await client.end();
    }
  }

  async createRole() {
    await this.sql(
      'postgres',
      `DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '${ROLE}') THEN CREATE ROLE ${ROLE} LOGIN PASSWORD '${PASSWORD}'; END IF; END $$`,
    );
    if (this.local) await this.sql('postgres', `ALTER ROLE postgres PASSWORD '${PASSWORD}'`);
  }

  async newDatabase(owner = '') {
    const name = `icn_${process.pid}_${this.next++}`;
    await this.sql('postgres', `CREATE DATABASE ${name}${owner}`);
    return new TestDatabase(this, name);
  }

  /** A database as an operator sets it up for the cache: Glance's two
   * tables, and the drivers' role fenced by exactly the grants
   * `image-cache db grants` prints. */
  async database() {
    const db = await this.newDatabase();
    await db.sql(GLANCE_CACHE_SCHEMA);
    await db.grantCachePrivileges(ROLE);
    return db;
  }

  /** An empty database owned by the drivers' role (statement-check tests;
   * its connections must allow a privileged role). */
  ownedDatabase() {
    return this.newDatabase(` OWNER ${ROLE}`);
  }

  /** An empty database without Glance's tables; the role may connect. */
  async bareDatabase() {
    const db = await this.newDatabase();
    await db.sql(`GRANT CONNECT ON DATABASE ${db.name} TO ${ROLE}`);
    return db;
  }
}

function withDatabase(url, database) {
  const u = new URL(url);
  u.pathname = `/${database}`;
  return u.toString();
}

export class TestDatabase {
  constructor(cluster, name) {
    this.cluster = cluster;
    this.name = name;
    /** As the drivers' role, with its password, over TCP. */
    this.url = `postgresql://${ROLE}:${PASSWORD}@${cluster.host}:${cluster.port}/${name}`;
    /** As the cluster's superuser (our own cluster only). */
    this.superuserUrl = cluster.local ? `postgresql://postgres:${PASSWORD}@${cluster.host}:${cluster.port}/${name}` : null;
  }

  /** Run SQL as the administrator in this database; rows as arrays. */
  sql(text) {
    return this.cluster.sql(this.name, text);
  }

  /** The first column of the first row, as text. */
  async value(text) {
    const rows = await this.sql(text);
    return rows[0]?.[0] === undefined || rows[0]?.[0] === null ? null : String(rows[0][0]);
  }

  grantCachePrivileges(role) {
    return this.sql(grantStatements(role, this.name).join('\n'));
  }
}
