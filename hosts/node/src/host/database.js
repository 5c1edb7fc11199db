// The `database` import (image-cache:driver/database@0.3.0) in a driver
// instance's thread: synchronous for the guest, answered by the database
// worker (src/database/worker.js), which owns the pools.
//
// A call posts its request on the instance's MessagePort and sleeps in
// Atomics.wait on a shared word until the database worker has posted the
// answer (it bumps and notifies the word after posting), then takes the
// answer with receiveMessageOnPort. The database worker ends every request
// by the driver call's deadline itself; this side waits at most a little
// longer (an answer that comes later is dropped), so a call never holds
// the instance past its deadline by more than that.

import { receiveMessageOnPort } from 'node:worker_threads';

/** How long past the deadline this side waits for the database worker's
 * own timed-out answer. */
const SLACK_MS = 250;
/** How long the rollback at the end of a call may take. */
const END_OF_CALL_GRACE_MS = 2000;

class DatabaseError extends Error {
  constructor(code, message) {
    super(message);
    this.payload = { code, message };
  }
}

/**
 * channel: {port, signal, names, maxConnections} from
 * Databases.attach() (port null: no database configured).
 * ctx.deadline: the current call's Deadline.
 *
 * Returns {imports: {Connection}, endOfCall()}: the host calls endOfCall()
 * when an export call returns, which rolls back any transaction a
 * connection left open.
 */
export function makeDatabaseImports(channel, ctx) {
  const port = channel?.port ?? null;
  const signal = channel?.signal ?? null;
  const names = channel?.names ?? [];
  const maxConnections = channel?.maxConnections ?? 4;
  const open = new Set();
  let seq = 0;

  /** One request, answered by `deadlineAt` (+ slack), or timed-out. */
  function request(msg, deadlineAt) {
    const id = ++seq;
    port.postMessage({ ...msg, seq: id, deadline: deadlineAt });
    for (;;) {
      const seen = Atomics.load(signal, 0);
      for (let got = receiveMessageOnPort(port); got; got = receiveMessageOnPort(port)) {
        const m = got.message;
        if (m.seq === id) return m;
        // A late answer to a request this side gave up on: a connection it
        // opened is given back.
        if (m.ok && m.conn !== undefined && m.value === undefined) port.postMessage({ op: 'drop', conn: m.conn });
      }
      const left = deadlineAt + SLACK_MS - Date.now();
      if (left <= 0) {
        return { ok: false, error: { code: 'timed-out', message: "the database did not answer before the call's deadline" } };
      }
      Atomics.wait(signal, 0, seen, left);
    }
  }

  const fail = (error) => new DatabaseError(error.code, error.message);

  class Connection {
    /** Not called by jco: connections are made by `open`. */
    constructor() {
      throw new TypeError('connections are opened with Connection.open(name)');
    }

    /** A connection to the configured database `name`. */
    static open(name) {
      name = String(name);
      if (open.size >= maxConnections) {
        throw new DatabaseError('limit-exceeded', `an instance may hold at most ${maxConnections} database connections`);
      }
      if (!port || !names.includes(name)) {
        throw new DatabaseError(
          'access-denied',
          `no database named ${JSON.stringify(Array.from(name).slice(0, 64).join(''))} is configured for this driver (the operator sets it with image_cache_database_url, IMAGE_CACHE_DATABASE_URL, --database-url or Glance's [database] connection)`,
        );
      }
      const r = request({ op: 'open', name }, ctx.deadline.at);
      if (!r.ok) throw fail(r.error);
      const c = Object.create(Connection.prototype);
      c.id = r.conn;
      c.sqlDialect = r.dialect === 'mysql' ? 'mysql' : 'postgresql';
      c.inTx = false;
      c.dropped = false;
      open.add(c);
      return c;
    }

    /** The SQL this connection's server speaks: 'postgresql', or 'mysql'
     * (MySQL or MariaDB). */
    dialect() {
      return this.sqlDialect;
    }

    statement(op, sql, params) {
      if (this.dropped) throw new DatabaseError('unavailable', 'this connection was dropped');
      const r = request({ op, conn: this.id, sql: String(sql), params }, ctx.deadline.at);
      if (r.inTx !== undefined) this.inTx = Boolean(r.inTx);
      if (!r.ok) throw fail(r.error);
      return r.value;
    }

    /** Run one statement; the number of rows it changed. */
    execute(sql, params) {
      return this.statement('execute', sql, params);
    }

    /** Run one query; every row, each a list of column values. */
    query(sql, params) {
      return this.statement('query', sql, params);
    }

    /** The guest dropped it: back to the pool (closed if a transaction is
     * still open, which rolls it back). */
    [Symbol.dispose]() {
      if (this.dropped) return;
      this.dropped = true;
      open.delete(this);
      port?.postMessage({ op: 'drop', conn: this.id });
    }
  }

  /** The export call returned: roll back what it left open. */
  function endOfCall() {
    const inTx = [...open].filter((c) => c.inTx);
    if (!inTx.length) return;
    const r = request({ op: 'endOfCall', conns: inTx.map((c) => c.id) }, Date.now() + END_OF_CALL_GRACE_MS);
    for (const c of inTx) c.inTx = false;
    return r.ok;
  }

  return { imports: { Connection }, endOfCall };
}
