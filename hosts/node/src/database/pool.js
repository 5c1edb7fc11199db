// What the database backends share (src/database/backend.js for
// PostgreSQL, src/database/mysql.js for MySQL and MariaDB): the
// `database-error` they answer with, the deadline every step is bounded by,
// the strings no message may show, and a bounded pool of the host's own
// with the once-per-backend role check (as the Rust host's
// host/src/database/common.rs).
//
// A backend extends PooledBackend and provides:
// - connect(deadline): a new connection (an object with at least the
//   fields of PooledConn), by the deadline;
// - closeConnection(conn): close it now, whatever it is doing;
// - isDead(conn): whether the client already knows it is closed;
// - checkRole(conn): check the role or account once; on refusal set
//   this.refusal and this.role = 'refused' and throw this.refused();
// - clientError(e): a client or server error as a DbError.

/** A `database-error` for the guest: {code, message}. */
export class DbError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
  get payload() {
    return { code: this.code, message: this.message };
  }
}

export function timedOut() {
  return new DbError('timed-out', "the database did not answer before the call's deadline");
}

/** What `before` rejects with at the deadline. */
export const DEADLINE = Symbol('deadline');

/** `promise`, or a rejection with DEADLINE at `deadline` (Date.now() ms). */
export function before(deadline, promise) {
  const left = deadline - Date.now();
  if (left <= 0) {
    promise.catch(() => {});
    return Promise.reject(DEADLINE);
  }
  let timer;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      timer = setTimeout(() => reject(DEADLINE), left);
    }),
  ]).finally(() => clearTimeout(timer));
}

/** The fields every pooled connection has. */
export class PooledConn {
  constructor() {
    /** Closed, or not to be used again. */
    this.lost = false;
    /** Half-way through a statement. */
    this.busy = false;
    /** A transaction the driver began is open. */
    this.inTx = false;
    /** Counted in the pool's total. */
    this.pooled = true;
  }
}

/** A configured database: its bounded pool, its role check, its messages. */
export class PooledBackend {
  /** settings: from settings.js databaseSettings(); warn(message). */
  constructor(settings, warn = () => {}) {
    this.s = settings;
    this.name = settings.name;
    this.warn = warn;
    this.idle = [];
    this.total = 0;
    this.waiters = [];
    this.closed = false;
    this.role = 'unchecked';
    this.refusal = '';
  }

  /** `message` without any secret (URL, password, host). */
  scrub(message) {
    let m = String(message);
    for (const s of this.s.secrets) if (m.includes(s)) m = m.replaceAll(s, '(hidden)');
    return m;
  }

  error(code, message) {
    return new DbError(code, `database ${JSON.stringify(this.name)}: ${this.scrub(message)}`);
  }

  /** A connection lost while idle (or in use) is never handed out again. */
  lose(conn) {
    if (conn.lost) return;
    conn.lost = true;
    const i = this.idle.indexOf(conn);
    if (i >= 0) {
      this.idle.splice(i, 1);
      this.destroy(conn);
    }
  }

  /** Close a connection and give its place in the pool to a waiter. */
  destroy(conn) {
    conn.lost = true;
    try {
      this.closeConnection(conn);
    } catch {}
    if (conn.pooled) {
      conn.pooled = false;
      this.total--;
      this.wake();
    }
  }

  /** The first waiter gets an idle connection, or a place to open one. */
  wake() {
    while (this.waiters.length) {
      if (this.idle.length) {
        const w = this.waiters.shift();
        w.resolve(this.idle.pop());
      } else if (this.total < this.s.poolSize) {
        const w = this.waiters.shift();
        w.resolve(null);
      } else {
        return;
      }
    }
  }

  /** A connection for a driver, by `deadline`: from the pool, or a new
   * one while the pool has room; else wait for one. */
  async takeFromPool(deadline) {
    for (;;) {
      if (this.closed) throw this.error('unavailable', 'the cache that configured this database is closed');
      while (this.idle.length) {
        const c = this.idle.pop();
        if (!c.lost && !this.isDead(c)) return c;
        this.destroy(c);
      }
      if (this.total < this.s.poolSize) {
        this.total++;
        try {
          return await this.connect(deadline);
        } catch (e) {
          this.total--;
          this.wake();
          throw e;
        }
      }
      const got = await new Promise((resolve, reject) => {
        const w = { resolve, reject };
        const left = deadline - Date.now();
        w.timer = setTimeout(() => {
          const i = this.waiters.indexOf(w);
          if (i >= 0) this.waiters.splice(i, 1);
          reject(DEADLINE);
        }, Math.max(0, left));
        const settle = w.resolve;
        w.resolve = (v) => {
          clearTimeout(w.timer);
          settle(v);
        };
        this.waiters.push(w);
      });
      if (got) {
        if (!got.lost) return got;
        this.destroy(got);
      }
    }
  }

  /** Check out a connection, checking the role once per backend. */
  async checkout(deadline) {
    let conn;
    try {
      conn = await this.takeFromPool(deadline);
    } catch (e) {
      if (e === DEADLINE) throw timedOut();
      throw this.clientError(e);
    }
    if (this.role === 'ok') return conn;
    if (this.role === 'refused') {
      this.release(conn);
      throw this.refused();
    }
    try {
      await before(deadline, this.checkRole(conn));
      return conn;
    } catch (e) {
      if (e === DEADLINE) {
        this.destroy(conn);
        throw timedOut();
      }
      this.release(conn);
      throw this.clientError(e);
    }
  }

  /** A connection back from a driver: to the pool if it is healthy and
   * not inside a transaction, else closed. */
  release(conn) {
    conn.busy = false;
    if (!conn.pooled) return;
    if (conn.lost || conn.inTx || this.closed || this.isDead(conn)) {
      this.destroy(conn);
      return;
    }
    this.idle.push(conn);
    this.wake();
  }

  refused() {
    return this.error('access-denied', this.refusal);
  }

  /** The refusal of a role with `problems` (the Rust host's judge_role),
   * or acceptance with a warning when the operator allows it. */
  judgeRole(problems, remedy) {
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
    const shown = Math.min(problems.length, 3);
    this.refusal = `refused: the configured role ${problems.slice(0, shown).join('; ')}${problems.length > shown ? '; ...' : ''} (${remedy()})`;
    this.role = 'refused';
    throw this.refused();
  }

  /** No more drivers: close every connection (those in use when they come
   * back). */
  close() {
    this.closed = true;
    for (const c of this.idle.splice(0)) this.destroy(c);
    for (const w of this.waiters.splice(0)) {
      clearTimeout(w.timer);
      w.resolve(null);
    }
  }
}

/** What a socket or client error says, without an address. */
export function networkMessage(e) {
  const code = e?.code;
  const text = String(e?.message ?? e);
  const connecting = (what) => `error connecting to server: ${what}`;
  if (code === 'ECONNREFUSED') return connecting('Connection refused');
  if (code === 'ENOTFOUND' || code === 'EAI_AGAIN') return connecting('the host name could not be resolved');
  if (code === 'ENOENT') return connecting('no server socket there');
  if (code === 'EHOSTUNREACH' || code === 'ENETUNREACH') return connecting('no route to the host');
  if (code === 'ETIMEDOUT' || /timeout/i.test(text)) return connecting('timed out');
  if (
    code === 'ECONNRESET' ||
    code === 'EPIPE' ||
    code === 'PROTOCOL_CONNECTION_LOST' ||
    /terminated unexpectedly|Connection terminated|Connection lost|closed state/i.test(text)
  ) {
    return 'connection closed';
  }
  if (/does not support SSL/.test(text) || code === 'HANDSHAKE_NO_SSL_SUPPORT') {
    return 'error performing TLS handshake: the server does not support TLS';
  }
  if (/SSL|TLS|certificate|CERT_|self.signed|altnames|UNABLE_TO_VERIFY/i.test(`${code} ${text}`)) {
    return `error performing TLS handshake: ${stripAddresses(text)}`;
  }
  if (/not queryable|Client was closed/i.test(text)) return 'connection closed';
  return stripAddresses(text);
}

/** IPv4/IPv6 addresses and ports out of a message. */
export function stripAddresses(text) {
  return text
    .replace(/\b\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?\b/g, '(hidden)')
    .replace(/\[?[0-9a-fA-F]*:[0-9a-fA-F:]{2,}\]?(?::\d+)?/g, (m) => (m.split(':').length > 2 ? '(hidden)' : m));
}
