// The statement gate: what a driver's SQL may do, decided on the host before
// better-sqlite3 prepares it.
//
// better-sqlite3 exposes neither SQLite's authorizer nor its progress
// handler nor sqlite3_limit, so the Rust host's rules (host/src/sqlite.rs)
// are enforced here on the tokens of each statement instead: deny by
// default, the same allow-lists of functions and PRAGMAs (with values).
//
// A statement passes only if:
// - it is one statement whose first keyword is one of STATEMENTS;
// - it has none of the keywords of REFUSED (ATTACH, DETACH, VACUUM, temp
//   objects, triggers, views, virtual tables, recursive CTEs), as bare words
//   anywhere in it;
// - every `name(` that is a function call names a function of FUNCTIONS
//   (table, index and type names in DDL, INSERT column lists and CTE names
//   are told apart by the word before them);
// - it reads no `pragma_*` table function, sqlite_dbpage, dbstat or
//   sqlite_stmt, and names no `temp` schema (without ATTACH, the only other);
// - a PRAGMA names an allow-listed pragma with an allowed value.

export class GateError extends Error {}

export const FUNCTIONS = new Set([
  'abs', 'avg', 'changes', 'char', 'coalesce', 'concat', 'concat_ws', 'count', 'date',
  'datetime', 'format', 'glob', 'group_concat', 'hex', 'ifnull', 'iif', 'instr', 'julianday',
  'last_insert_rowid', 'length', 'like', 'likelihood', 'likely', 'lower', 'ltrim', 'max', 'min',
  'nullif', 'octet_length', 'printf', 'quote', 'random', 'randomblob', 'replace', 'round',
  'rtrim', 'sign', 'strftime', 'string_agg', 'substr', 'substring', 'sum', 'time', 'timediff',
  'total', 'total_changes', 'trim', 'typeof', 'unhex', 'unicode', 'unixepoch', 'unlikely',
  'upper', 'zeroblob',
]);

/** PRAGMAs a driver may run: null allows any value, [] none (read only). */
export const PRAGMAS = new Map([
  ['journal_mode', ['wal', 'delete', 'truncate', 'persist']],
  ['synchronous', ['0', '1', '2', '3', 'off', 'normal', 'full', 'extra']],
  ['foreign_keys', ['0', '1', 'on', 'off', 'true', 'false']],
  ['user_version', null],
  ['application_id', null],
  ['auto_vacuum', ['0', '1', '2', 'none', 'full', 'incremental']],
  ['incremental_vacuum', null],
  ['wal_checkpoint', ['passive', 'full', 'restart', 'truncate']],
  ['optimize', null],
  ['integrity_check', null],
  ['quick_check', null],
  ['foreign_key_check', null],
  ['table_info', null],
  ['table_xinfo', null],
  ['table_list', null],
  ['index_list', null],
  ['index_info', null],
  ['index_xinfo', null],
  ['foreign_key_list', null],
  ['data_version', []],
  ['freelist_count', []],
  ['page_count', []],
]);

const STATEMENTS = new Set([
  'select', 'insert', 'replace', 'update', 'delete', 'create', 'drop', 'alter', 'begin',
  'commit', 'end', 'rollback', 'savepoint', 'release', 'pragma', 'with', 'reindex', 'analyze',
  'values',
]);

const REFUSED = new Set([
  'attach', 'detach', 'vacuum', 'trigger', 'view', 'virtual', 'temp', 'temporary', 'recursive',
]);

/** Keywords that may stand before `(` without being a function call. */
const KEYWORDS_BEFORE_PAREN = new Set([
  'in', 'values', 'exists', 'key', 'unique', 'check', 'default', 'cast', 'over', 'filter',
  'as', 'and', 'or', 'not', 'on', 'using', 'select', 'from', 'where', 'set', 'then', 'else',
  'when', 'case', 'is', 'like', 'glob', 'between', 'by', 'join', 'into', 'returning', 'do',
  'conflict', 'union', 'all', 'except', 'intersect', 'generated', 'always', 'references',
  'table', 'index', 'with', 'limit', 'offset', 'having', 'group', 'order', 'escape', 'collate',
  'distinct', 'update', 'nulls', 'partition', 'primary', 'foreign', 'constraint', 'raise',
]);

const READ_REFUSED = /^(pragma_.*|sqlite_dbpage|dbstat|sqlite_stmt)$/;

/** Split SQL into tokens: {t: 'word'|'qword'|'str'|'num'|'punct', v}. */
export function tokenize(sql) {
  const out = [];
  let i = 0;
  const n = sql.length;
  while (i < n) {
    const c = sql[i];
    if (/\s/.test(c)) {
      i++;
    } else if (c === '-' && sql[i + 1] === '-') {
      while (i < n && sql[i] !== '\n') i++;
    } else if (c === '/' && sql[i + 1] === '*') {
      const end = sql.indexOf('*/', i + 2);
      i = end < 0 ? n : end + 2;
    } else if (c === "'") {
      let j = i + 1;
      let v = '';
      for (;;) {
        if (j >= n) throw new GateError('unterminated string literal');
        if (sql[j] === "'") {
          if (sql[j + 1] === "'") {
            v += "'";
            j += 2;
            continue;
          }
          break;
        }
        v += sql[j++];
      }
      out.push({ t: 'str', v });
      i = j + 1;
    } else if (c === '"' || c === '`' || c === '[') {
      const close = c === '[' ? ']' : c;
      let j = i + 1;
      let v = '';
      for (;;) {
        if (j >= n) throw new GateError('unterminated quoted name');
        if (sql[j] === close) {
          if (close !== ']' && sql[j + 1] === close) {
            v += close;
            j += 2;
            continue;
          }
          break;
        }
        v += sql[j++];
      }
      out.push({ t: 'qword', v: v.toLowerCase() });
      i = j + 1;
    } else if (/[A-Za-z_\u0080-\uffff]/.test(c)) {
      let j = i + 1;
      while (j < n && /[A-Za-z0-9_$\u0080-\uffff]/.test(sql[j])) j++;
      out.push({ t: 'word', v: sql.slice(i, j).toLowerCase() });
      i = j;
    } else if (/[0-9.]/.test(c) && (c !== '.' || /[0-9]/.test(sql[i + 1] ?? ''))) {
      let j = i + 1;
      while (j < n && /[0-9A-Za-z_.]/.test(sql[j])) j++;
      // exponent signs
      while (j < n && /[+-]/.test(sql[j]) && /[eE]/.test(sql[j - 1])) {
        j++;
        while (j < n && /[0-9]/.test(sql[j])) j++;
      }
      out.push({ t: 'num', v: sql.slice(i, j) });
      i = j;
    } else if (c === '?' || c === ':' || c === '@' || c === '$') {
      let j = i + 1;
      while (j < n && /[A-Za-z0-9_]/.test(sql[j])) j++;
      out.push({ t: 'param', v: sql.slice(i, j) });
      i = j;
    } else {
      // Two-character operators do not matter here; one char at a time.
      out.push({ t: 'punct', v: c });
      i++;
    }
  }
  return out;
}

/** Split a batch into statements (top-level `;`). */
export function splitStatements(tokens) {
  const stmts = [];
  let cur = [];
  for (const tok of tokens) {
    if (tok.t === 'punct' && tok.v === ';') {
      if (cur.length) stmts.push(cur);
      cur = [];
    } else {
      cur.push(tok);
    }
  }
  if (cur.length) stmts.push(cur);
  return stmts;
}

function deny(why) {
  throw new GateError(`${why} (a driver's SQL may not do this)`);
}

function pragmaValue(tokens, from) {
  // PRAGMA name = value | PRAGMA name(value) | PRAGMA name
  const rest = tokens.slice(from);
  if (rest.length === 0) return null;
  let vals;
  if (rest[0].v === '=') vals = rest.slice(1);
  else if (rest[0].v === '(' && rest[rest.length - 1].v === ')') vals = rest.slice(1, -1);
  else deny('a PRAGMA in an unexpected form');
  if (vals.length === 2 && vals[0].v === '-' && vals[1].t === 'num') return '-' + vals[1].v;
  if (vals.length !== 1) deny('a PRAGMA with a compound value');
  return vals[0].v.toLowerCase();
}

function checkPragma(tokens) {
  let i = 1;
  let name = tokens[i];
  if (tokens[i + 1]?.v === '.') {
    if (name.v !== 'main') deny(`PRAGMA on schema ${JSON.stringify(name.v)}`);
    i += 2;
    name = tokens[i];
  }
  if (!name || (name.t !== 'word' && name.t !== 'qword')) deny('a PRAGMA without a name');
  const allowed = PRAGMAS.get(name.v);
  if (allowed === undefined) deny(`PRAGMA ${name.v}`);
  const value = pragmaValue(tokens, i + 1);
  if (value !== null && allowed !== null && !allowed.includes(value)) {
    deny(`PRAGMA ${name.v} = ${value}`);
  }
}

/** Words SQLite reads as keywords (enough of them to tell a type name,
 * which follows a column name, from a call after a keyword). */
const SQL_KEYWORDS = new Set([...KEYWORDS_BEFORE_PAREN, ...STATEMENTS, ...REFUSED,
  'add', 'column', 'rename', 'to', 'if', 'null', 'asc', 'desc', 'autoincrement', 'left',
  'right', 'inner', 'outer', 'cross', 'natural', 'full', 'abort', 'fail', 'ignore', 'or',
  'deferrable', 'initially', 'deferred', 'immediate', 'exclusive', 'transaction', 'match',
  'action', 'restrict', 'cascade', 'no', 'without', 'rowid', 'strict', 'stored', 'current',
  'rows', 'range', 'groups', 'exclude', 'others', 'ties', 'first', 'last', 'preceding',
  'following', 'unbounded', 'window', 'isnull', 'notnull', 'regexp', 'indexed', 'plan',
  'query', 'explain', 'materialized', 'instead', 'of', 'before', 'after', 'each', 'row', 'for',
]);

/** The index of the `)` closing the `(` at tokens[open]. */
function closing(tokens, open) {
  let depth = 0;
  for (let j = open; j < tokens.length; j++) {
    if (tokens[j].v === '(') depth++;
    else if (tokens[j].v === ')' && --depth === 0) return j;
  }
  return -1;
}

/** Whether `name(` at tokens[i] names a table, index, CTE or type rather
 * than calling a function. */
function nameSpot(tokens, i, kind) {
  const prev = tokens[i - 1];
  if (!prev) return false;
  const ddl = kind === 'create' || kind === 'alter';
  if (ddl && ['table', 'exists', 'references'].includes(prev.v) && prev.t === 'word') return true;
  if (kind === 'create' && prev.v === 'on' && tokens.some((t) => t.t === 'word' && t.v === 'index')) {
    return true;
  }
  if ((kind === 'insert' || kind === 'replace' || kind === 'with') && prev.v === 'into') return true;
  // A CTE: `WITH name(cols) AS (` or `, name(cols) AS (`.
  if ((prev.v === 'with' || prev.v === ',') && tokens[closing(tokens, i + 1) + 1]?.v === 'as') {
    return tokens.some((t) => t.t === 'word' && t.v === 'with');
  }
  // A type with a size after a column name: `name VARCHAR(32)`.
  if (ddl && (prev.t === 'word' || prev.t === 'qword') && !SQL_KEYWORDS.has(prev.v)) {
    const before = tokens[i - 2];
    return before && (before.v === '(' || before.v === ',' || before.v === 'column' || before.v === 'add');
  }
  return false;
}

/** Check one statement's tokens; throws GateError when refused. */
export function checkStatement(tokens) {
  if (tokens.length === 0) return;
  const first = tokens[0];
  for (const tok of tokens) {
    if (tok.t === 'word' && REFUSED.has(tok.v)) deny(tok.v.toUpperCase());
  }
  if (first.t !== 'word' || !STATEMENTS.has(first.v)) {
    deny(`a statement starting with ${JSON.stringify(first.v)}`);
  }
  if (first.v === 'pragma') return checkPragma(tokens);
  for (let i = 0; i < tokens.length; i++) {
    const tok = tokens[i];
    if (tok.t === 'word' && REFUSED.has(tok.v)) deny(tok.v.toUpperCase());
    // Without ATTACH the only other schema is temp, quoted or not.
    if (tok.t === 'qword' && (tok.v === 'temp' || tok.v === 'temporary')) deny('the temp schema');
    if ((tok.t === 'word' || tok.t === 'qword') && READ_REFUSED.test(tok.v)) deny(`reading ${tok.v}`);
    if (tok.t === 'word' || tok.t === 'qword') {
      const next = tokens[i + 1];
      // A call: `name(` (quoted names too: SQLite calls `"f"(x)` as f).
      const keyword = tok.t === 'word' && KEYWORDS_BEFORE_PAREN.has(tok.v);
      if (next?.v === '(' && !keyword) {
        if (FUNCTIONS.has(tok.v)) continue;
        if (!nameSpot(tokens, i, first.v)) deny(`function ${tok.v}()`);
      }
    }
  }
}

/** Check SQL text (one statement, or a batch when batch is true). */
export function gate(sql, { batch = false } = {}) {
  const stmts = splitStatements(tokenize(sql));
  if (!batch && stmts.length > 1) deny('more than one statement');
  for (const s of stmts) checkStatement(s);
  return stmts.length;
}
