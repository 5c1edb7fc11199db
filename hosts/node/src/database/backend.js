// The `database` interface on PostgreSQL, in the database worker
// (src/database/worker.js): node-postgres (`pg`) clients in a bounded pool
// of the host's own (pool.js, shared with the MySQL backend), every step
// bounded by the driver call's deadline.
//
// A port of the Rust host's host/src/database/postgres.rs. What the host
// enforces, whatever the driver's SQL says:
// - the driver names a database; the URL, host, user and password stay
//   here and are scrubbed from every message a driver (or a user) sees;
// - the database fences the driver by its own privileges: a role with
//   anything beyond SELECT, INSERT, UPDATE, DELETE on Glance's two cache
//   tables (and USAGE on their sequences) is refused at its first
//   connection, with the SQL that makes a dedicated role (the same catalog
//   queries and message as the Rust host);
// - each statement passes the statement policy (policy.js);
// - parameters are converted to the types the server inferred for them
//   (the statement is described first: Parse + Describe), and a value that
//   does not fit is refused before anything runs;
// - results are capped in bytes; the pool's size caps the connections;
// - every session has statement_timeout, lock_timeout and
//   idle_in_transaction_session_timeout; a statement still running at the
//   deadline is cancelled on the server (a CancelRequest, over the same
//   TLS) and its connection closed.

import { createRequire } from 'node:module';
import { check as policyCheck, firstWord, endsTransaction } from './policy.js';
import { CACHE_TABLES, CACHE_SEQUENCES, TABLE_PRIVILEGES, POWERFUL_ROLES, grantStatements } from './settings.js';
import { DbError, timedOut, DEADLINE, before, PooledBackend, PooledConn, networkMessage } from './pool.js';

const require = createRequire(import.meta.url);
const pg = require('pg');

/** Prepared statements one connection keeps before its cache is emptied
 * (a driver sending endless distinct SQL must not grow it forever). */
export const MAX_CACHED_STATEMENTS = 256;

export { DbError, timedOut, networkMessage };

// ---- types --------------------------------------------------------------

export const OID = {
  BOOL: 16, BYTEA: 17, CHAR: 18, NAME: 19, INT8: 20, INT2: 21, INT4: 23, TEXT: 25, OID: 26,
  FLOAT4: 700, FLOAT8: 701, UNKNOWN: 705, BPCHAR: 1042, VARCHAR: 1043, TIMESTAMP: 1114,
  TIMESTAMPTZ: 1184, NUMERIC: 1700,
};

const TYPE_NAMES = {
  16: 'bool', 17: 'bytea', 18: 'char', 19: 'name', 20: 'int8', 21: 'int2', 22: 'int2vector', 23: 'int4',
  24: 'regproc', 25: 'text', 26: 'oid', 114: 'json', 142: 'xml', 600: 'point', 650: 'cidr', 700: 'float4',
  701: 'float8', 705: 'unknown', 774: 'macaddr8', 790: 'money', 829: 'macaddr', 869: 'inet', 1000: '_bool',
  1001: '_bytea', 1005: '_int2', 1007: '_int4', 1009: '_text', 1015: '_varchar', 1016: '_int8',
  1021: '_float4', 1022: '_float8', 1042: 'bpchar', 1043: 'varchar', 1082: 'date', 1083: 'time',
  1114: 'timestamp', 1115: '_timestamp', 1184: 'timestamptz', 1185: '_timestamptz', 1186: 'interval',
  1266: 'timetz', 1560: 'bit', 1562: 'varbit', 1700: 'numeric', 2205: 'regclass', 2249: 'record',
  2278: 'void', 2950: 'uuid', 3614: 'tsvector', 3802: 'jsonb', 4089: 'regnamespace',
};

/** The type's name as the server (and the Rust host) spells it. */
export function typeName(oid) {
  return TYPE_NAMES[oid] ?? `oid ${oid}`;
}

/** Integers a `real` carries exactly. */
const EXACT_FLOAT_INT = 2n ** 53n;
/** Unix seconds the server's timestamps hold (years 1 to 9999). */
const MIN_TIME = -62_135_596_800;
const MAX_TIME = 253_402_300_799;

/** A float as Rust's `{}` prints it (for messages). */
function rustFloat(x) {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'inf';
  if (x === -Infinity) return '-inf';
  return String(x);
}

/** A float as PostgreSQL reads it back exactly. */
function floatText(x) {
  if (Object.is(x, -0)) return '-0';
  return String(x);
}

/** Unix seconds as a timestamp literal in UTC, to the microsecond. */
export function timeText(seconds, withZone) {
  const micros = Math.round(seconds * 1e6);
  const ms = Math.floor(micros / 1000);
  const rest = micros - ms * 1000;
  const d = new Date(ms);
  let year = d.getUTCFullYear();
  const bc = year <= 0;
  if (bc) year = 1 - year;
  const p = (n, w = 2) => String(n).padStart(w, '0');
  const frac = p(d.getUTCMilliseconds(), 3) + p(rest, 3);
  return (
    `${p(year, 4)}-${p(d.getUTCMonth() + 1)}-${p(d.getUTCDate())} ` +
    `${p(d.getUTCHours())}:${p(d.getUTCMinutes())}:${p(d.getUTCSeconds())}.${frac}` +
    `${withZone ? '+00' : ''}${bc ? ' BC' : ''}`
  );
}

/** A timestamp as the server prints it (DateStyle ISO) as Unix seconds; a
 * naive one is UTC. */
export function parseTime(text) {
  if (text === 'infinity') return Infinity;
  if (text === '-infinity') return -Infinity;
  const m = /^(\d{4,})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)(\.\d+)?(?:([+-])(\d\d)(?::(\d\d))?(?::(\d\d))?)?( BC)?$/.exec(text);
  if (!m) throw new Error(`${JSON.stringify(text)} is not a timestamp this host reads`);
  let year = Number(m[1]);
  if (m[12]) year = 1 - year;
  const d = new Date(0);
  d.setUTCFullYear(year, Number(m[2]) - 1, Number(m[3]));
  d.setUTCHours(Number(m[4]), Number(m[5]), Number(m[6]), 0);
  let seconds = d.getTime() / 1000;
  if (m[8]) {
    const offset = Number(m[9]) * 3600 + Number(m[10] ?? 0) * 60 + Number(m[11] ?? 0);
    seconds -= m[8] === '+' ? offset : -offset;
  }
  return m[7] ? seconds + Number(`0${m[7]}`) : seconds;
}

/** A guest value converted to the text (or bytes) the server reads as the
 * type it inferred for its `$n`; throws the reason it does not fit. */
export function convertParam(v, oid) {
  const given = { null: 'null', boolean: 'a boolean', integer: 'an integer', real: 'a real', text: 'text', blob: 'a blob' }[v?.tag];
  const mismatch = () => new Error(`the server expects ${typeName(oid)}, not ${given ?? 'a value'}`);
  const outOfRange = (i) => new Error(`${i} does not fit in ${typeName(oid)}`);
  switch (v?.tag) {
    case 'null':
      return null;
    case 'boolean':
      if (oid === OID.BOOL) return v.val ? 'true' : 'false';
      throw mismatch();
    case 'integer': {
      const i = BigInt(v.val);
      if (oid === OID.INT2) {
        if (i < -32768n || i > 32767n) throw outOfRange(i);
        return i.toString();
      }
      if (oid === OID.INT4) {
        if (i < -2147483648n || i > 2147483647n) throw outOfRange(i);
        return i.toString();
      }
      if (oid === OID.INT8) return i.toString();
      if ((oid === OID.FLOAT4 || oid === OID.FLOAT8) && (i < 0n ? -i : i) <= EXACT_FLOAT_INT) {
        return oid === OID.FLOAT4 ? floatText(Math.fround(Number(i))) : i.toString();
      }
      if (oid === OID.TIMESTAMP || oid === OID.TIMESTAMPTZ) return time(Number(i), oid);
      throw mismatch();
    }
    case 'real':
      if (oid === OID.FLOAT8) return floatText(v.val);
      if (oid === OID.FLOAT4) return floatText(Math.fround(v.val));
      if (oid === OID.TIMESTAMP || oid === OID.TIMESTAMPTZ) return time(v.val, oid);
      throw mismatch();
    case 'text':
      if ([OID.TEXT, OID.VARCHAR, OID.BPCHAR, OID.NAME].includes(oid)) return String(v.val);
      throw mismatch();
    case 'blob':
      if (oid === OID.BYTEA) return Buffer.from(v.val.buffer, v.val.byteOffset, v.val.byteLength);
      throw mismatch();
    default:
      throw mismatch();
  }
}

function time(seconds, oid) {
  if (!Number.isFinite(seconds) || seconds < MIN_TIME || seconds > MAX_TIME) {
    throw new Error(`${rustFloat(seconds)} is not a time (Unix seconds) the server can store`);
  }
  return timeText(seconds, oid === OID.TIMESTAMPTZ);
}

const parseBytea = pg.types.getTypeParser(OID.BYTEA, 'text');

/** Column `i` (its text form, or null) of type `oid` as a guest value;
 * throws the reason it cannot be carried. */
export function columnValue(raw, oid) {
  if (raw === null || raw === undefined) return { tag: 'null' };
  switch (oid) {
    case OID.BOOL:
      return { tag: 'boolean', val: raw === 't' || raw === 'true' };
    case OID.INT2:
    case OID.INT4:
    case OID.INT8:
    case OID.OID:
      return { tag: 'integer', val: BigInt(raw) };
    case OID.FLOAT4:
      return { tag: 'real', val: Math.fround(Number(raw)) };
    case OID.FLOAT8:
    case OID.NUMERIC:
      return { tag: 'real', val: Number(raw) };
    case OID.TEXT:
    case OID.VARCHAR:
    case OID.BPCHAR:
    case OID.NAME:
    case OID.UNKNOWN:
      return { tag: 'text', val: raw };
    case OID.BYTEA: {
      const b = parseBytea(raw);
      return { tag: 'blob', val: new Uint8Array(b.buffer, b.byteOffset, b.byteLength) };
    }
    case OID.TIMESTAMP:
    case OID.TIMESTAMPTZ:
      return { tag: 'real', val: parseTime(raw) };
    default:
      throw new Error(`its type ${typeName(oid)} is not one this interface carries; cast it (::text, ::float8, ...)`);
  }
}

function valueSize(v) {
  if (v.tag === 'text') return 8 + Buffer.byteLength(v.val, 'utf8');
  if (v.tag === 'blob') return 8 + v.val.byteLength;
  return 8;
}

// ---- the protocol steps pg does not offer -------------------------------

/** Parse + Describe (statement) + Sync: the types the server inferred for
 * the parameters, and the result's columns. A submittable for
 * client.query(); pg records the statement as parsed on the connection, so
 * the Query that runs it later sends Bind/Execute only. */
class Describe {
  constructor(name, text) {
    this.name = name;
    this.text = text;
    this.paramTypes = null;
    this.fields = null;
    this.promise = new Promise((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
  }
  submit(connection) {
    this.connection = connection;
    this.onParams = (msg) => {
      this.paramTypes = msg.dataTypeIDs;
    };
    connection.on('parameterDescription', this.onParams);
    connection.stream.cork?.();
    try {
      connection.parse({ text: this.text, name: this.name, types: [] });
      connection.submittedNamedStatements[this.name] = this.text;
      connection.describe({ type: 'S', name: this.name });
      connection.sync();
    } finally {
      connection.stream.uncork?.();
    }
    return null;
  }
  cleanup() {
    this.connection?.off('parameterDescription', this.onParams);
  }
  handleRowDescription(msg) {
    this.fields = msg.fields;
  }
  handleDataRow() {}
  handleCommandComplete() {}
  handleEmptyQuery() {}
  handlePortalSuspended() {}
  handleCopyInResponse(connection) {
    connection.sendCopyFail('no COPY here');
  }
  handleCopyData() {}
  handleError(err) {
    this.cleanup();
    this.reject(err);
  }
  handleReadyForQuery() {
    this.cleanup();
    this.resolve({ paramTypes: this.paramTypes ?? [], fields: this.fields });
  }
}

/** A Query whose rows are converted (and counted against the cap) as they
 * arrive, never accumulated by pg. */
class RowsQuery extends pg.Query {
  constructor(config, { wantRows, maxBytes, onOverflow, describeColumnError }) {
    super(config);
    this.wantRows = wantRows;
    this.maxBytes = maxBytes;
    this.onOverflow = onOverflow;
    this.columnError = describeColumnError;
    this.rowsOut = [];
    this.bytes = 0;
    this.oids = [];
  }
  handleRowDescription(msg) {
    super.handleRowDescription(msg);
    this._accumulateRows = false;
    this.oids = msg.fields.map((f) => f.dataTypeID);
  }
  handleDataRow(msg) {
    if (this._canceledDueToError || !this.wantRows) return;
    const row = [];
    for (let i = 0; i < msg.fields.length; i++) {
      let value;
      try {
        value = columnValue(msg.fields[i], this.oids[i]);
      } catch (e) {
        this._canceledDueToError = this.columnError(i, e);
        return;
      }
      this.bytes += valueSize(value);
      if (this.bytes > this.maxBytes) {
        this._canceledDueToError = this.onOverflow();
        this.rowsOut = [];
        return;
      }
      row.push(value);
    }
    this.rowsOut.push(row);
  }
}

// ---- connections and the pool -------------------------------------------

let nextStatement = 1;

/** One pooled connection. */
class Conn extends PooledConn {
  constructor(client, ssl) {
    super();
    this.client = client;
    this.ssl = ssl;
    /** sql -> {name, paramTypes} */
    this.statements = new Map();
  }
}

/** A configured PostgreSQL database a driver may open by name. */
export class Backend extends PooledBackend {
  /** settings: from settings.js databaseSettings(); warn(message). */
  constructor(settings, warn = () => {}) {
    super(settings, warn);
    this.dialect = 'postgresql';
    const ms = settings.statementTimeoutMs;
    this.options = `${settings.options} -c statement_timeout=${ms} -c lock_timeout=${ms} -c idle_in_transaction_session_timeout=${ms} -c DateStyle=ISO -c extra_float_digits=3`.trim();
  }

  /** A pg or socket error in the driver's terms, scrubbed. */
  clientError(e) {
    if (e instanceof DbError) return e;
    if (e instanceof pg.DatabaseError && typeof e.code === 'string') {
      const state = e.code;
      let code = 'other';
      if (state.startsWith('23')) code = 'constraint';
      else if (state === '57014' || state === '55P03') code = 'timed-out';
      else if (state === '42501') code = 'access-denied';
      else if (state.startsWith('08') || state.startsWith('57P') || state.startsWith('28') || state === '53300' || state === '3D000') code = 'unavailable';
      else if (state.startsWith('54')) code = 'limit-exceeded';
      return this.error(code, `${e.severity ?? 'ERROR'} (${state}): ${e.message}`);
    }
    // No answer from the server: refused, reset, closed, timed out. The
    // socket's own text names the address: say what happened instead.
    return this.error('unavailable', networkMessage(e));
  }

  pgConfig(ssl) {
    const s = this.s;
    let tls = false;
    if (ssl) {
      tls = { ...s.tls };
      if (tls.checkServerIdentity === 'any') tls.checkServerIdentity = () => undefined;
    }
    return {
      host: s.host,
      port: s.port,
      user: s.user,
      // No password in the URL: none (never ~/.pgpass, as the Rust host).
      password: s.password ?? (() => ''),
      database: s.database,
      ssl: tls,
      application_name: 'image-cache',
      client_encoding: 'UTF8',
      options: this.options,
      keepAlive: true,
      keepAliveInitialDelayMillis: 30_000,
    };
  }

  /** A new connection, by `deadline`. */
  async connect(deadline) {
    const attempt = async (ssl) => {
      const left = Math.min(this.s.connectTimeoutMs, deadline - Date.now());
      if (left <= 0) throw DEADLINE;
      const client = new pg.Client({ ...this.pgConfig(ssl), connectionTimeoutMillis: Math.max(1, Math.ceil(left)) });
      const conn = new Conn(client, ssl);
      // A connection lost while idle (or in use) is never handed out again.
      const lose = () => this.lose(conn);
      client.on('error', lose);
      client.on('end', lose);
      try {
        await before(deadline + 50, client.connect());
      } catch (e) {
        conn.lost = true;
        client.connection?.stream?.destroy?.();
        client.end().catch(() => {});
        throw e;
      }
      return conn;
    };
    const mode = this.s.tlsMode;
    try {
      return await attempt(mode !== 'disable');
    } catch (e) {
      // prefer: TLS when the server offers it, else plain (libpq).
      if (mode === 'prefer' && /does not support SSL/.test(String(e?.message))) return attempt(false);
      throw e;
    }
  }

  /** Close a connection now (the pool's hook). */
  closeConnection(conn) {
    try {
      conn.client.connection?.stream?.destroy?.();
    } catch {}
    conn.client.end().catch(() => {});
  }

  /** Whether pg already knows the connection is closed (the pool's hook). */
  isDead(conn) {
    return Boolean(conn.client._ending);
  }

  /** Everything the connected role may do beyond a cache driver's needs,
   * read from the catalogs (the Rust host's queries); empty when it is
   * fenced as it should be. */
  async privilegeProblems(client) {
    const q = async (sql, values) => (await client.query({ text: sql, values, rowMode: 'array' })).rows;
    const problems = [];
    const attributes = await q(
      'SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls FROM pg_roles WHERE rolname = current_user',
    );
    if (attributes.length) {
      const row = attributes[0];
      [
        'is a superuser',
        'may create roles (CREATEROLE)',
        'may create databases (CREATEDB)',
        'may replicate (REPLICATION)',
        'bypasses row security (BYPASSRLS)',
      ].forEach((what, i) => {
        if (row[i] !== false) problems.push(what);
      });
      // A superuser may do everything; the rest would only be noise.
      if (row[0] !== false) return problems;
    }
    const firstTexts = (rows) => rows.map((r) => r[0]).filter((t) => typeof t === 'string').join(', ');
    const powerful = await q(
      "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) AND pg_has_role(current_user, oid, 'MEMBER') ORDER BY rolname",
      [POWERFUL_ROLES],
    );
    if (powerful.length) problems.push(`is a member of ${firstTexts(powerful)}`);
    // A role it may become (SET ROLE) with powers of its own.
    const mighty = await q(
      "SELECT r.rolname::text FROM pg_roles r WHERE pg_has_role(current_user, r.oid, 'MEMBER') AND r.rolname <> current_user " +
        'AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls) ORDER BY 1 LIMIT 6',
    );
    if (mighty.length) problems.push(`is a member of a role with role attributes (${firstTexts(mighty)})`);
    const owned = await q(
      'SELECT kind || \' \' || name FROM ( ' +
        "SELECT 'database' AS kind, datname::text AS name, datdba AS owner FROM pg_database WHERE datname = current_database() " +
        "UNION ALL SELECT 'schema', nspname::text, nspowner FROM pg_namespace " +
        "UNION ALL SELECT 'relation', c.relname::text, c.relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace " +
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') " +
        "UNION ALL SELECT 'function', p.proname::text, p.proowner FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace " +
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') " +
        ") o WHERE pg_has_role(current_user, owner, 'MEMBER') ORDER BY 1 LIMIT 6",
    );
    if (owned.length) problems.push(`owns ${firstTexts(owned)}`);
    const creates = await q(
      "SELECT nspname::text FROM pg_namespace WHERE has_schema_privilege(current_user, oid, 'CREATE') ORDER BY 1 LIMIT 6",
    );
    if (creates.length) problems.push(`may create objects in schema ${firstTexts(creates)}`);
    const dbCreate = await q("SELECT has_database_privilege(current_database(), 'CREATE')");
    if (dbCreate.length && dbCreate[0][0] !== false) problems.push('may create schemas in the database (CREATE)');
    // Every table privilege on every relation, against what a driver needs
    // on the two cache tables.
    const grants = await q(
      'SELECT c.relname::text, c.relkind::text, p.priv FROM pg_class c ' +
        'JOIN pg_namespace n ON n.oid = c.relnamespace ' +
        "CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE', 'REFERENCES','TRIGGER']) AS p(priv) " +
        "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') " +
        "AND n.nspname NOT IN ('pg_catalog', 'information_schema') " +
        "AND n.nspname NOT LIKE 'pg\\_%' " +
        'AND (has_table_privilege(current_user, c.oid, p.priv) ' +
        "OR (p.priv IN ('SELECT','INSERT','UPDATE','REFERENCES') AND has_any_column_privilege(current_user, c.oid, p.priv))) " +
        "AND NOT has_table_privilege('public', c.oid, p.priv) " +
        "UNION ALL SELECT c.relname::text, 'S', p.priv FROM pg_class c " +
        'JOIN pg_namespace n ON n.oid = c.relnamespace ' +
        "CROSS JOIN unnest(ARRAY['USAGE','SELECT','UPDATE']) AS p(priv) " +
        "WHERE c.relkind = 'S' AND n.nspname NOT IN ('pg_catalog', 'information_schema') " +
        'AND has_sequence_privilege(current_user, c.oid, p.priv) ORDER BY 1, 3',
    );
    const extra = [];
    const held = [];
    for (const [table, kind, privilege] of grants) {
      if (typeof table !== 'string' || typeof kind !== 'string' || typeof privilege !== 'string') continue;
      const needed =
        kind === 'S'
          ? CACHE_SEQUENCES.includes(table) && privilege === 'USAGE'
          : CACHE_TABLES.includes(table) && TABLE_PRIVILEGES.includes(privilege);
      if (needed) held.push([table, privilege]);
      else extra.push(`${privilege} on ${table}`);
    }
    if (extra.length) {
      const shown = extra.slice(0, 8);
      problems.push(`holds ${shown.join(', ')}${extra.length > shown.length ? ', ...' : ''}`);
    }
    const missing = [];
    for (const table of CACHE_TABLES) {
      for (const privilege of TABLE_PRIVILEGES) {
        if (!held.some(([t, p]) => t === table && p === privilege)) missing.push(`${privilege} on ${table}`);
      }
    }
    if (missing.length && !problems.length) {
      // Too little is not a danger; it fails at the first statement, but
      // say so now, with the same remedy.
      this.warn(`database ${JSON.stringify(this.name)}: the role lacks ${missing.join(', ')}`);
    }
    return problems;
  }

  async checkRole(conn) {
    const problems = await this.privilegeProblems(conn.client);
    if (!problems.length) {
      this.role = 'ok';
      return;
    }
    if (this.s.allowPrivilegedRole) {
      this.warn(
        `database ${JSON.stringify(this.name)}: its role ${problems.join('; ')}; allowed by configuration (allowPrivilegedRole)`,
      );
      this.role = 'ok';
      return;
    }
    let database = 'glance';
    try {
      const r = await conn.client.query({ text: 'SELECT current_database()::text', rowMode: 'array' });
      if (typeof r.rows[0]?.[0] === 'string') database = r.rows[0][0];
    } catch {}
    const shown = Math.min(problems.length, 3);
    this.refusal =
      `refused: the configured role ${problems.slice(0, shown).join('; ')}${problems.length > shown ? '; ...' : ''} ` +
      `(a cache driver needs only SELECT, INSERT, UPDATE, DELETE on ${CACHE_TABLES.join(' and ')} and USAGE on their ` +
      `sequences; give the cache a dedicated role, as \`image-cache db grants\` prints it: ${grantStatements('image_cache', database).join(' ')})`;
    this.role = 'refused';
    throw this.refused();
  }

  /** Send a CancelRequest for what `conn` runs (a new connection, over the
   * same TLS), at most 5 s. */
  cancel(conn) {
    const { processID, secretKey } = conn.client;
    if (processID === null || processID === undefined) return;
    const config = this.pgConfig(conn.ssl);
    const con = new pg.Connection({ ssl: config.ssl, keepAlive: false });
    const done = () => {
      clearTimeout(timer);
      try {
        con.stream.destroy();
      } catch {}
    };
    const timer = setTimeout(done, 5000);
    con.on('error', done);
    con.on('end', done);
    const send = () => {
      try {
        con.cancel(processID, secretKey);
      } catch {}
    };
    con.once('connect', () => {
      if (config.ssl) con.requestSsl();
      else send();
    });
    con.once('sslconnect', send);
    try {
      if (this.s.host.startsWith('/')) con.connect(`${this.s.host}/.s.PGSQL.${this.s.port}`);
      else con.connect(this.s.port, this.s.host);
    } catch {
      done();
    }
  }

  /** The prepared statement for `sql` on `conn`: {name, paramTypes}. */
  async prepare(conn, sql) {
    const cached = conn.statements.get(sql);
    if (cached) return cached;
    if (conn.statements.size >= MAX_CACHED_STATEMENTS && !conn.inTx && conn.client._txStatus !== 'T' && conn.client._txStatus !== 'E') {
      await conn.client.query('DEALLOCATE ALL');
      conn.statements.clear();
      conn.client.connection.parsedStatements = {};
    }
    const d = new Describe(`ic_${nextStatement++}`, sql);
    conn.client.query(d);
    const described = await d.promise;
    const stmt = { name: d.name, paramTypes: described.paramTypes };
    conn.statements.set(sql, stmt);
    return stmt;
  }

  /** Run one statement of a driver on `conn` by `deadline`: the number of
   * rows it changed (`want` 'count') or its rows ('rows'). */
  async statement(conn, sql, params, want, deadline) {
    const why = policyCheck(sql);
    if (why !== null) throw this.error('access-denied', why);
    if (conn.lost) throw this.error('unavailable', 'this connection was lost; open a new one');
    conn.busy = true;
    let overflowed = false;
    const work = async () => {
      const stmt = await this.prepare(conn, sql);
      if (stmt.paramTypes.length !== params.length) {
        throw this.error('other', `the statement has ${stmt.paramTypes.length} parameters, ${params.length} values were given`);
      }
      const values = params.map((v, i) => {
        try {
          return convertParam(v, stmt.paramTypes[i]);
        } catch (e) {
          throw this.error('other', `parameter $${i + 1}: ${e.message}`);
        }
      });
      const result = await new Promise((resolve, reject) => {
        const query = new RowsQuery(
          { name: stmt.name, text: sql, values, rowMode: 'array', callback: (err, res) => (err ? reject(err) : resolve({ res, query })) },
          {
            wantRows: want === 'rows',
            maxBytes: this.s.maxResultBytes,
            onOverflow: () => {
              // The rest is read and dropped (a cancel could reach the
              // connection's next statement instead); the deadline bounds it.
              overflowed = true;
              return this.error('limit-exceeded', `query result exceeds ${this.s.maxResultBytes} bytes`);
            },
            describeColumnError: (i, e) => this.error('other', `column ${i + 1}: ${e.message}`),
          },
        );
        conn.client.query(query);
      });
      return want === 'rows' ? result.query.rowsOut : BigInt(result.res?.rowCount ?? 0);
    };
    try {
      const value = await before(deadline, work());
      const first = firstWord(sql);
      if (first === 'begin' || first === 'start') conn.inTx = true;
      else if (first !== null && endsTransaction(sql)) conn.inTx = false;
      if (conn.client._txStatus === 'T' || conn.client._txStatus === 'E') conn.inTx = true;
      return value;
    } catch (e) {
      if (e === DEADLINE) {
        // Stopped at the deadline: the server stops too, and the
        // connection, stopped half-way, is not given back.
        this.cancel(conn);
        this.destroy(conn);
        throw timedOut();
      }
      if (overflowed && !(e instanceof DbError && e.code === 'limit-exceeded')) {
        throw this.error('limit-exceeded', `query result exceeds ${this.s.maxResultBytes} bytes`);
      }
      const err = this.clientError(e);
      // A lost connection (or one the server ended) is not used again.
      if (!(e instanceof pg.DatabaseError || e instanceof DbError) || /^(FATAL|PANIC)$/.test(e.severity ?? '') || conn.client._ending || !conn.client._queryable) {
        this.destroy(conn);
      }
      if (conn.client._txStatus === 'T' || conn.client._txStatus === 'E') conn.inTx = true;
      throw err;
    } finally {
      conn.busy = false;
    }
  }

  /** The driver call ended inside a transaction: roll it back (its locks
   * go with it); if that fails, the connection is closed, which rolls back
   * on the server. */
  async endOfCall(conn, deadline) {
    if (!conn.inTx || conn.lost) return;
    try {
      await this.statement(conn, 'ROLLBACK', [], 'count', deadline);
      conn.inTx = false;
    } catch {
      this.destroy(conn);
      conn.inTx = false;
    }
  }
}
