// What the operator configures for a shared database (the `database`
// import's PostgreSQL, MySQL and MariaDB backends), checked in the main
// thread when a cache is opened: the URL (libpq's, SQLAlchemy's or
// PyMySQL's form), its TLS parameters as libpq, PyMySQL or mysqlclient read
// them, the pool and the bounds. Nothing here connects.
//
// The same rules as the Rust host (host/src/database.rs dialect_of_url,
// host/src/database/postgres.rs, host/src/database/tls.rs,
// host/src/database/mysql.rs); errors never contain the URL or the
// password.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** The name the centralized driver opens its database by (Glance's
 * central database). */
export const CENTRALIZED_DATABASE = 'glance';

/** Defaults of one database's settings. */
export const DATABASE_DEFAULTS = {
  /** Most connections the backend's pool holds (all the drivers of one
   * cache together). */
  poolSize: 4,
  /** How long opening a connection may take at most (ms). */
  connectTimeoutMs: 10_000,
  /** Most bytes one query's result may hold. */
  maxResultBytes: 64 * 1024 * 1024,
  /** Accept a role with more than a cache driver needs (a superuser,
   * Glance's own role, an owner of tables): for tests and migrations only;
   * a warning is given. */
  allowPrivilegedRole: false,
  // statementTimeoutMs: the server-side bound of one statement, lock wait
  // and idle transaction; default the driver call's deadline.
};

/** Glance's two cache tables as its migrations create them on PostgreSQL
 * (the 2024.1 `cache` migration, as SQLAlchemy emits it): what
 * `image-cache db init` runs for a database of the cache's own. Drivers
 * never create them. */
export const GLANCE_CACHE_SCHEMA = `CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGSERIAL NOT NULL,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE IF NOT EXISTS cached_images (
    id BIGSERIAL NOT NULL,
    image_id VARCHAR(36) NOT NULL,
    last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);
`;

/** The tables a cache driver's role may read and write, and nothing else. */
export const CACHE_TABLES = ['cached_images', 'node_reference'];
/** Their sequences (BIGSERIAL), which inserts need USAGE on. */
export const CACHE_SEQUENCES = ['cached_images_id_seq', 'node_reference_node_reference_id_seq'];
/** The DML a cache driver's role needs on CACHE_TABLES. */
export const TABLE_PRIVILEGES = ['SELECT', 'INSERT', 'UPDATE', 'DELETE'];
/** Predefined roles that reach beyond the cache tables. */
export const POWERFUL_ROLES = [
  'pg_read_server_files', 'pg_write_server_files', 'pg_execute_server_program', 'pg_signal_backend',
  'pg_read_all_data', 'pg_write_all_data', 'pg_read_all_settings', 'pg_read_all_stats', 'pg_monitor',
  'pg_checkpoint', 'pg_create_subscription', 'pg_maintain', 'pg_use_reserved_connections',
  'pg_signal_autovacuum_worker',
];

/** An SQL identifier, quoted unless it is a plain lowercase name. */
export function ident(name) {
  const plain = name.length > 0 && /^[a-z0-9_]+$/.test(name) && !/^[0-9]/.test(name);
  return plain ? name : `"${name.replaceAll('"', '""')}"`;
}

/** The SQL an administrator runs (in `database`, as the owner of Glance's
 * tables) to give the cache's role exactly the privileges a driver needs:
 * what `image-cache db grants` prints.
 * @param {string} role
 * @param {string} database
 * @returns {string[]} */
export function grantStatements(role, database) {
  const [r, d] = [ident(role), ident(database)];
  return [
    `GRANT CONNECT ON DATABASE ${d} TO ${r};`,
    `GRANT USAGE ON SCHEMA public TO ${r};`,
    `GRANT ${TABLE_PRIVILEGES.join(', ')} ON ${CACHE_TABLES.join(', ')} TO ${r};`,
    `GRANT USAGE ON SEQUENCE ${CACHE_SEQUENCES.join(', ')} TO ${r};`,
    'REVOKE CREATE ON SCHEMA public FROM PUBLIC;',
  ];
}

/** A SQLAlchemy database URL (`postgresql+psycopg2://...`) as a libpq one;
 * a libpq URL or key=value string as it is. Errors never contain the URL. */
export function libpqUrl(url) {
  url = String(url).trim();
  const at = url.indexOf('://');
  if (at < 0) {
    // libpq's key=value form (`host=/run/postgresql dbname=glance`).
    if (url.includes('=')) return url;
    throw new Error('the database connection is not a URL (postgresql://user:password@host/db)');
  }
  const scheme = url.slice(0, at);
  const dialect = scheme.split('+')[0];
  if (dialect === 'postgresql' || dialect === 'postgres') return `postgresql://${url.slice(at + 3)}`;
  throw new Error(
    `the database connection is a ${JSON.stringify(dialect)} URL; the centralized driver needs PostgreSQL (postgresql://...)`,
  );
}

/** `%XX` (and `+`) decoding of a URL query component. */
function decode(s) {
  return decodePart(s.replaceAll('+', ' '));
}

/** `%XX` decoding without `+` (userinfo, host, path). */
function decodePart(s) {
  try {
    return decodeURIComponent(s);
  } catch {
    return s;
  }
}

const SSL_MODES = {
  disable: 'disable',
  allow: 'prefer',
  prefer: 'prefer',
  require: 'require',
  'verify-ca': 'verify-ca',
  'verify-full': 'verify-full',
};

/** Connection parameters a URL may carry besides TLS (as libpq names
 * them); anything else is refused, naming the parameter. */
const KNOWN = new Set([
  'host', 'hostaddr', 'port', 'dbname', 'user', 'password', 'connect_timeout', 'application_name',
  'options', 'keepalives', 'keepalives_idle', 'target_session_attrs', 'fallback_application_name',
]);

/** A libpq URL or key=value string as its parts: {host, port, user,
 * password, database, options, tls: {mode, rootCert, clientCert, clientKey},
 * connectTimeoutMs?}. Throws without naming the URL. */
export function parseUrl(libpq) {
  const params = {};
  const tls = { mode: 'prefer', rootCert: null, clientCert: null, clientKey: null };
  const take = (key, value) => {
    switch (key) {
      case 'sslmode':
        if (!(value in SSL_MODES)) {
          throw new Error(`sslmode=${JSON.stringify(value)} is not one of disable, allow, prefer, require, verify-ca, verify-full`);
        }
        tls.mode = SSL_MODES[value];
        return;
      case 'sslrootcert':
        tls.rootCert = value;
        return;
      case 'sslcert':
        tls.clientCert = value;
        return;
      case 'sslkey':
        tls.clientKey = value;
        return;
      case 'client_encoding':
        if (!['utf8', 'unicode'].includes(value.toLowerCase().replace(/[-_]/g, ''))) {
          throw new Error(`client_encoding=${JSON.stringify(value)}: the cache speaks UTF8 only`);
        }
        return;
      default:
        if (!KNOWN.has(key)) throw new Error(`it has a parameter ${JSON.stringify(key)} this host does not know`);
        params[key] = value;
    }
  };
  if (libpq.includes('://')) {
    const m = /^postgresql:\/\/([^/?#]*)(?:\/([^?#]*))?(?:\?([^#]*))?$/.exec(libpq);
    if (!m) throw new Error('it is not a valid PostgreSQL URL');
    let authority = m[1];
    const at = authority.lastIndexOf('@');
    if (at >= 0) {
      const userinfo = authority.slice(0, at);
      authority = authority.slice(at + 1);
      const colon = userinfo.indexOf(':');
      if (colon >= 0) {
        params.user = decodePart(userinfo.slice(0, colon));
        params.password = decodePart(userinfo.slice(colon + 1));
      } else {
        params.user = decodePart(userinfo);
      }
    }
    if (authority.includes(',')) throw new Error('it names several hosts; this host connects to one');
    const hp = /^(\[[^\]]*\]|[^:]*)(?::(\d*))?$/.exec(authority);
    if (!hp) throw new Error('it is not a valid PostgreSQL URL');
    if (hp[1]) params.host = decodePart(hp[1].replace(/^\[|\]$/g, ''));
    if (hp[2]) params.port = hp[2];
    if (m[2]) params.dbname = decodePart(m[2]);
    for (const pair of (m[3] ?? '').split('&').filter((p) => p.length > 0)) {
      const eq = pair.indexOf('=');
      const [k, v] = eq < 0 ? [pair, ''] : [pair.slice(0, eq), pair.slice(eq + 1)];
      take(decode(k), decode(v));
    }
  } else {
    // key=value pairs, values optionally in single quotes.
    const re = /\s*([A-Za-z_]+)\s*=\s*(?:'((?:\\.|[^'\\])*)'|(\S*))/gy;
    let m;
    let end = 0;
    while ((m = re.exec(libpq)) !== null) {
      take(m[1], m[2] !== undefined ? m[2].replace(/\\(.)/g, '$1') : m[3]);
      end = re.lastIndex;
    }
    if (libpq.slice(end).trim()) throw new Error('it is not a valid libpq connection string');
  }
  if ((tls.clientCert === null) !== (tls.clientKey === null)) throw new Error('sslcert and sslkey go together: give both or neither');
  const port = params.port === undefined || params.port === '' ? 5432 : Number(params.port);
  if (!Number.isInteger(port) || port < 1 || port > 65535) throw new Error('its port is not a port number');
  if (!params.user) throw new Error('it names no user');
  const host = params.host || params.hostaddr || '/var/run/postgresql';
  let connectTimeoutMs;
  if (params.connect_timeout !== undefined && params.connect_timeout !== '') {
    const s = Number(params.connect_timeout);
    if (!Number.isFinite(s) || s < 0) throw new Error('its connect_timeout is not a number of seconds');
    if (s > 0) connectTimeoutMs = Math.max(2, s) * 1000;
  }
  return {
    host,
    port,
    user: params.user,
    password: params.password ?? null,
    database: params.dbname || params.user,
    options: params.options ?? '',
    tls,
    connectTimeoutMs,
  };
}

/** The PEM text of a file named in the URL, or an error naming the
 * parameter and the file (a path is not a secret). */
function readPem(what, file) {
  try {
    const text = fs.readFileSync(file, 'utf8');
    if (!what.endsWith('key') && !text.includes('-----BEGIN CERTIFICATE-----')) throw new Error('no PEM certificate in it');
    return text;
  } catch (e) {
    throw new Error(`${what} ${file}: ${e.code ?? e.message}`);
  }
}

/** node:tls options for the TLS parameters, as libpq means them (see
 * README.md): `null` for disable. `prefer` is marked so that the backend
 * falls back to a plain connection when the server offers no TLS. */
export function tlsOptions(tls) {
  if (tls.mode === 'disable') return null;
  const out = {};
  if (tls.clientCert) {
    out.cert = readPem('sslcert', tls.clientCert);
    out.key = readPem('sslkey', tls.clientKey);
  }
  const verify = tls.mode === 'verify-ca' || tls.mode === 'verify-full' || (tls.mode === 'require' && tls.rootCert);
  if (!verify) {
    // prefer / require without a root: encrypted, the certificate not
    // checked (libpq).
    out.rejectUnauthorized = false;
    return out;
  }
  let root = tls.rootCert;
  if (!root) {
    const home = os.homedir?.() ?? process.env.HOME;
    const fallback = home ? path.join(home, '.postgresql', 'root.crt') : null;
    if (fallback && fs.existsSync(fallback)) root = fallback;
  }
  // No root anywhere: the web's roots (Node's bundled CAs).
  if (root && root !== 'system') out.ca = readPem('sslrootcert', root);
  out.rejectUnauthorized = true;
  // verify-ca (and require with a root): the chain must lead to the root;
  // the name may be any. verify-full: and issued for the host.
  if (tls.mode !== 'verify-full') out.checkServerIdentity = 'any';
  return out;
}

/** The pool and time bounds of one database's settings `c`. */
function bounds(name, c, callDeadlineMs, urlConnectTimeoutMs) {
  const positive = (key, value) => {
    if (!(Number.isFinite(value) && value >= 1)) throw new Error(`database ${JSON.stringify(name)}: ${key} must be a positive number`);
    return Math.floor(value);
  };
  return {
    poolSize: positive('poolSize', c.poolSize ?? DATABASE_DEFAULTS.poolSize),
    statementTimeoutMs: positive('statementTimeoutMs', c.statementTimeoutMs ?? callDeadlineMs),
    connectTimeoutMs: positive('connectTimeoutMs', c.connectTimeoutMs ?? urlConnectTimeoutMs ?? DATABASE_DEFAULTS.connectTimeoutMs),
    maxResultBytes: positive('maxResultBytes', c.maxResultBytes ?? DATABASE_DEFAULTS.maxResultBytes),
  };
}

/**
 * One database's settings, checked: what the database worker needs, with
 * the strings that must never reach a driver or a message (`secrets`).
 * @param {string} name the name drivers open it by (`glance`)
 * @param {string | {url: string, poolSize?: number, statementTimeoutMs?: number,
 *   connectTimeoutMs?: number, maxResultBytes?: number,
 *   allowPrivilegedRole?: boolean}} config a URL, or the URL and settings
 * @param {{callDeadlineMs?: number}} [defaults] the default statement timeout
 * @returns {object} the settings the database worker's Backend takes
 * @throws {Error} naming the database, never the URL
 */
export function databaseSettings(name, config, { callDeadlineMs = 30_000 } = {}) {
  const c = typeof config === 'string' ? { url: config } : { ...config };
  const where = `the connection URL of database ${JSON.stringify(name)}`;
  if (typeof c.url !== 'string' || !c.url.trim()) throw new Error(`database ${JSON.stringify(name)}: no url is given`);
  let dialect;
  try {
    dialect = dialectOfUrl(c.url);
  } catch (e) {
    throw new Error(`${where}: ${e.message}`);
  }
  if (dialect === 'mysql') return mysqlSettings(name, c, { callDeadlineMs });
  let libpq;
  let parsed;
  let tls;
  try {
    libpq = libpqUrl(c.url);
    parsed = parseUrl(libpq);
    tls = tlsOptions(parsed.tls);
  } catch (e) {
    throw new Error(`${where}: ${e.message}`);
  }
  const { poolSize, statementTimeoutMs, connectTimeoutMs, maxResultBytes } = bounds(name, c, callDeadlineMs, parsed.connectTimeoutMs);
  const secrets = [c.url.trim(), libpq, parsed.password ?? '', parsed.host, `${parsed.host}:${parsed.port}`]
    .filter((s) => s && s.length > 0)
    .sort((a, b) => b.length - a.length);
  return {
    dialect: 'postgresql',
    name,
    host: parsed.host,
    port: parsed.port,
    user: parsed.user,
    password: parsed.password,
    database: parsed.database,
    options: parsed.options,
    tlsMode: parsed.tls.mode,
    tls,
    poolSize,
    statementTimeoutMs,
    connectTimeoutMs,
    maxResultBytes,
    allowPrivilegedRole: Boolean(c.allowPrivilegedRole ?? DATABASE_DEFAULTS.allowPrivilegedRole),
    secrets: [...new Set(secrets)],
  };
}

// ---- which server ---------------------------------------------------------

/** The SQL a configured URL's server speaks, from its scheme: 'postgresql'
 * (postgresql://, postgres://, with or without +driver, or libpq's
 * key=value string) or 'mysql' (mysql://, mariadb://, with or without
 * +driver). Errors never contain the URL (host/src/database.rs). */
export function dialectOfUrl(url) {
  url = String(url).trim();
  const at = url.indexOf('://');
  if (at < 0) {
    if (url.includes('=')) return 'postgresql';
    throw new Error(
      'the database connection is not a URL (postgresql://user:password@host/db or mysql+pymysql://user:password@host/db)',
    );
  }
  const scheme = url.slice(0, at).split('+')[0];
  if (scheme === 'postgresql' || scheme === 'postgres') return 'postgresql';
  if (scheme === 'mysql' || scheme === 'mariadb') return 'mysql';
  throw new Error(
    `the database connection is a ${JSON.stringify(scheme)} URL; the centralized driver needs PostgreSQL (postgresql://...), MySQL or MariaDB (mysql+pymysql://...)`,
  );
}

// ---- MySQL and MariaDB ----------------------------------------------------

/** Glance's two cache tables as its migrations create them on MySQL (the
 * 2024.1 `cache` migration: InnoDB, utf8), one statement each: what
 * `image-cache db init` runs for a database of the cache's own. Drivers
 * never create them. */
export const MYSQL_GLANCE_CACHE_SCHEMA = [
  `CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGINT NOT NULL AUTO_INCREMENT,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
) ENGINE=InnoDB CHARSET=utf8`,
  `CREATE TABLE IF NOT EXISTS cached_images (
    id BIGINT NOT NULL AUTO_INCREMENT,
    image_id VARCHAR(36) NOT NULL,
    last_accessed DATETIME NOT NULL,
    last_modified DATETIME NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
) ENGINE=InnoDB CHARSET=utf8`,
];

/** `name` as a MySQL identifier (backquoted). */
export function mysqlIdent(name) {
  return `\`${String(name).replaceAll('`', '``')}\``;
}

/** `user` or `user@host` as a MySQL account (`'user'@'%'` by default). */
export function mysqlAccount(role) {
  const quote = (s) => `'${s.replaceAll("'", "''")}'`;
  const at = role.lastIndexOf('@');
  return at >= 0 ? `${quote(role.slice(0, at))}@${quote(role.slice(at + 1))}` : `${quote(role)}@'%'`;
}

/** The statements an administrator runs to give the cache's account
 * (`role`, or `user@host`; made with CREATE USER ... IDENTIFIED BY)
 * exactly what a driver needs: DML on the two cache tables of `database`.
 * What `image-cache db grants --mysql` prints. */
export function mysqlGrantStatements(role, database) {
  const [who, db] = [mysqlAccount(role), mysqlIdent(database)];
  return CACHE_TABLES.map((table) => `GRANT ${TABLE_PRIVILEGES.join(', ')} ON ${db}.${mysqlIdent(table)} TO ${who};`);
}

/** PyMySQL's truth values. */
function truth(key, value) {
  switch (value.toLowerCase()) {
    case '1':
    case 'true':
    case 'yes':
    case 'on':
      return true;
    case '0':
    case 'false':
    case 'no':
    case 'off':
      return false;
    default:
      throw new Error(`the database URL's ${key} must be true or false, not ${JSON.stringify(value)}`);
  }
}

/** Percent-decoding as the url crate's percent_decode_str: %XX where XX
 * is hex, anything else as it is; the bytes must be UTF-8. */
function percentDecode(s) {
  const bytes = [];
  const raw = Buffer.from(s, 'utf8');
  const hex = (c) => (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x46) || (c >= 0x61 && c <= 0x66);
  for (let i = 0; i < raw.length; i++) {
    if (raw[i] === 0x25 && i + 2 < raw.length && hex(raw[i + 1]) && hex(raw[i + 2])) {
      bytes.push(parseInt(String.fromCharCode(raw[i + 1], raw[i + 2]), 16));
      i += 2;
    } else {
      bytes.push(raw[i]);
    }
  }
  try {
    return new TextDecoder('utf-8', { fatal: true }).decode(Buffer.from(bytes));
  } catch {
    throw new Error("the database URL's user or password is not UTF-8");
  }
}

const MYSQL_TLS_MODES = {
  DISABLED: 'disabled',
  REQUIRED: 'required',
  VERIFY_CA: 'verify-ca',
  VERIFY_IDENTITY: 'verify-identity',
};

/**
 * A MySQL URL (Glance's `mysql+pymysql://user:password@host:port/db?...`,
 * `mysql://`, `mariadb://`) as its parts: {host, port, user, password,
 * database, socket, tls: {mode, ca, cert, key}, connectTimeoutMs?}, as the
 * Rust host's Target::parse reads it: PyMySQL's TLS parameters (ssl_ca,
 * ssl_cert, ssl_key, ssl_verify_cert, ssl_check_hostname, ssl_disabled) or
 * mysqlclient's ssl_mode (DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY;
 * PREFERRED is refused), unix_socket, charset (utf8, utf8mb3, utf8mb4),
 * connect_timeout; read_timeout and write_timeout are accepted (the call's
 * deadline bounds every read and write). Throws without naming the URL.
 */
export function parseMysqlUrl(url) {
  url = String(url).trim();
  const at = url.indexOf('://');
  if (at < 0) throw new Error('the database connection is not a URL');
  let parsed;
  try {
    parsed = new URL(`mysql://${url.slice(at + 3)}`);
  } catch {
    throw new Error('the database connection is not a valid MySQL URL (a bad host, port or character in it)');
  }
  const target = {
    host: parsed.hostname ? parsed.hostname.replace(/^\[(.*)\]$/, '$1') : 'localhost',
    port: parsed.port ? Number(parsed.port) : 3306,
    user: parsed.username ? percentDecode(parsed.username) : null,
    password: parsed.password ? percentDecode(parsed.password) : null,
    database: null,
    socket: null,
    tls: { mode: 'disabled', ca: null, cert: null, key: null },
    connectTimeoutMs: undefined,
  };
  const first = parsed.pathname.replace(/^\/+/, '').split('/')[0];
  if (first) target.database = percentDecode(first);
  let mode = null;
  let verifyCert = null;
  let checkHostname = null;
  for (const [key, value] of parsed.searchParams) {
    switch (key) {
      case 'ssl_ca':
        target.tls.ca = value;
        break;
      case 'ssl_cert':
        target.tls.cert = value;
        break;
      case 'ssl_key':
        target.tls.key = value;
        break;
      case 'ssl_verify_cert':
        verifyCert = truth(key, value);
        break;
      case 'ssl_check_hostname':
        checkHostname = truth(key, value);
        break;
      case 'ssl_disabled':
        if (truth(key, value)) mode = 'disabled';
        break;
      case 'ssl_mode':
      case 'ssl-mode': {
        const upper = value.toUpperCase();
        if (upper === 'PREFERRED') {
          throw new Error(
            'ssl_mode=PREFERRED is not supported: it falls back to plain text when TLS fails, which anyone on the path can force; say REQUIRED (or VERIFY_CA, VERIFY_IDENTITY) or DISABLED',
          );
        }
        if (!(upper in MYSQL_TLS_MODES)) {
          throw new Error(`ssl_mode ${JSON.stringify(upper)} is not one of DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY`);
        }
        mode = MYSQL_TLS_MODES[upper];
        break;
      }
      case 'unix_socket':
        target.socket = value;
        break;
      case 'charset':
        // The host always speaks utf8mb4, which holds utf8.
        if (!['utf8', 'utf8mb4', 'utf8mb3'].includes(value.toLowerCase())) {
          throw new Error(`charset ${JSON.stringify(value)} is not supported: the host speaks utf8mb4`);
        }
        break;
      case 'connect_timeout': {
        const seconds = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(value) ? Number(value) : NaN;
        if (!(Number.isFinite(seconds) && seconds > 0 && seconds < 86_400)) {
          throw new Error(`connect_timeout must be seconds, not ${JSON.stringify(value)}`);
        }
        target.connectTimeoutMs = Math.max(1, Math.round(seconds * 1000));
        break;
      }
      // PyMySQL's socket timeouts: the driver call's deadline bounds every
      // read and write here.
      case 'read_timeout':
      case 'write_timeout':
        break;
      default:
        throw new Error(
          `the database URL has a parameter this host does not know: ${JSON.stringify(key)} (known: ssl_ca, ssl_cert, ssl_key, ssl_verify_cert, ssl_check_hostname, ssl_mode, ssl_disabled, unix_socket, charset, connect_timeout)`,
        );
    }
  }
  // PyMySQL: any ssl_* file turns TLS on, verifying the certificate and the
  // host name unless told not to.
  const pymysqlTls = target.tls.ca !== null || target.tls.cert !== null || target.tls.key !== null;
  if (mode !== null) {
    target.tls.mode = mode;
  } else if (pymysqlTls || verifyCert === true || checkHostname === true) {
    if (verifyCert === false) target.tls.mode = 'required';
    else target.tls.mode = checkHostname === false ? 'verify-ca' : 'verify-identity';
  }
  if ((target.tls.cert === null) !== (target.tls.key === null)) {
    throw new Error('ssl_cert and ssl_key go together (a client certificate and its key)');
  }
  if (target.tls.mode === 'disabled' && pymysqlTls) throw new Error('TLS files are given but TLS is disabled');
  return target;
}

/** mysql2's `ssl` option for the URL's TLS (null: none): `ca` (the given
 * CA only, else Node's bundled roots), `cert` + `key`, `rejectUnauthorized`
 * (false for REQUIRED: encrypted, not checked) and `verifyIdentity` (the
 * host-name check, VERIFY_IDENTITY only: node:tls gets a
 * checkServerIdentity that accepts any name, and the backend checks the
 * URL's host itself, IP addresses included; see mysql.js). Files are read
 * now; a missing one is an error naming the parameter and the file. */
export function mysqlTlsOptions(tls) {
  if (tls.mode === 'disabled') return null;
  const out = {};
  if (tls.ca) out.ca = readPem('ssl_ca', tls.ca);
  if (tls.cert) {
    out.cert = readPem('ssl_cert', tls.cert);
    out.key = readPem('ssl_key', tls.key);
  }
  out.rejectUnauthorized = tls.mode !== 'required';
  out.verifyIdentity = tls.mode === 'verify-identity';
  return out;
}

/** One MySQL or MariaDB database's settings (see databaseSettings). */
function mysqlSettings(name, c, { callDeadlineMs }) {
  const where = `the connection URL of database ${JSON.stringify(name)}`;
  let target;
  let tls;
  try {
    target = parseMysqlUrl(c.url);
    tls = mysqlTlsOptions(target.tls);
  } catch (e) {
    throw new Error(`${where}: ${e.message}`);
  }
  if (!target.database) {
    throw new Error(`${where} names no database (mysql+pymysql://user:password@host/glance)`);
  }
  const b = bounds(name, c, callDeadlineMs, target.connectTimeoutMs);
  const secrets = [c.url.trim(), target.password ?? '', target.host, `${target.host}:${target.port}`, target.socket ?? '']
    .filter((s) => s && s.length > 0)
    .sort((x, y) => y.length - x.length);
  return {
    dialect: 'mysql',
    name,
    host: target.host,
    port: target.port,
    user: target.user,
    password: target.password,
    database: target.database,
    socket: target.socket,
    tlsMode: target.tls.mode,
    tls,
    ...b,
    allowPrivilegedRole: Boolean(c.allowPrivilegedRole ?? DATABASE_DEFAULTS.allowPrivilegedRole),
    secrets: [...new Set(secrets)],
  };
}
