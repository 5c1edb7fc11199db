// `image-cache:driver/sqlite` on better-sqlite3 12 (13 needs Node 22).
//
// Confinement here, against host/src/sqlite.rs:
// - open: a plain file name in the root (no `/`, `..`, `:memory:`, `file:`;
//   better-sqlite3 is built with SQLITE_USE_URI=0), refused if the name or
//   its -wal/-shm/-journal companions exist as anything but regular files
//   (so SQLite never opens through a symlink);
// - every statement passes the statement gate (sqlgate.js) first: the
//   authorizer's rules as an allow-list on tokens;
// - temp_store=MEMORY (no temp file outside the root), mmap off, a bounded
//   page cache, trusted_schema off; better-sqlite3 keeps SQLite's defensive
//   mode on (unsafe mode off);
// - SQL text and query results are capped; zeroblob/randomblob are replaced
//   by versions that refuse more than MAX_VALUE_BYTES;
// - waiting for another connection's lock ends at the call's deadline
//   (busy_timeout set from it before every statement).
//
// What better-sqlite3 cannot do: stop a running statement (no progress
// handler: SQLITE_OMIT_PROGRESS_CALLBACK, no sqlite3_interrupt binding) and
// cap a value before it is copied (no sqlite3_limit). The worker that runs
// the instance is stopped at the deadline by the main thread; a statement
// already inside SQLite runs to its end on that (abandoned) thread. The gate
// refuses recursive CTEs, the one way to loop without data.

import fs from 'node:fs';
import { createRequire } from 'node:module';
import { gate, GateError } from './sqlgate.js';

export const DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024;
export const MAX_VALUE_BYTES = 16 * 1024 * 1024;
export const MAX_SQL_BYTES = 1024 * 1024;
const CACHE_KIB = 8 * 1024;

export class SqliteError extends Error {
  constructor(code, message) {
    super(message);
    this.payload = { code, message };
  }
}

const sqliteError = (code, message) => new SqliteError(code, message);

// Loaded on the first open: a driver that never opens a database (or an
// instance of the xattr driver) does not pay for the native add-on.
let Database = null;
function database() {
  Database ??= createRequire(import.meta.url)('better-sqlite3');
  return Database;
}

function plainName(name) {
  return (
    typeof name === 'string' &&
    name.length > 0 &&
    Buffer.byteLength(name) <= 255 &&
    name !== '.' &&
    name !== '..' &&
    !/[/\\\0]/.test(name) &&
    !name.startsWith(':') &&
    !name.startsWith('file:')
  );
}

function fromSqlite(e) {
  if (e instanceof SqliteError) return e;
  if (e instanceof GateError) return sqliteError('access-denied', e.message);
  const code = String(e?.code ?? '');
  const message = String(e?.message ?? e);
  if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) return sqliteError('busy', message);
  if (code.startsWith('SQLITE_CONSTRAINT')) return sqliteError('constraint', message);
  if (code.startsWith('SQLITE_AUTH')) return sqliteError('access-denied', `${message} (a driver's SQL may not do this)`);
  if (code.startsWith('SQLITE_TOOBIG')) return sqliteError('limit-exceeded', message);
  if (code.startsWith('SQLITE_CANTOPEN') || code.startsWith('SQLITE_NOTADB') || code.startsWith('SQLITE_PERM')) {
    return sqliteError('cannot-open', message);
  }
  if (e instanceof RangeError) return sqliteError('limit-exceeded', message);
  return sqliteError('other', message);
}

function toParam(v) {
  switch (v.tag) {
    case 'null':
      return null;
    case 'integer':
      return BigInt(v.val);
    case 'real':
      return v.val;
    case 'text':
      return v.val;
    case 'blob':
      return Buffer.from(v.val.buffer, v.val.byteOffset, v.val.byteLength);
    default:
      throw sqliteError('other', `unknown value ${String(v.tag)}`);
  }
}

function toValue(x) {
  if (x === null || x === undefined) return { tag: 'null' };
  if (typeof x === 'bigint') return { tag: 'integer', val: x };
  if (typeof x === 'number') return { tag: 'real', val: x };
  if (typeof x === 'string') return { tag: 'text', val: x };
  if (x instanceof Uint8Array) return { tag: 'blob', val: new Uint8Array(x) };
  return { tag: 'text', val: String(x) };
}

function valueSize(x) {
  if (typeof x === 'string') return 8 + Buffer.byteLength(x);
  if (x instanceof Uint8Array) return 8 + x.byteLength;
  return 8;
}

/** Make the import object's `Connection` class for one instance. */
export function makeSqlite(ctx) {
  const { root, limits } = ctx;
  const maxResult = limits.maxQueryBytes ?? DEFAULT_MAX_RESULT_BYTES;

  class Connection {
    static open(name) {
      if (ctx.connections >= limits.connections) {
        throw sqliteError(
          'limit-exceeded',
          `an instance may hold at most ${limits.connections} database connections`,
        );
      }
      if (!plainName(name)) {
        throw sqliteError(
          'access-denied',
          `database name ${JSON.stringify(String(name).slice(0, 64))} is not a plain file name in the cache root`,
        );
      }
      for (const companion of ['', '-wal', '-shm', '-journal']) {
        let st;
        try {
          st = fs.lstatSync(`${root.real}/${name}${companion}`);
        } catch {
          continue;
        }
        if (!st.isFile()) {
          throw sqliteError(
            'access-denied',
            `database ${JSON.stringify(name + companion)} in the cache root is not a regular file`,
          );
        }
      }
      let db;
      try {
        const Db = database();
        db = new Db(`${root.real}/${name}`, { timeout: 1 });
        db.unsafeMode(false);
        db.pragma('temp_store = MEMORY');
        db.pragma(`cache_size = -${CACHE_KIB}`);
        db.pragma('mmap_size = 0');
        db.pragma('trusted_schema = OFF');
        db.defaultSafeIntegers(true);
        const capped = (make) => (n) => {
          const len = Number(n);
          if (!(len <= MAX_VALUE_BYTES)) throw new RangeError(`string or blob too big: values are limited to ${MAX_VALUE_BYTES} bytes`);
          return make(Math.max(0, len));
        };
        db.function('zeroblob', { deterministic: true }, capped((n) => Buffer.alloc(n)));
        db.function('randomblob', capped((n) => {
          const b = Buffer.alloc(Math.max(1, n));
          for (let i = 0; i < b.length; i++) b[i] = (Math.random() * 256) | 0;
          return b;
        }));
      } catch (e) {
        try {
          db?.close();
        } catch {}
        const err = fromSqlite(e);
        throw sqliteError('cannot-open', `database ${JSON.stringify(name)}: ${err.message.replaceAll(root.real, '<root>')}`);
      }
      ctx.connections++;
      const c = Object.create(Connection.prototype);
      c.db = db;
      c.statements = new Map();
      c.open = true;
      ctx.databases.add(c);
      return c;
    }

    begin(sql) {
      if (!this.open) throw sqliteError('other', 'the connection is closed');
      if (typeof sql !== 'string' || Buffer.byteLength(sql) > MAX_SQL_BYTES) {
        throw sqliteError('limit-exceeded', `SQL text is longer than ${MAX_SQL_BYTES} bytes`);
      }
      const remaining = ctx.deadline.remaining();
      if (remaining <= 0) throw sqliteError('timed-out', "the call's deadline has passed");
      this.db.pragma(`busy_timeout = ${Math.max(1, Math.floor(remaining))}`);
    }

    prepare(sql) {
      let stmt = this.statements.get(sql);
      if (stmt) return stmt;
      gate(sql);
      stmt = this.db.prepare(sql);
      if (this.statements.size >= 64) this.statements.delete(this.statements.keys().next().value);
      this.statements.set(sql, stmt);
      return stmt;
    }

    execute(sql, params) {
      try {
        this.begin(sql);
        const stmt = this.prepare(sql);
        const args = params.map(toParam);
        if (stmt.reader) {
          for (const _ of stmt.raw(true).iterate(...args)) {
            if (ctx.deadline.passed()) throw sqliteError('timed-out', 'the statement ran until the call\'s deadline and was stopped');
          }
          return 0n;
        }
        return BigInt(stmt.run(...args).changes);
      } catch (e) {
        throw fromSqlite(e);
      }
    }

    executeBatch(sql) {
      try {
        this.begin(sql);
        gate(sql, { batch: true });
        this.db.exec(sql);
      } catch (e) {
        throw fromSqlite(e);
      }
    }

    query(sql, params) {
      try {
        this.begin(sql);
        const stmt = this.prepare(sql);
        const args = params.map(toParam);
        if (!stmt.reader) {
          stmt.run(...args);
          return [];
        }
        const rows = [];
        let bytes = 0;
        for (const row of stmt.raw(true).iterate(...args)) {
          const values = [];
          for (const x of row) {
            bytes += valueSize(x);
            if (bytes > maxResult) {
              throw sqliteError('limit-exceeded', `query result exceeds ${maxResult} bytes`);
            }
            values.push(toValue(x));
          }
          rows.push(values);
          if ((rows.length & 1023) === 0 && ctx.deadline.passed()) {
            throw sqliteError('timed-out', "the statement ran until the call's deadline and was stopped");
          }
        }
        return rows;
      } catch (e) {
        throw fromSqlite(e);
      }
    }

    close() {
      if (!this.open) return;
      this.open = false;
      ctx.databases.delete(this);
      ctx.connections--;
      try {
        this.db.close();
      } catch {}
    }

    [Symbol.dispose]() {
      this.close();
    }
  }
  return Connection;
}
