// What a driver's SQL may say to a shared database, checked before the
// statement is sent: a port of the Rust host's host/src/database/policy.rs
// (same tokenizer, same lists, same messages).
//
// The real fence is the database role the operator gives the host (the
// backend refuses a role with more than DML on the cache tables when it
// first connects). This is defence in depth on top of it, and it closes
// what any role can do that a cache driver never needs:
//
// - one statement per call;
// - statements a driver needs, by their first word: SELECT, INSERT,
//   UPDATE, DELETE, WITH, VALUES, transactions and savepoints, CREATE
//   TABLE / CREATE [UNIQUE] INDEX and LOCK; not COPY, SET/RESET, SHOW,
//   ALTER SYSTEM, LOAD, DO, CALL, CREATE FUNCTION/EXTENSION/ROLE, GRANT,
//   LISTEN/NOTIFY, PREPARE, cursors, VACUUM, ...;
// - no names that reach beyond the driver's tables or tell it where it
//   runs, anywhere in the statement (outside string literals and
//   comments): the catalogs (pg_*, information_schema), large objects
//   (lo_*), dblink*, settings (set_config, current_setting), addresses
//   (inet_*), who the session is (current_user, ...), and functions that
//   run SQL given as a string (query_to_xml, ts_stat, ts_rewrite).
//
// On MySQL and MariaDB (dialect 'mysql') the same rules hold, read the way
// their scanner reads SQL (backquoted names are words, no dollar quotes,
// no E'' escapes; the host sets NO_BACKSLASH_ESCAPES and ANSI_QUOTES on
// every session so strings and "names" scan as here), and more is refused:
// comments of every kind (/*! ... */ and /*M! ... */ are run, not skipped,
// and 1--1 is arithmetic), variables (@x, @@datadir), server files
// (LOAD_FILE, INTO OUTFILE/DUMPFILE), the system schemas (mysql,
// performance_schema, sys), who and where the session is (DATABASE(),
// CONNECTION_ID(), UUID(), which carries the server's MAC address), and
// server-wide named locks (GET_LOCK, ...).

/** Longest SQL text a driver may send (bytes). */
export const MAX_SQL_BYTES = 64 * 1024;

/** First words a statement may start with. */
export const STATEMENTS = [
  'select', 'insert', 'update', 'delete', 'with', 'values', 'begin', 'start', 'commit', 'end',
  'rollback', 'abort', 'savepoint', 'release', 'create', 'lock',
];

/** What may follow CREATE. */
export const CREATABLE = ['table', 'index', 'unique'];

/** Names refused anywhere in a statement. */
export const DENIED = [
  'information_schema', 'set_config', 'current_setting', 'inet_server_addr', 'inet_server_port',
  'inet_client_addr', 'inet_client_port', 'current_user', 'session_user', 'system_user', 'user',
  'current_role', 'current_database', 'current_catalog', 'current_schema', 'current_schemas',
  'version', 'ts_stat', 'ts_rewrite', 'txid_current_snapshot',
];

/** More names refused anywhere on MySQL and MariaDB. */
export const DENIED_MYSQL = [
  'load_file', 'outfile', 'dumpfile', 'mysql', 'performance_schema', 'sys', 'database', 'schema',
  'connection_id', 'uuid', 'uuid_short', 'get_lock', 'release_lock', 'release_all_locks', 'is_free_lock',
  'is_used_lock', 'master_pos_wait', 'master_gtid_wait', 'source_pos_wait', 'sys_exec', 'sys_eval',
];

/** Prefixes of names refused anywhere. */
export const DENIED_PREFIXES = ['pg_', 'lo_', 'dblink'];

/** Suffixes of names refused anywhere (query_to_xml, table_to_xmlschema). */
export const DENIED_SUFFIXES = ['_to_xml', '_to_xmlschema', '_to_xml_and_xmlschema'];

const SEMICOLON = Symbol('semicolon');
const OTHER = Symbol('other');

/** Rust's u8::is_ascii_whitespace: space, \t, \n, \x0C, \r (not \x0B). */
function isSpace(c) {
  return c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0c || c === 0x0d;
}
function isAlpha(c) {
  return (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a);
}
function isDigit(c) {
  return c >= 0x30 && c <= 0x39;
}
function isAlnum(c) {
  return isAlpha(c) || isDigit(c);
}
/** ASCII lowercase only (Rust's to_ascii_lowercase). */
function asciiLower(s) {
  return s.replace(/[A-Z]+/g, (m) => m.toLowerCase());
}

class PolicyError extends Error {}

/** A quoted name from b[i] (the opening `quote`) on: [word, next i]. */
function quotedWord(b, i, quote, unterminated) {
  const n = b.length;
  const word = [];
  i += 1;
  for (;;) {
    if (i >= n) throw unterminated('quoted identifier');
    if (b[i] === quote && b[i + 1] === quote) {
      word.push(quote);
      i += 2;
    } else if (b[i] === quote) {
      i += 1;
      break;
    } else {
      word.push(b[i]);
      i += 1;
    }
  }
  return [asciiLower(Buffer.from(word).toString('utf8')), i];
}

/**
 * Split SQL into words (lowercased strings), SEMICOLON and OTHER, skipping
 * whitespace, comments and string literals ('...', E'...', $tag$...$tag$).
 * Quoted identifiers are words (lowercased, so "PG_READ_FILE" is caught
 * too). On MySQL (`mysql` true), backquoted names are words too, and
 * comments and variables are refused. Works on the UTF-8 bytes, as the
 * Rust host does.
 */
function tokenize(sql, mysql = false) {
  const b = Buffer.from(sql, 'utf8');
  const n = b.length;
  const tokens = [];
  let i = 0;
  const unterminated = (what) => new PolicyError(`unterminated ${what} in SQL`);
  while (i < n) {
    const c = b[i];
    if (isSpace(c)) {
      i += 1;
    } else if (
      mysql &&
      (c === 0x23 /* # */ || (c === 0x2d /* - */ && b[i + 1] === 0x2d) || (c === 0x2f /* / */ && b[i + 1] === 0x2a /* * */))
    ) {
      throw new PolicyError(
        'comments are not allowed in MySQL statements (the server runs /*! ... */ and reads 1--1 as arithmetic)',
      );
    } else if (mysql && c === 0x40 /* @ */) {
      throw new PolicyError('variables (@name, @@name) are not allowed');
    } else if (mysql && c === 0x60 /* ` */) {
      const [word, next] = quotedWord(b, i, 0x60, unterminated);
      tokens.push(word);
      i = next;
    } else if (c === 0x2d /* - */ && b[i + 1] === 0x2d) {
      // PostgreSQL's scanner ends a comment at a newline or a carriage
      // return (release 0.2 missed the \r).
      while (i < n && b[i] !== 0x0a && b[i] !== 0x0d) i += 1;
    } else if (c === 0x2f /* / */ && b[i + 1] === 0x2a /* * */) {
      // Comments nest in PostgreSQL.
      let depth = 0;
      for (;;) {
        if (i + 1 >= n) throw unterminated('comment');
        if (b[i] === 0x2f && b[i + 1] === 0x2a) {
          depth += 1;
          i += 2;
        } else if (b[i] === 0x2a && b[i + 1] === 0x2f) {
          depth -= 1;
          i += 2;
          if (depth === 0) break;
        } else {
          i += 1;
        }
      }
    } else if (c === 0x27 /* ' */) {
      // E'...' strings take backslash escapes; the E was read as a word
      // just before, which is harmless.
      const escapes =
        !mysql &&
        i > 0 &&
        (b[i - 1] === 0x65 || b[i - 1] === 0x45) &&
        (i < 2 || !(isAlnum(b[i - 2]) || b[i - 2] === 0x5f || b[i - 2] >= 0x80));
      i += 1;
      for (;;) {
        if (i >= n) throw unterminated('string');
        if (b[i] === 0x5c /* \ */ && escapes) i += 2;
        else if (b[i] === 0x27 && b[i + 1] === 0x27) i += 2;
        else if (b[i] === 0x27) {
          i += 1;
          break;
        } else i += 1;
      }
      tokens.push(OTHER);
    } else if (c === 0x22 /* " */) {
      const [word, next] = quotedWord(b, i, 0x22, unterminated);
      tokens.push(word);
      i = next;
    } else if (!mysql && c === 0x24 /* $ */ && i + 1 < n && (b[i + 1] === 0x24 || isAlpha(b[i + 1]) || b[i + 1] === 0x5f)) {
      // A dollar-quoted string: $tag$ ... $tag$.
      const tagEnd = b.indexOf(0x24, i + 1);
      if (tagEnd < 0) throw unterminated('dollar quote');
      const tag = b.subarray(i, tagEnd + 1);
      for (const x of tag.subarray(1, tag.length - 1)) {
        if (!(isAlnum(x) || x === 0x5f)) throw new PolicyError('malformed dollar quote in SQL');
      }
      const body = i + tag.length;
      const at = b.indexOf(tag, body);
      if (at < 0) throw unterminated('dollar-quoted string');
      i = at + tag.length;
      tokens.push(OTHER);
    } else if (
      c === 0x26 /* & */ &&
      i > 0 &&
      (b[i - 1] === 0x75 || b[i - 1] === 0x55) &&
      (b[i + 1] === 0x22 || b[i + 1] === 0x27)
    ) {
      // U&"..." spells a name with escapes (U&"pg\005fread_file").
      throw new PolicyError('Unicode-escaped names and strings (U&) are not allowed');
    } else if (c === 0x3b /* ; */) {
      tokens.push(SEMICOLON);
      i += 1;
    } else if (isAlpha(c) || c === 0x5f || c >= 0x80) {
      const start = i;
      while (i < n && (isAlnum(b[i]) || b[i] === 0x5f || b[i] === 0x24 || b[i] >= 0x80)) i += 1;
      tokens.push(asciiLower(b.subarray(start, i).toString('utf8')));
    } else {
      tokens.push(OTHER);
      i += 1;
    }
  }
  return tokens;
}

/** Rust's `{:?}` of a string, near enough: JSON's quoting. */
function debug(s) {
  return JSON.stringify(s);
}

/** Why a statement is refused (the message says what to change), or null
 * when it may be sent; `dialect` is 'postgresql' or 'mysql' (MySQL and
 * MariaDB). */
export function check(sql, dialect = 'postgresql') {
  const mysql = dialect === 'mysql';
  if (Buffer.byteLength(sql, 'utf8') > MAX_SQL_BYTES) return `SQL text is longer than ${MAX_SQL_BYTES} bytes`;
  let tokens;
  try {
    tokens = tokenize(sql, mysql);
  } catch (e) {
    if (e instanceof PolicyError) return e.message;
    throw e;
  }
  const words = tokens.filter((t) => typeof t === 'string');
  const first = words[0];
  if (first === undefined) return 'empty statement';
  if (!STATEMENTS.includes(first)) return `a driver may not run ${first.toUpperCase()} statements`;
  if (first === 'create') {
    const what = words[1] ?? '';
    if (!CREATABLE.includes(what)) return `a driver may create tables and indexes, not ${what.toUpperCase()}`;
  }
  // One statement: nothing but a trailing `;` after the first one.
  const semi = tokens.indexOf(SEMICOLON);
  if (semi >= 0 && tokens.slice(semi + 1).some((t) => t !== SEMICOLON)) return 'one statement per call';
  for (const w of words) {
    const denied =
      DENIED.includes(w) ||
      (mysql && DENIED_MYSQL.includes(w)) ||
      DENIED_PREFIXES.some((p) => w.startsWith(p)) || DENIED_SUFFIXES.some((s) => w.endsWith(s));
    if (denied) return `a driver's SQL may not use ${debug(w)}`;
  }
  return null;
}

/** The first word of a statement, lowercased (`begin`, `commit`, ...),
 * or null. */
export function firstWord(sql) {
  try {
    return tokenize(sql).find((t) => typeof t === 'string') ?? null;
  } catch {
    return null;
  }
}

/** Whether `sql` is a plain end of a transaction (COMMIT, END, ABORT or
 * ROLLBACK, with an optional WORK/TRANSACTION), not one that opens another
 * (AND CHAIN) or ends only a savepoint (TO). */
export function endsTransaction(sql) {
  const words = sql
    .trim()
    .replace(/;+$/, '')
    .split(/\s+/u)
    .filter((w) => w.length > 0)
    .map(asciiLower);
  const ends = ['commit', 'end', 'abort', 'rollback'];
  if (words.length === 1) return ends.includes(words[0]);
  if (words.length === 2) return ends.includes(words[0]) && (words[1] === 'work' || words[1] === 'transaction');
  return false;
}
