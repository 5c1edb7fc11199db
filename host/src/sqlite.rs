//! `image-cache:driver/sqlite`: SQLite databases inside the cache root,
//! confined so that no statement reaches beyond the one database file.
//!
//! SQLite can do far more than a driver needs: attach any file, write one
//! anywhere with `VACUUM INTO`, change process-wide settings with a `PRAGMA`,
//! load extensions. A guest statement runs under these host rules:
//!
//! - **Open**: a plain file name in the root (no `/`, `..`, `:memory:`,
//!   `file:` URI), never through a symlink (`SQLITE_OPEN_NOFOLLOW`), URIs
//!   off. Errors name the database, never the root's location.
//! - **Deny by default**: an authorizer allows reads and writes of tables of
//!   `main`, creating and dropping tables and indexes, transactions and
//!   savepoints, an allow-list of functions and `PRAGMA`s (with allowed
//!   values), and nothing else: no `ATTACH`, no temp objects, triggers, views
//!   or virtual tables, no `pragma_*` table functions.
//! - **Limits**: `SQLITE_LIMIT_ATTACHED` 0 (so `VACUUM INTO`, which attaches,
//!   fails too), defensive mode, `trusted_schema` off, no extensions, temp
//!   storage in memory (no temp file outside the root), bounded SQL, value
//!   and result sizes (a value is measured before it is copied).
//! - **Time and memory per call**: a progress handler stops a statement when
//!   the driver call's deadline passes, or when SQLite's memory grows by more
//!   than [`MAX_STATEMENT_MEMORY`] during it; waiting on another
//!   connection's lock ends at the deadline too.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{OpenFlags, config::DbConfig, params_from_iter};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::sqlite::{self as wit, ErrorCode, SqliteError, Value};
use crate::fs::RootFs;
use crate::runtime::Deadline;

pub type Result<T> = std::result::Result<T, SqliteError>;

/// Default cap on the bytes of one query's result.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;
/// Longest string or blob a statement may make (`SQLITE_LIMIT_LENGTH`).
pub const MAX_VALUE_BYTES: i32 = 16 * 1024 * 1024;
/// Longest SQL text (`SQLITE_LIMIT_SQL_LENGTH`).
pub const MAX_SQL_BYTES: usize = 1024 * 1024;
/// Most SQLite heap one statement may add while it runs.
pub const MAX_STATEMENT_MEMORY: i64 = 256 * 1024 * 1024;
/// Page cache per connection, in KiB (`PRAGMA cache_size`, set by the host).
const CACHE_KIB: i64 = 2 * 1024;
/// How many virtual-machine steps between two looks at the clock.
const PROGRESS_STEPS: i32 = 1000;

/// Functions a driver's SQL may call. Core scalar and aggregate functions
/// and the date functions; nothing that reads files, loads code or reports
/// pointers (`load_extension`, `fts3_tokenizer`, ...).
const FUNCTIONS: &[&str] = &[
    "abs",
    "avg",
    "changes",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "count",
    "date",
    "datetime",
    "format",
    "glob",
    "group_concat",
    "hex",
    "ifnull",
    "iif",
    "instr",
    "julianday",
    "last_insert_rowid",
    "length",
    "like",
    "likelihood",
    "likely",
    "lower",
    "ltrim",
    "max",
    "min",
    "nullif",
    "octet_length",
    "printf",
    "quote",
    "random",
    "randomblob",
    "replace",
    "round",
    "rtrim",
    "sign",
    "strftime",
    "string_agg",
    "substr",
    "substring",
    "sum",
    "time",
    "timediff",
    "total",
    "total_changes",
    "trim",
    "typeof",
    "unhex",
    "unicode",
    "unixepoch",
    "unlikely",
    "upper",
    "zeroblob",
];

/// `PRAGMA`s a driver may run, each with the values it may set (`None`:
/// any value, for those that only touch this database's own file; an empty
/// list: read-only).
const PRAGMAS: &[(&str, Option<&[&str]>)] = &[
    (
        "journal_mode",
        Some(&["wal", "delete", "truncate", "persist"]),
    ),
    (
        "synchronous",
        Some(&["0", "1", "2", "3", "off", "normal", "full", "extra"]),
    ),
    (
        "foreign_keys",
        Some(&["0", "1", "on", "off", "true", "false"]),
    ),
    ("user_version", None),
    ("application_id", None),
    (
        "auto_vacuum",
        Some(&["0", "1", "2", "none", "full", "incremental"]),
    ),
    ("incremental_vacuum", None),
    (
        "wal_checkpoint",
        Some(&["passive", "full", "restart", "truncate"]),
    ),
    ("optimize", None),
    ("integrity_check", None),
    ("quick_check", None),
    ("foreign_key_check", None),
    ("table_info", None),
    ("table_xinfo", None),
    ("table_list", None),
    ("index_list", None),
    ("index_info", None),
    ("index_xinfo", None),
    ("foreign_key_list", None),
    ("data_version", Some(&[])),
    ("freelist_count", Some(&[])),
    ("page_count", Some(&[])),
];

fn error(code: ErrorCode, message: impl Into<String>) -> SqliteError {
    SqliteError {
        code,
        message: message.into(),
    }
}

/// Why the progress handler stopped the last statement.
const STOPPED_NOT: u8 = 0;
const STOPPED_DEADLINE: u8 = 1;
const STOPPED_MEMORY: u8 = 2;

/// Per-call state the connection's progress handler reads.
#[derive(Debug, Default)]
struct CallGuard {
    /// The deadline, in nanoseconds since [`base`].
    deadline_nanos: AtomicU64,
    /// SQLite's heap use when the call began.
    memory_at_start: AtomicI64,
    stopped: AtomicU8,
}

/// The process's reference instant for deadlines kept as integers.
fn base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn sqlite_memory_used() -> i64 {
    // SAFETY: a read of a counter; callable from any thread at any time.
    unsafe { rusqlite::ffi::sqlite3_memory_used() }
}

impl CallGuard {
    fn begin(&self, deadline: Deadline) {
        let nanos = deadline.0.saturating_duration_since(base()).as_nanos();
        self.deadline_nanos
            .store(nanos.min(u64::MAX as u128) as u64, Ordering::Relaxed);
        self.memory_at_start
            .store(sqlite_memory_used(), Ordering::Relaxed);
        self.stopped.store(STOPPED_NOT, Ordering::Relaxed);
    }

    /// The progress handler: true interrupts the statement.
    fn should_stop(&self) -> bool {
        let now = base().elapsed().as_nanos().min(u64::MAX as u128) as u64;
        let reason = if now >= self.deadline_nanos.load(Ordering::Relaxed) {
            STOPPED_DEADLINE
        } else if sqlite_memory_used() - self.memory_at_start.load(Ordering::Relaxed)
            > MAX_STATEMENT_MEMORY
        {
            STOPPED_MEMORY
        } else {
            return false;
        };
        self.stopped.store(reason, Ordering::Relaxed);
        true
    }
}

/// Where databases may be opened: the cache root.
pub struct SqliteRoot {
    max_result_bytes: usize,
}

impl SqliteRoot {
    pub fn new(_root: &RootFs) -> SqliteRoot {
        SqliteRoot {
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }

    pub fn with_max_result_bytes(mut self, max: usize) -> Self {
        self.max_result_bytes = max;
        self
    }

    /// Open (creating) the database `name` in the root, confined.
    pub fn open(&self, root: &RootFs, name: &str) -> Result<Connection> {
        let plain = !name.is_empty()
            && name.len() <= 255
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\', '\0'])
            && !name.starts_with(':') // `:memory:` and friends
            && !name.starts_with("file:");
        if !plain {
            return Err(error(
                ErrorCode::AccessDenied,
                format!(
                    "database name {:?} is not a plain file name in the cache root",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        if let Ok(meta) = root.dir().symlink_metadata(name)
            && !meta.is_file()
        {
            return Err(error(
                ErrorCode::AccessDenied,
                format!("database {name:?} in the cache root is not a regular file"),
            ));
        }
        // No SQLITE_OPEN_URI: a name is a name.
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let path = root.path().join(name);
        let cannot_open =
            |e: rusqlite::Error| error(ErrorCode::CannotOpen, format!("database {name:?}: {e}"));
        let mut conn = rusqlite::Connection::open_with_flags(&path, flags).map_err(cannot_open)?;
        let guard = Arc::new(CallGuard::default());
        confine(&mut conn, guard.clone()).map_err(cannot_open)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Connection {
            conn,
            guard,
            max_result_bytes: self.max_result_bytes,
        })
    }
}

/// The host's settings and rules on a fresh connection, before the guest
/// runs anything on it.
fn confine(conn: &mut rusqlite::Connection, guard: Arc<CallGuard>) -> rusqlite::Result<()> {
    for (config, on) in [
        (DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true),
        (DbConfig::SQLITE_DBCONFIG_TRUSTED_SCHEMA, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_TRIGGER, false),
        (DbConfig::SQLITE_DBCONFIG_ENABLE_VIEW, false),
        (DbConfig::SQLITE_DBCONFIG_DQS_DML, false),
        (DbConfig::SQLITE_DBCONFIG_DQS_DDL, false),
        (DbConfig::SQLITE_DBCONFIG_WRITABLE_SCHEMA, false),
    ] {
        conn.set_db_config(config, on)?;
    }
    for (limit, value) in [
        (Limit::SQLITE_LIMIT_ATTACHED, 0),
        (Limit::SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES),
        (Limit::SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES as i32),
        (Limit::SQLITE_LIMIT_COLUMN, 100),
        (Limit::SQLITE_LIMIT_EXPR_DEPTH, 100),
        (Limit::SQLITE_LIMIT_COMPOUND_SELECT, 20),
        (Limit::SQLITE_LIMIT_VDBE_OP, 100_000),
        (Limit::SQLITE_LIMIT_FUNCTION_ARG, 16),
        (Limit::SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000),
        (Limit::SQLITE_LIMIT_VARIABLE_NUMBER, 1000),
        (Limit::SQLITE_LIMIT_TRIGGER_DEPTH, 1),
        (Limit::SQLITE_LIMIT_WORKER_THREADS, 0),
    ] {
        conn.set_limit(limit, value)?;
    }
    // Temp tables and sort spills stay in memory (bounded per statement
    // below): a temp file would be created outside the root.
    conn.execute_batch(&format!(
        "PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{CACHE_KIB}; PRAGMA mmap_size = 0;"
    ))?;
    conn.authorizer(Some(authorize))?;
    conn.progress_handler(PROGRESS_STEPS, Some(move || guard.should_stop()))?;
    conn.busy_handler(Some(busy_wait))?;
    Ok(())
}

thread_local! {
    /// The deadline of the SQL call running on this thread (set by
    /// `Connection::begin`; the statement runs on the caller's thread).
    static BUSY_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The busy handler: another connection holds the write lock. SQLite's
/// own (`busy_timeout`) sleeps 1 ms and more from the first retry, which
/// caps concurrent writers (every hit of a read session is one) at a few
/// hundred per second; this yields first, then sleeps from 20 µs up to
/// 1 ms, and gives up at the call's deadline (the statement then fails
/// with `timed-out`).
fn busy_wait(retries: i32) -> bool {
    let Some(deadline) = BUSY_DEADLINE.with(|d| d.get()) else {
        return false;
    };
    let now = Instant::now();
    if now >= deadline {
        return false;
    }
    if retries < 8 {
        std::thread::yield_now();
    } else {
        let pause = Duration::from_micros(20 * (retries as u64 - 7).min(50));
        std::thread::sleep(pause.min(deadline - now));
    }
    true
}

/// The authorizer: what a guest statement may do.
pub fn authorize(ctx: AuthContext<'_>) -> Authorization {
    let in_main = ctx.database_name.is_none_or(|d| d == "main");
    let allowed = match ctx.action {
        AuthAction::Select | AuthAction::Recursive => true,
        AuthAction::Transaction { .. } | AuthAction::Savepoint { .. } => true,
        AuthAction::Read { table_name, .. } => in_main && readable_table(table_name),
        AuthAction::Insert { .. }
        | AuthAction::Update { .. }
        | AuthAction::Delete { .. }
        | AuthAction::CreateTable { .. }
        | AuthAction::CreateIndex { .. }
        | AuthAction::DropTable { .. }
        | AuthAction::DropIndex { .. }
        | AuthAction::AlterTable { .. }
        | AuthAction::Reindex { .. }
        | AuthAction::Analyze { .. } => in_main,
        AuthAction::Function { function_name } => FUNCTIONS
            .iter()
            .any(|f| f.eq_ignore_ascii_case(function_name)),
        AuthAction::Pragma {
            pragma_name,
            pragma_value,
        } => in_main && pragma_allowed(pragma_name, pragma_value),
        // ATTACH/DETACH, temp objects, triggers, views, virtual tables and
        // anything newer than this list.
        _ => false,
    };
    if allowed {
        Authorization::Allow
    } else {
        Authorization::Deny
    }
}

/// Tables a driver may read: its own, and the schema table. Not the
/// eponymous virtual tables that expose pages, pragmas or statements.
fn readable_table(table: &str) -> bool {
    let t = table.to_ascii_lowercase();
    !(t.starts_with("pragma_") || t == "sqlite_dbpage" || t == "dbstat" || t == "sqlite_stmt")
}

fn pragma_allowed(name: &str, value: Option<&str>) -> bool {
    let name = name.to_ascii_lowercase();
    let Some((_, values)) = PRAGMAS.iter().find(|(n, _)| *n == name) else {
        return false;
    };
    match (value, values) {
        (None, _) | (Some(_), None) => true,
        (Some(v), Some(allowed)) => {
            let v = v.trim().trim_matches(['\'', '"']).to_ascii_lowercase();
            allowed.contains(&v.as_str())
        }
    }
}

/// One open database.
pub struct Connection {
    conn: rusqlite::Connection,
    guard: Arc<CallGuard>,
    max_result_bytes: usize,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

fn to_sql(v: Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Integer(i) => SqlValue::Integer(i),
        Value::Real(r) => SqlValue::Real(r),
        Value::Text(t) => SqlValue::Text(t),
        Value::Blob(b) => SqlValue::Blob(b),
    }
}

/// Bytes a value takes in a result (what the cap counts), before copying.
fn result_size(v: &ValueRef<'_>) -> usize {
    8 + match v {
        ValueRef::Text(t) => t.len(),
        ValueRef::Blob(b) => b.len(),
        _ => 0,
    }
}

fn from_sql(v: ValueRef<'_>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::Integer(i),
        ValueRef::Real(r) => Value::Real(r),
        ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::Blob(b.to_vec()),
    }
}

impl Connection {
    /// Start a guest call: its deadline bounds statements and lock waits.
    fn begin(&self, sql: &str, deadline: Deadline) -> Result<()> {
        if sql.len() > MAX_SQL_BYTES {
            return Err(error(
                ErrorCode::LimitExceeded,
                format!("SQL text is longer than {MAX_SQL_BYTES} bytes"),
            ));
        }
        if deadline.passed() {
            return Err(error(ErrorCode::TimedOut, "the call's deadline has passed"));
        }
        self.guard.begin(deadline);
        BUSY_DEADLINE.with(|d| d.set(Some(deadline.0)));
        Ok(())
    }

    /// A SQLite error in the guest's terms.
    fn sql_error(&self, e: rusqlite::Error) -> SqliteError {
        use rusqlite::ErrorCode as C;
        let stopped = self.guard.stopped.load(Ordering::Relaxed);
        let code = match e.sqlite_error_code() {
            Some(C::OperationInterrupted) if stopped == STOPPED_MEMORY => {
                return error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "the statement was stopped: it used more than {MAX_STATEMENT_MEMORY} bytes of memory"
                    ),
                );
            }
            Some(C::OperationInterrupted) => {
                return error(
                    ErrorCode::TimedOut,
                    "the statement ran until the call's deadline and was stopped",
                );
            }
            Some(C::DatabaseBusy | C::DatabaseLocked) => ErrorCode::Busy,
            Some(C::ConstraintViolation) => ErrorCode::Constraint,
            Some(C::AuthorizationForStatementDenied) => ErrorCode::AccessDenied,
            Some(C::TooBig) => ErrorCode::LimitExceeded,
            Some(C::CannotOpen | C::NotADatabase | C::PermissionDenied) => ErrorCode::CannotOpen,
            _ => ErrorCode::Other,
        };
        let message = e.to_string();
        // A function the authorizer denied is reported as a plain error.
        let code = match code {
            ErrorCode::Other if message.contains("not authorized") => ErrorCode::AccessDenied,
            code => code,
        };
        let message = match code {
            ErrorCode::AccessDenied => format!("{message} (a driver's SQL may not do this)"),
            _ => message,
        };
        error(code, message)
    }

    /// Run one statement (rows it returns are skipped); rows changed.
    pub fn execute(&self, sql: &str, params: Vec<Value>, deadline: Deadline) -> Result<u64> {
        self.begin(sql, deadline)?;
        let run = || -> rusqlite::Result<u64> {
            let mut stmt = self.conn.prepare_cached(sql)?;
            let mut rows = stmt.query(params_from_iter(params.into_iter().map(to_sql)))?;
            while rows.next()?.is_some() {}
            Ok(self.conn.changes())
        };
        run().map_err(|e| self.sql_error(e))
    }

    pub fn execute_batch(&self, sql: &str, deadline: Deadline) -> Result<()> {
        self.begin(sql, deadline)?;
        self.conn.execute_batch(sql).map_err(|e| self.sql_error(e))
    }

    pub fn query(
        &self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
    ) -> Result<Vec<Vec<Value>>> {
        self.begin(sql, deadline)?;
        let mut stmt = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| self.sql_error(e))?;
        let columns = stmt.column_count();
        let mut rows = stmt
            .query(params_from_iter(params.into_iter().map(to_sql)))
            .map_err(|e| self.sql_error(e))?;
        let mut result = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(|e| self.sql_error(e))? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                let value = row.get_ref(i).map_err(|e| self.sql_error(e))?;
                // Measured before it is copied.
                bytes = bytes.saturating_add(result_size(&value));
                if bytes > self.max_result_bytes {
                    return Err(error(
                        ErrorCode::LimitExceeded,
                        format!("query result exceeds {} bytes", self.max_result_bytes),
                    ));
                }
                values.push(from_sql(value));
            }
            result.push(values);
        }
        Ok(result)
    }
}

/// What the `sqlite` host functions borrow from a store.
pub struct SqliteView<'a> {
    pub sqlite: &'a SqliteRoot,
    pub root: &'a RootFs,
    pub table: &'a mut ResourceTable,
    /// The deadline of the driver call this import is part of.
    pub deadline: Deadline,
    /// Connections the instance holds, against `max_connections`.
    pub connections: &'a mut usize,
    pub max_connections: usize,
}

impl wit::Host for SqliteView<'_> {}

impl wit::HostConnection for SqliteView<'_> {
    fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<Connection>>> {
        if *self.connections >= self.max_connections {
            return Ok(Err(error(
                ErrorCode::LimitExceeded,
                format!(
                    "an instance may hold at most {} database connections",
                    self.max_connections
                ),
            )));
        }
        Ok(match self.sqlite.open(self.root, &name) {
            Ok(conn) => {
                let resource = self.table.push(conn)?;
                *self.connections += 1;
                Ok(resource)
            }
            Err(e) => Err(e),
        })
    }

    fn execute(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64>> {
        let deadline = self.deadline;
        Ok(self.table.get(&c)?.execute(&sql, params, deadline))
    }

    fn execute_batch(
        &mut self,
        c: Resource<Connection>,
        sql: String,
    ) -> wasmtime::Result<Result<()>> {
        let deadline = self.deadline;
        Ok(self.table.get(&c)?.execute_batch(&sql, deadline))
    }

    fn query(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Vec<Vec<Value>>>> {
        let deadline = self.deadline;
        Ok(self.table.get(&c)?.query(&sql, params, deadline))
    }

    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        *self.connections = self.connections.saturating_sub(1);
        Ok(())
    }
}

struct HasSqlite;

impl HasData for HasSqlite {
    type Data<'a> = SqliteView<'a>;
}

/// Add the `sqlite` interface to a linker; `view` borrows it from the store.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> SqliteView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasSqlite>(linker, view)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, RootFs, SqliteRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path()).unwrap();
        let sqlite = SqliteRoot::new(&root);
        (dir, root, sqlite)
    }

    fn soon() -> Deadline {
        Deadline(Instant::now() + Duration::from_secs(10))
    }

    #[test]
    fn opens_only_plain_names_in_the_root() {
        let (dir, root, sqlite) = setup();
        for name in [
            "../escape.db",
            "/tmp/abs.db",
            "sub/x.db",
            "",
            "..",
            ":memory:",
            "file:x.db?mode=memory",
            "a\\b",
        ] {
            let e = sqlite.open(&root, name).err().unwrap();
            assert_eq!(e.code, ErrorCode::AccessDenied, "{name:?}: {}", e.message);
        }
        sqlite.open(&root, "cache.db").unwrap();
        assert!(dir.path().join("cache.db").exists());
        assert!(!dir.path().parent().unwrap().join("escape.db").exists());
    }

    #[test]
    fn refuses_a_symlinked_database() {
        let outside = tempfile::tempdir().unwrap();
        let (dir, root, sqlite) = setup();
        std::os::unix::fs::symlink(outside.path().join("victim.db"), dir.path().join("evil.db"))
            .unwrap();
        assert_eq!(
            sqlite.open(&root, "evil.db").err().unwrap().code,
            ErrorCode::AccessDenied
        );
        assert!(!outside.path().join("victim.db").exists());
    }

    #[test]
    fn executes_and_queries_with_typed_values() {
        let (_dir, root, sqlite) = setup();
        let c = sqlite.open(&root, "t.db").unwrap();
        c.execute_batch(
            "CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)",
            soon(),
        )
        .unwrap();
        let row = vec![
            Value::Integer(-7),
            Value::Real(1.5),
            Value::Text("x".into()),
            Value::Blob(vec![1, 2]),
            Value::Null,
        ];
        assert_eq!(
            c.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", row.clone(), soon())
                .unwrap(),
            1
        );
        let rows = c.query("SELECT * FROM t", vec![], soon()).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(matches!(rows[0][0], Value::Integer(-7)));
        assert!(matches!(&rows[0][3], Value::Blob(b) if b == &[1, 2]));
        let e = c
            .execute("INSERT INTO nowhere VALUES (1)", vec![], soon())
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Other);
        // Rows returned by `execute` are skipped, not an error.
        c.execute("PRAGMA journal_mode=WAL", vec![], soon())
            .unwrap();
    }

    #[test]
    fn query_results_are_capped() {
        let (_dir, root, sqlite) = setup();
        let sqlite = sqlite.with_max_result_bytes(1000);
        let c = sqlite.open(&root, "t.db").unwrap();
        c.execute_batch("CREATE TABLE t (s TEXT)", soon()).unwrap();
        for _ in 0..20 {
            c.execute(
                "INSERT INTO t VALUES (?)",
                vec![Value::Text("y".repeat(100))],
                soon(),
            )
            .unwrap();
        }
        let e = c.query("SELECT s FROM t", vec![], soon()).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceeded);
    }

    #[test]
    fn the_authorizer_allows_what_drivers_need() {
        for (pragma, value, ok) in [
            ("journal_mode", Some("WAL"), true),
            ("journal_mode", Some("memory"), false),
            ("journal_mode", None, true),
            ("synchronous", Some("NORMAL"), true),
            ("hard_heap_limit", Some("1"), false),
            ("soft_heap_limit", Some("1"), false),
            ("temp_store_directory", Some("'/tmp'"), false),
            ("database_list", None, false),
            ("mmap_size", Some("1000000"), false),
            ("data_version", Some("3"), false),
        ] {
            assert_eq!(pragma_allowed(pragma, value), ok, "{pragma} {value:?}");
        }
        assert!(readable_table("cached_images"));
        assert!(!readable_table("pragma_database_list"));
        assert!(!readable_table("sqlite_dbpage"));
    }
}
