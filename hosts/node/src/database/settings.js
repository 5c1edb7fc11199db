// What the operator configures for a shared database (the `database`
// import's PostgreSQL backend), checked in the main thread when a cache is
// opened: the URL (libpq's or SQLAlchemy's form), its TLS parameters as
// libpq reads them, the pool and the bounds. Nothing here connects.
//
// The same rules as the Rust host (host/src/database/postgres.rs,
// host/src/database/tls.rs); errors never contain the URL or the password.

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
    if (what !== 'sslkey' && !text.includes('-----BEGIN CERTIFICATE-----')) throw new Error('no PEM certificate in it');
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
  const positive = (key, value) => {
    if (!(Number.isFinite(value) && value >= 1)) throw new Error(`database ${JSON.stringify(name)}: ${key} must be a positive number`);
    return Math.floor(value);
  };
  const poolSize = positive('poolSize', c.poolSize ?? DATABASE_DEFAULTS.poolSize);
  const statementTimeoutMs = positive('statementTimeoutMs', c.statementTimeoutMs ?? callDeadlineMs);
  const connectTimeoutMs = positive('connectTimeoutMs', c.connectTimeoutMs ?? parsed.connectTimeoutMs ?? DATABASE_DEFAULTS.connectTimeoutMs);
  const maxResultBytes = positive('maxResultBytes', c.maxResultBytes ?? DATABASE_DEFAULTS.maxResultBytes);
  const secrets = [c.url.trim(), libpq, parsed.password ?? '', parsed.host, `${parsed.host}:${parsed.port}`]
    .filter((s) => s && s.length > 0)
    .sort((a, b) => b.length - a.length);
  return {
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
