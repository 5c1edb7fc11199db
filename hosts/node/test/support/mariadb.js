// A throwaway MariaDB for the centralized driver's tests on MySQL, as the
// Rust tests' tests/support/mariadb.rs makes it: one server per test
// process, mariadb-install-db + mariadbd in a temporary directory (as the
// `mysql` user when the tests run as root), a Unix socket there for the
// administrator and a free loopback port for the drivers, killed when the
// process exits. IMAGE_CACHE_TEST_MARIADB=mysql://root:pw@host:port/ uses a
// running server instead (an administrator who may create accounts and
// databases; its TLS is its own business).
//
// Drivers connect over TCP with a password (the tests look for it in every
// message), each test in a database of its own with an account of its own
// (named as the database): MySQL's accounts are server-wide, and one
// granted the cache tables of two databases holds more than a driver of
// either needs. Our own server takes TCP connections over TLS only
// (require_secure_transport), with a certificate for `localhost` signed by
// a CA made here with openssl (`tlsCa`); the tests administer it over the
// Unix socket (as root, without a password) with mysql2.

import fs from 'node:fs';
import os from 'node:os';
import net from 'node:net';
import path from 'node:path';
import { spawn, spawnSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { MYSQL_GLANCE_CACHE_SCHEMA, mysqlGrantStatements } from '../../src/database/settings.js';
import { makeCa } from './pg.js';

const require = createRequire(import.meta.url);
const mysql = require('mysql2');

/** Debian's server binaries (mariadb-server). */
export const MARIADBD = '/usr/sbin/mariadbd';
export const INSTALL_DB = '/usr/bin/mariadb-install-db';
/** A running server to use instead of starting one. */
export const MARIADB_ENV = 'IMAGE_CACHE_TEST_MARIADB';
/** The drivers' accounts' password: the tests look for it. */
export const PASSWORD = 'Pw-7a1d4b-m4r1a';
/** An account with every privilege (ALL ON *.*), for the tests that need
 * one and for the fence to refuse. */
export const ADMIN = 'cache_admin';
const PREFIX = 'image-cache-node-mariadb-';

const isRoot = () => process.getuid?.() === 0;

function run(cmd, args, what) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${what} failed (${r.status}): ${r.stdout}${r.stderr}${r.error ?? ''}`);
  return r.stdout;
}

/** Why no MariaDB can be had here, or null. */
export function unavailable() {
  if (process.env[MARIADB_ENV]?.trim()) return null;
  if (!fs.existsSync(MARIADBD) || !fs.existsSync(INSTALL_DB)) {
    return `MariaDB server binaries are missing (${MARIADBD}): the centralized driver's MySQL tests need a real server; install it with \`apt-get install -y mariadb-server\`, or point ${MARIADB_ENV} at a running server (mysql://root:password@host:port/)`;
  }
  if (spawnSync('openssl', ['version']).status !== 0) {
    return `openssl is missing: the test server's TLS certificate is made with it (\`apt-get install -y openssl\`), or point ${MARIADB_ENV} at a running server`;
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

function killPidFile(dir) {
  try {
    const pid = Number(fs.readFileSync(path.join(dir, 'mariadb.pid'), 'utf8').trim());
    if (pid > 0) process.kill(pid, 'SIGKILL');
  } catch {}
}

/** Servers of test processes that were killed: stopped and removed. */
function stopAbandoned() {
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
    killPidFile(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

/** A CA (openssl, as test/support/pg.js makes it) and a certificate for
 * `localhost` it signed (not 127.0.0.1: the name check has something to
 * fail on), in `dir`. The CA's file. */
function makeCertificates(dir) {
  const ca = makeCa(dir, 'ca');
  if (!ca) throw new Error('openssl is needed to make the test server its certificate');
  const key = path.join(dir, 'server.key');
  const csr = path.join(dir, 'server.csr');
  const ext = path.join(dir, 'server.ext');
  fs.writeFileSync(ext, 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n');
  run('openssl', ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', '/CN=localhost'], 'server key');
  run('openssl', ['x509', '-req', '-in', csr, '-CA', ca.ca, '-CAkey', ca.key, '-CAcreateserial', '-out', path.join(dir, 'server.crt'), '-days', '3', '-extfile', ext], 'server certificate');
  return ca.ca;
}

/** Run `sql` (several statements) on a mysql2 connection made with
 * `config`; the rows of the last one, as arrays. */
async function adminSql(config, sql) {
  const c = mysql.createConnection({ ...config, multipleStatements: true, rowsAsArray: true, supportBigNumbers: true, bigNumberStrings: true, dateStrings: true });
  try {
    const [rows, fields] = await new Promise((resolve, reject) => {
      c.query(sql, (err, r, f) => (err ? reject(err) : resolve([r, f])));
    });
    if (Array.isArray(fields) && fields.some((f) => f === undefined || Array.isArray(f))) {
      // Several statements: the rows of the last that returned rows.
      for (let i = fields.length - 1; i >= 0; i--) if (Array.isArray(fields[i])) return rows[i];
      return [];
    }
    return fields === undefined ? [] : rows;
  } finally {
    await new Promise((resolve) => c.end(() => resolve()));
  }
}

export class Server {
  constructor({ host, port, admin, local }) {
    this.host = host;
    this.port = port;
    this.admin = admin; // mysql2 options of an administrator
    this.local = local; // {dir, asMysql, ca, child} or null
    this.next = 0;
  }

  static async start() {
    const url = process.env[MARIADB_ENV]?.trim();
    if (url) {
      const u = new URL(url.replace(/^[a-z+]+:\/\//, 'mysql://'));
      const s = new Server({
        host: u.hostname,
        port: Number(u.port || 3306),
        admin: {
          host: u.hostname,
          port: Number(u.port || 3306),
          user: decodeURIComponent(u.username || 'root'),
          password: u.password ? decodeURIComponent(u.password) : undefined,
        },
        local: null,
      });
      await s.createAccount();
      return s;
    }
    const why = unavailable();
    if (why) throw new Error(why);
    stopAbandoned();
    const asMysql = isRoot();
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), PREFIX));
    fs.writeFileSync(path.join(dir, 'owner.pid'), String(process.pid));
    const ca = makeCertificates(dir);
    for (const f of fs.readdirSync(dir)) fs.chmodSync(path.join(dir, f), 0o644);
    if (asMysql) run('chown', ['-R', 'mysql:mysql', dir], 'chown of the MariaDB directory');
    const install = ['--no-defaults', `--datadir=${path.join(dir, 'data')}`, '--auth-root-authentication-method=normal', '--skip-test-db'];
    if (asMysql) install.push('--user=mysql');
    run(INSTALL_DB, install, 'mariadb-install-db');
    const s = new Server({
      host: '127.0.0.1',
      port: await freePort(),
      admin: { socketPath: path.join(dir, 'mariadb.sock'), user: 'root' },
      local: { dir, asMysql, ca, child: null },
    });
    process.once('exit', () => s.destroy());
    await s.startServer();
    await s.createAccount();
    return s;
  }

  /** Start our server (again), waiting until it takes connections. */
  async startServer() {
    const l = this.local;
    const dir = l.dir;
    const args = [
      '--no-defaults',
      `--datadir=${path.join(dir, 'data')}`,
      `--socket=${path.join(dir, 'mariadb.sock')}`,
      `--pid-file=${path.join(dir, 'mariadb.pid')}`,
      `--log-error=${path.join(dir, 'server.log')}`,
      `--port=${this.port}`,
      '--bind-address=127.0.0.1',
      '--skip-name-resolve',
      '--skip-log-bin',
      '--max-connections=300',
      '--innodb-buffer-pool-size=32M',
      '--innodb-log-file-size=16M',
      // The kernel keeps what a killed server wrote; commits stay
      // synchronous to the server.
      '--innodb-flush-log-at-trx-commit=2',
      `--ssl-ca=${l.ca}`,
      `--ssl-cert=${path.join(dir, 'server.crt')}`,
      `--ssl-key=${path.join(dir, 'server.key')}`,
      '--require-secure-transport=ON',
    ];
    if (l.asMysql) args.push('--user=mysql');
    l.child = spawn(MARIADBD, args, { stdio: 'ignore' });
    l.child.unref();
    const started = Date.now();
    for (;;) {
      try {
        await adminSql(this.admin, 'SELECT 1');
        return;
      } catch (e) {
        if (Date.now() - started > 60_000) {
          const log = fs.readFileSync(path.join(dir, 'server.log'), 'utf8');
          throw new Error(`MariaDB did not start in 60 s (${e.message}): ${log}`);
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Stop our server at once (connections are cut, as in a crash). */
  async stopServer() {
    const child = this.local.child;
    this.local.child = null;
    if (!child || child.exitCode !== null) return;
    const gone = new Promise((resolve) => child.once('exit', resolve));
    child.kill('SIGKILL');
    await gone;
  }

  /** Kill and remove our server (at exit). */
  destroy() {
    if (!this.local || this.destroyed) return;
    this.destroyed = true;
    try {
      this.local.child?.kill('SIGKILL');
    } catch {}
    killPidFile(this.local.dir);
    fs.rmSync(this.local.dir, { recursive: true, force: true });
  }

  /** The CA of our server's certificate (null for an external server). */
  get tlsCa() {
    return this.local?.ca ?? null;
  }

  /** Run SQL as the administrator (in `database`, if any); the rows of the
   * last statement, as arrays (numbers as text). */
  sql(database, text) {
    return adminSql(database ? { ...this.admin, database } : this.admin, text);
  }

  async createAccount() {
    await this.sql(null, `CREATE USER IF NOT EXISTS '${ADMIN}'@'%' IDENTIFIED BY '${PASSWORD}'; GRANT ALL PRIVILEGES ON *.* TO '${ADMIN}'@'%'`);
  }

  /** A URL of `account` for `database` over TCP, with the TLS parameters
   * `tls` (`?ssl_ca=...`). */
  url(account, database, tls = this.defaultTls) {
    return `mysql+pymysql://${account}:${PASSWORD}@${this.host}:${this.port}/${database}${tls}`;
  }

  /** The TLS parameters our server needs (ssl_mode=REQUIRED: encrypted,
   * the certificate not checked; the TLS test checks it). */
  get defaultTls() {
    return this.local ? '?ssl_mode=REQUIRED' : '';
  }

  /** A new database as an operator sets it up: Glance's two tables (as its
   * migration makes them), the drivers' account granted what `image-cache
   * db grants --mysql` prints. */
  async database() {
    const db = await this.bareDatabase();
    await db.sql(MYSQL_GLANCE_CACHE_SCHEMA.join(';\n'));
    await db.grantCachePrivileges(db.name);
    return db;
  }

  /** A new, empty database, and its drivers' account with nothing yet. */
  async bareDatabase() {
    const name = `icn_${process.pid}_${this.next++}`;
    await this.sql(null, `CREATE DATABASE ${name}; CREATE USER '${name}'@'%' IDENTIFIED BY '${PASSWORD}'`);
    return new TestDatabase(this, name);
  }
}

/** A database of one test. */
export class TestDatabase {
  constructor(server, name) {
    this.server = server;
    this.name = name;
    /** As the drivers' account (named as the database), with its password,
     * over TCP. */
    this.url = server.url(name, name);
    /** As an account with every privilege. */
    this.adminUrl = server.url(ADMIN, name);
  }

  /** Run SQL as the administrator in this database; rows as arrays. */
  sql(text) {
    return this.server.sql(this.name, text);
  }

  /** The first column of the first row, as text. */
  async value(text) {
    const rows = await this.sql(text);
    const v = rows[0]?.[0];
    return v === undefined || v === null ? null : Buffer.isBuffer(v) ? v.toString('utf8') : String(v);
  }

  /** Run what `image-cache db grants --mysql` prints for `account`. */
  grantCachePrivileges(account) {
    return this.server.sql(null, mysqlGrantStatements(account, this.name).join('\n'));
  }
}
