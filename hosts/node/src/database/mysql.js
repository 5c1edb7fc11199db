// The `database` interface on MySQL and MariaDB, in the database worker
// (src/database/worker.js): mysql2 connections in the bounded pool the
// backends share (pool.js), every step bounded by the driver call's
// deadline; a statement still running at the deadline is ended on the
// server with `KILL QUERY` from a connection of its own.
//
// A port of the Rust host's host/src/database/mysql.rs. What the host
// enforces, whatever the driver's SQL says (as on PostgreSQL):
// - the driver names a database; the URL, host, user and password stay
//   here and are scrubbed from every message;
// - the database fences the driver by its own privileges: an account with
//   anything beyond SELECT, INSERT, UPDATE, DELETE on Glance's two cache
//   tables (read from SHOW GRANTS: no global or database-wide privilege,
//   no GRANT OPTION, no PROXY, no role, no routine) is refused at its first
//   connection, with the statements that make a dedicated account;
// - each statement passes the statement policy for MySQL (policy.js: no
//   comments, no variables, no LOAD_FILE/OUTFILE, no system schemas, ...),
//   and every session runs with NO_BACKSLASH_ESCAPES and ANSI_QUOTES so the
//   server reads strings and names as the check does;
// - parameters go as they are (`?`, server-side prepared statements:
//   mysql2's prepare + execute), results come back typed (DATETIME as Unix
//   seconds: the session's time zone is UTC), capped in bytes; the pool
//   caps the connections;
// - every session has a statement time limit (max_statement_time on
//   MariaDB, max_execution_time on MySQL), lock wait limits
//   (innodb_lock_wait_timeout, lock_wait_timeout) and, on MariaDB, an
//   idle-transaction limit (idle_transaction_timeout).

import { createRequire } from 'node:module';
import tls from 'node:tls';
import { check as policyCheck, firstWord, endsTransaction } from './policy.js';
import { CACHE_TABLES, TABLE_PRIVILEGES, mysqlGrantStatements } from './settings.js';
import { DbError, timedOut, DEADLINE, before, PooledBackend, PooledConn, networkMessage } from './pool.js';

const require = createRequire(import.meta.url);
const mysql = require('mysql2');
const Types = mysql.Types;
const Typed = mysql.TypedParameter;

/** Prepared statements one connection keeps (least recently used go). */
export const MAX_CACHED_STATEMENTS = 256;

/** MySQL's character set number for binary strings. */
const BINARY_CHARSET = 63;

/** Unix seconds the server's times hold (years 1 to 9999). */
const MIN_TIME = -62_135_596_800;
const MAX_TIME = 253_402_300_799;

// ---- sessions --------------------------------------------------------------

/** The session every connection gets: UTC times, strings and names read as
 * the statement check reads them, and the lock wait limits. */
export function sessionSetup(timeoutMs) {
  const seconds = Math.max(1, Math.floor(timeoutMs / 1000));
  return [
    "SET SESSION time_zone = '+00:00', " +
      "sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO," +
      "NO_ENGINE_SUBSTITUTION,NO_BACKSLASH_ESCAPES,ANSI_QUOTES', " +
      "character_set_results = 'utf8mb4'",
    `SET SESSION innodb_lock_wait_timeout = ${seconds}, lock_wait_timeout = ${seconds}`,
  ];
}

/** The statement and idle-transaction limits, which MariaDB and MySQL name
 * differently; run on each new connection once its server is known. */
export function serverLimits(version, timeoutMs) {
  if (String(version).toLowerCase().includes('mariadb')) {
    const seconds = Math.max(timeoutMs / 1000, 0.001);
    return `SET SESSION max_statement_time = ${seconds.toFixed(3)}, idle_transaction_timeout = ${Math.max(1, Math.floor(timeoutMs / 1000))}`;
  }
  return `SET SESSION max_execution_time = ${Math.max(1, Math.floor(timeoutMs))}`;
}

// ---- errors -----------------------------------------------------------------

/** A MySQL server error number as the interface's error kind. */
export function errorCode(code) {
  switch (code) {
    // Duplicate key, foreign key, NOT NULL, no default, CHECK.
    case 1062: case 1216: case 1217: case 1451: case 1452: case 1048: case 1364: case 1557: case 1586: case 3819: case 4025:
      return 'constraint';
    // Lock wait timeout; statement time exceeded (MySQL 3024, MariaDB
    // 1969); interrupted (KILL QUERY).
    case 1205: case 3024: case 1969: case 1317: case 1907:
      return 'timed-out';
    // A privilege the account lacks.
    case 1044: case 1142: case 1143: case 1227: case 1370: case 1410:
      return 'access-denied';
    // Bad login, too many connections, unknown database, shutting down,
    // connection lost or refused.
    case 1040: case 1045: case 1049: case 1053: case 1129: case 1130: case 1203: case 2002: case 2003: case 2006: case 2013:
      return 'unavailable';
    // Packet or row too large, out of memory or sort space.
    case 1037: case 1038: case 1118: case 1153: case 1301:
      return 'limit-exceeded';
    default:
      return 'other';
  }
}

/** Whether `e` is an error the server sent (a number and a SQLSTATE). */
function isServerError(e) {
  return e !== null && typeof e === 'object' && typeof e.errno === 'number' && typeof e.sqlState === 'string' && e.sqlState.length > 0;
}

// ---- the account fence (SHOW GRANTS) ---------------------------------------

/** Split `s` at the first `sep` outside backquotes, quotes and brackets:
 * [before, after], or null. */
export function splitTop(s, sep) {
  let quote = null;
  let depth = 0;
  const upper = s.replace(/[a-z]+/g, (m) => m.toUpperCase());
  for (let at = 0; at < s.length; at++) {
    const c = s[at];
    if (quote !== null) {
      if (c === quote) quote = null;
      continue;
    }
    if (c === '`' || c === "'" || c === '"') quote = c;
    else if (c === '(') depth += 1;
    else if (c === ')') depth -= 1;
    else if (depth === 0 && upper.startsWith(sep, at)) return [s.slice(0, at), s.slice(at + sep.length)];
  }
  return null;
}

/** A quoted (backquotes, or double quotes under ANSI_QUOTES) or bare name
 * without its quotes (and a database-level grant's `\_` and `\%`
 * unescaped). */
export function unquote(name) {
  name = name.trim();
  let inner = name;
  for (const q of ['`', '"']) {
    if (name.length >= 2 && name.startsWith(q) && name.endsWith(q)) {
      inner = name.slice(1, -1).replaceAll(q + q, q);
      break;
    }
  }
  return inner.replaceAll('\\_', '_').replaceAll('\\%', '%');
}

/** What SHOW GRANTS says the account may do beyond a cache driver's needs
 * in `database` (the problems), and what it lacks of them: {problems,
 * missing}. */
export function grantProblems(grants, database) {
  const problems = [];
  const held = [];
  for (let line of grants) {
    line = String(line).trim();
    if (line.length < 6 || line.slice(0, 6).toUpperCase() !== 'GRANT ') {
      // SET DEFAULT ROLE ... and the like: about roles, which a
      // `GRANT role TO` line already reported.
      continue;
    }
    const body = line.slice(6);
    if (splitTop(line, ' WITH GRANT OPTION') !== null) problems.push('may grant its privileges (WITH GRANT OPTION)');
    const on = splitTop(body, ' ON ');
    if (on === null) {
      const role = splitTop(body, ' TO ')?.[0] ?? '';
      problems.push(`is granted the role ${role.trim()}`);
      continue;
    }
    const [privilegeList, rest] = on;
    const object = (splitTop(rest, ' TO ')?.[0] ?? rest).trim();
    const list = [];
    let more = privilegeList.trim();
    for (let split = splitTop(more, ','); split !== null; split = splitTop(more, ',')) {
      list.push(split[0]);
      more = split[1];
    }
    list.push(more);
    // `SELECT (col, ...)`: a column grant of SELECT.
    const privileges = list.map((p) => p.split('(')[0].trim().replace(/[a-z]+/g, (m) => m.toUpperCase())).filter((p) => p.length > 0);
    if (privileges.includes('PROXY')) {
      problems.push(`may proxy as ${object}`);
      continue;
    }
    const upper = object.replace(/[a-z]+/g, (m) => m.toUpperCase());
    if (upper.startsWith('FUNCTION ') || upper.startsWith('PROCEDURE ') || upper.startsWith('PACKAGE ')) {
      problems.push(`holds ${privileges.join(', ')} on ${object}`);
      continue;
    }
    const dot = splitTop(object, '.');
    const [db, table] = dot !== null ? [unquote(dot[0]), unquote(dot[1])] : [database, unquote(object)];
    for (const privilege of privileges) {
      const needed = db === database && CACHE_TABLES.includes(table) && TABLE_PRIVILEGES.includes(privilege);
      if (needed) held.push([table, privilege]);
      else if (privilege === 'USAGE') {
        // No privilege at all.
      } else {
        problems.push(`holds ${privilege} on ${table === '*' ? `${db}.*` : `${db}.${table}`}`);
      }
    }
  }
  // Consecutive repeats once (Rust's Vec::dedup).
  const deduped = problems.filter((p, i) => i === 0 || p !== problems[i - 1]);
  const missing = [];
  for (const table of CACHE_TABLES) {
    for (const privilege of TABLE_PRIVILEGES) {
      if (!held.some(([t, p]) => t === table && p === privilege)) missing.push(`${privilege} on ${table}`);
    }
  }
  return { problems: deduped, missing };
}

// ---- values -----------------------------------------------------------------

/** A float as Rust's `{}` prints it (for messages). */
function rustFloat(x) {
  if (Number.isNaN(x)) return 'NaN';
  if (x === Infinity) return 'inf';
  if (x === -Infinity) return '-inf';
  return String(x);
}

/** A guest value as a mysql2 parameter, sent as it is: `integer` and
 * `boolean` (0 or 1) as BIGINT, `real` as DOUBLE, `text` as a string,
 * `blob` as bytes, `null` as NULL. Throws the reason it cannot go. */
export function mysqlParam(v) {
  switch (v?.tag) {
    case 'null':
      return null;
    case 'boolean':
      return Typed.LONGLONG(v.val ? 1n : 0n);
    case 'integer':
      return Typed.LONGLONG(BigInt(v.val));
    case 'real':
      if (!Number.isFinite(v.val)) throw new Error(`${rustFloat(v.val)} is not a number the server can store`);
      return Typed.DOUBLE(v.val);
    case 'text':
      return String(v.val);
    case 'blob':
      return Buffer.from(v.val.buffer, v.val.byteOffset, v.val.byteLength);
    default:
      throw new Error('not a value');
  }
}

/** Days since 1970-01-01 of a proleptic Gregorian date. */
export function daysFromCivil(y, m, d) {
  y = m <= 2 ? y - 1 : y;
  const era = Math.floor(y / 400);
  const yoe = y - era * 400;
  const mp = (m + 9) % 12;
  const doy = Math.trunc((153 * mp + 2) / 5) + d - 1;
  const doe = yoe * 365 + Math.trunc(yoe / 4) - Math.trunc(yoe / 100) + doy;
  return era * 146_097 + doe - 719_468;
}

/** A DATE/DATETIME/TIMESTAMP in the binary protocol's bytes (length 0, 4,
 * 7 or 11: year, month, day, hour, minute, second, microseconds) as Unix
 * seconds (read as UTC, the session's time zone). */
export function binaryTime(b) {
  const y = b.length >= 4 ? b.readUInt16LE(0) : 0;
  const mo = b.length >= 4 ? b[2] : 0;
  const d = b.length >= 4 ? b[3] : 0;
  const h = b.length >= 7 ? b[4] : 0;
  const mi = b.length >= 7 ? b[5] : 0;
  const s = b.length >= 7 ? b[6] : 0;
  const us = b.length >= 11 ? b.readUInt32LE(7) : 0;
  const seconds = daysFromCivil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s + us / 1e6;
  if (!Number.isFinite(seconds) || seconds < MIN_TIME || seconds > MAX_TIME) throw new Error(`${y}-${mo}-${d} is not a time`);
  return seconds;
}

const utf8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true });

/** Types mysql2 reads as numbers (integers as strings for BIGINT); the
 * rest come as their bytes (typeCast) and are read here. */
const NUMERIC = new Set(['TINY', 'SHORT', 'LONG', 'INT24', 'YEAR', 'FLOAT', 'DOUBLE', 'LONGLONG', 'NULL']);
const INTEGER_TYPES = new Set([Types.TINY, Types.SHORT, Types.LONG, Types.INT24, Types.YEAR, Types.LONGLONG]);
const TIME_TYPES = new Set([Types.DATE, Types.DATETIME, Types.TIMESTAMP, Types.NEWDATE]);
const I64_MAX = 2n ** 63n - 1n;

/** mysql2's typeCast for every connection: numbers as mysql2 reads them
 * (supportBigNumbers + bigNumberStrings: BIGINT as exact text), anything
 * else as the bytes the server sent, which columnValue reads itself. */
function typeCast(field, next) {
  return NUMERIC.has(field.type) ? next() : field.buffer();
}

/** A result value of column `field` (mysql2's column definition) as a
 * guest value; throws the reason it cannot be carried. */
export function columnValue(v, field) {
  if (v === null || v === undefined) return { tag: 'null' };
  const type = field.columnType;
  if (INTEGER_TYPES.has(type)) {
    const i = BigInt(v);
    if (i > I64_MAX) throw new Error(`${i} does not fit in a signed 64-bit integer`);
    return { tag: 'integer', val: i };
  }
  if (type === Types.FLOAT || type === Types.DOUBLE) return { tag: 'real', val: Number(v) };
  if (type === Types.NULL) return { tag: 'null' };
  const bytes = Buffer.isBuffer(v) ? v : Buffer.from(String(v), 'utf8');
  if (TIME_TYPES.has(type)) return { tag: 'real', val: binaryTime(bytes) };
  if (type === Types.TIME) throw new Error('its type TIME is not one this interface carries; cast it (CAST(... AS CHAR))');
  if (type === Types.DECIMAL || type === Types.NEWDECIMAL) {
    const text = bytes.toString('latin1');
    const x = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(text) ? Number(text) : NaN;
    if (Number.isNaN(x)) throw new Error(`${JSON.stringify(text)} is not a decimal number`);
    return { tag: 'real', val: x };
  }
  if (field.characterSet === BINARY_CHARSET) return { tag: 'blob', val: new Uint8Array(bytes) };
  try {
    return { tag: 'text', val: utf8.decode(bytes) };
  } catch {
    throw new Error('text that is not UTF-8');
  }
}

function valueSize(v) {
  if (v.tag === 'text') return 8 + Buffer.byteLength(v.val, 'utf8');
  if (v.tag === 'blob') return 8 + v.val.byteLength;
  return 8;
}

/** A text-protocol value (the host's own queries) as a string. */
function textOf(v) {
  if (v === null || v === undefined) return null;
  return Buffer.isBuffer(v) ? v.toString('utf8') : String(v);
}

// ---- connections and the pool -------------------------------------------

/** One pooled connection. */
class MysqlConn extends PooledConn {
  constructor(client) {
    super();
    this.client = client;
    /** The server's id of the session (for KILL QUERY). */
    this.threadId = null;
    /** Rejects the request under way when the connection goes. */
    this.pending = null;
  }
}

/** A configured MySQL or MariaDB database a driver may open by name. */
export class MysqlBackend extends PooledBackend {
  /** settings: from settings.js databaseSettings(); warn(message). */
  constructor(settings, warn = () => {}) {
    super(settings, warn);
    this.dialect = 'mysql';
    this.ssl = settings.tls;
  }

  /** mysql2's options for a connection. */
  options(connectTimeout) {
    const s = this.s;
    const o = {
      user: s.user ?? undefined,
      password: s.password ?? undefined,
      database: s.database,
      connectTimeout,
      // client_found_rows (rows matched, as PostgreSQL counts them); no
      // LOAD DATA LOCAL, no IGNORE_SPACE (the session's sql_mode is set).
      flags: ['FOUND_ROWS', '-LOCAL_FILES', '-IGNORE_SPACE'],
      multipleStatements: false,
      rowsAsArray: true,
      dateStrings: true,
      supportBigNumbers: true,
      bigNumberStrings: true,
      decimalNumbers: false,
      jsonStrings: true,
      timezone: 'Z',
      typeCast,
      maxPreparedStatements: MAX_CACHED_STATEMENTS,
      enableKeepAlive: true,
      keepAliveInitialDelay: 30_000,
      connectAttributes: { program_name: 'image-cache' },
    };
    if (s.socket) o.socketPath = s.socket;
    else {
      o.host = s.host;
      o.port = s.port;
    }
    // A fresh object each time: mysql2 keeps TLS sessions by it, and a
    // resumed session would skip the host-name check below. mysql2's own
    // check (verifyIdentity) is off: it skips an IP address (node:tls then
    // checks the name `localhost` instead), so the host checks the name.
    if (this.ssl) o.ssl = { ...this.ssl, verifyIdentity: false };
    return o;
  }

  /** A mysql2 connection (connecting), with the URL's host-name check for
   * VERIFY_IDENTITY: after the TLS handshake, before the credentials go. */
  createClient(connectTimeout) {
    const client = mysql.createConnection(this.options(connectTimeout));
    if (this.ssl?.verifyIdentity) {
      const host = this.s.host;
      const startTLS = client.startTLS;
      client.startTLS = function (onSecure) {
        return startTLS.call(this, (err) => {
          if (!err) {
            const wrong = tls.checkServerIdentity(host, this.stream.getPeerCertificate(true));
            if (wrong) return onSecure(wrong);
          }
          return onSecure(err);
        });
      };
    }
    return client;
  }

  /** A mysql2 or socket error in the driver's terms, scrubbed. Server
   * errors carry their number and SQLSTATE (`ERROR 1146 (42S02): ...`). */
  clientError(e) {
    if (e instanceof DbError) return e;
    if (isServerError(e)) {
      return this.error(errorCode(e.errno), `ERROR ${e.errno} (${e.sqlState}): ${e.sqlMessage ?? e.message}`);
    }
    // No answer from the server: refused, reset, closed, TLS.
    return this.error('unavailable', networkMessage(e));
  }

  /** Run a statement of the host's own (text protocol): its rows. */
  query(conn, sql) {
    return new Promise((resolve, reject) => {
      conn.pending = reject;
      conn.client.query(sql, (err, rows) => {
        conn.pending = null;
        if (err) reject(err);
        else resolve(Array.isArray(rows) ? rows : []);
      });
    });
  }

  /** A new connection with its session set up, by `deadline`. */
  async connect(deadline) {
    const left = Math.min(this.s.connectTimeoutMs, deadline - Date.now());
    if (left <= 0) throw DEADLINE;
    const client = this.createClient(Math.max(1, Math.ceil(left)));
    const conn = new MysqlConn(client);
    // A connection lost while idle (or in use) is never handed out again.
    client.on('error', (e) => {
      conn.pending?.(e);
      this.lose(conn);
    });
    client.on('end', () => {
      conn.pending?.(Object.assign(new Error('Connection lost: the server closed the connection'), { code: 'PROTOCOL_CONNECTION_LOST' }));
      this.lose(conn);
    });
    try {
      await before(
        deadline + 50,
        new Promise((resolve, reject) => {
          client.connect((err) => (err ? reject(err) : resolve()));
        }),
      );
      conn.threadId = client.threadId;
      const ms = this.s.statementTimeoutMs;
      for (const sql of sessionSetup(ms)) await before(deadline, this.query(conn, sql));
      const version = textOf((await before(deadline, this.query(conn, 'SELECT VERSION()')))[0]?.[0]) ?? '';
      await before(deadline, this.query(conn, serverLimits(version, ms)));
    } catch (e) {
      conn.pooled = false;
      conn.lost = true;
      this.closeConnection(conn);
      throw e;
    }
    return conn;
  }

  /** Close a connection now (the pool's hook). */
  closeConnection(conn) {
    conn.pending = null;
    try {
      conn.client.destroy();
    } catch {}
    try {
      conn.client.stream?.destroy?.();
    } catch {}
  }

  /** Whether mysql2 already knows the connection is closed (the pool's
   * hook). */
  isDead(conn) {
    const c = conn.client;
    return Boolean(c._closing || c._fatalError || c._protocolError);
  }

  /** The account's grants against what a driver needs (once per backend). */
  async checkRole(conn) {
    const database = textOf((await this.query(conn, 'SELECT DATABASE()'))[0]?.[0]) ?? '';
    const grants = (await this.query(conn, 'SHOW GRANTS')).map((r) => textOf(r[0]) ?? '');
    const { problems, missing } = grantProblems(grants, database);
    if (!problems.length && missing.length) {
      this.warn(`database ${JSON.stringify(this.name)}: the account lacks ${missing.join(', ')}`);
    }
    this.judgeRole(
      problems,
      () =>
        `a cache driver needs only SELECT, INSERT, UPDATE, DELETE on ${CACHE_TABLES.join(' and ')}; give the cache a dedicated account, ` +
        `as \`image-cache db grants --mysql\` prints it: ${mysqlGrantStatements('image_cache', database).join(' ')}`,
    );
  }

  /** End what `conn` runs on the server: KILL QUERY from a connection of
   * its own (outside the pool, the same account and TLS), at most 5 s. */
  kill(conn) {
    const id = conn.threadId;
    if (id === null || id === undefined) return;
    let killer;
    const done = () => {
      clearTimeout(timer);
      try {
        killer?.destroy();
        killer?.stream?.destroy?.();
      } catch {}
    };
    const timer = setTimeout(done, 5000);
    try {
      killer = this.createClient(5000);
      killer.on('error', done);
      killer.query(`KILL QUERY ${Number(id)}`, done);
    } catch {
      done();
    }
  }

  /** Run one statement of a driver on `conn` by `deadline`: the number of
   * rows it matched (`want` 'count') or its rows ('rows'). */
  async statement(conn, sql, params, want, deadline) {
    const why = policyCheck(sql, 'mysql');
    if (why !== null) throw this.error('access-denied', why);
    if (conn.lost || this.isDead(conn)) throw this.error('unavailable', 'this connection was lost; open a new one');
    conn.busy = true;
    const max = this.s.maxResultBytes;
    const work = async () => {
      const stmt = await new Promise((resolve, reject) => {
        conn.pending = reject;
        conn.client.prepare(sql, (err, prepared) => (err ? reject(err) : resolve(prepared)));
      });
      const wanted = stmt.parameters?.length ?? 0;
      if (wanted !== params.length) {
        throw this.error('other', `the statement has ${wanted} parameters, ${params.length} values were given`);
      }
      const values = params.map((v, i) => {
        try {
          return mysqlParam(v);
        } catch (e) {
          throw this.error('other', `parameter ${i + 1}: ${e.message}`);
        }
      });
      return new Promise((resolve, reject) => {
        let fields = null;
        let rows = [];
        let count = 0n;
        let bytes = 0;
        let over = false;
        let failure = null;
        let settled = false;
        const fail = (e) => {
          if (settled) return;
          settled = true;
          reject(e);
        };
        conn.pending = fail;
        const cmd = stmt.execute(values);
        cmd.on('fields', (f) => {
          fields = f ?? null;
        });
        cmd.on('result', (r) => {
          if (!Array.isArray(r)) {
            // An OK packet: the rows it matched (client_found_rows).
            count = BigInt(r?.affectedRows ?? 0);
            return;
          }
          // Read to the end whatever happens, so the connection stays
          // usable.
          if (want !== 'rows' || over || failure) return;
          const row = new Array(r.length);
          for (let i = 0; i < r.length; i++) {
            let value;
            try {
              value = columnValue(r[i], fields[i]);
            } catch (e) {
              failure = this.error('other', `column ${i + 1}: ${e.message}`);
              rows = [];
              return;
            }
            bytes += valueSize(value);
            row[i] = value;
          }
          if (bytes > max) {
            over = true;
            rows = [];
            return;
          }
          rows.push(row);
        });
        cmd.on('error', fail);
        cmd.on('end', () => {
          if (settled) return;
          if (failure) return fail(failure);
          if (over) return fail(this.error('limit-exceeded', `query result exceeds ${max} bytes`));
          settled = true;
          resolve(want === 'rows' ? rows : count);
        });
      });
    };
    try {
      const value = await before(deadline, work());
      const first = firstWord(sql);
      if (first === 'begin' || first === 'start') conn.inTx = true;
      else if (first !== null && endsTransaction(sql)) conn.inTx = false;
      return value;
    } catch (e) {
      if (e === DEADLINE) {
        // Stopped at the deadline (the connection goes with the work): the
        // server stops too.
        this.kill(conn);
        this.destroy(conn);
        throw timedOut();
      }
      const err = this.clientError(e);
      // A lost connection is not used again.
      if (err.code === 'unavailable' || e?.fatal || conn.lost || this.isDead(conn)) this.destroy(conn);
      throw err;
    } finally {
      conn.pending = null;
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
