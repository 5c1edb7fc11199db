//! `image-cache:driver/sqlite`: SQLite databases inside the cache root.
//!
//! The guest names a database by a plain file name; this module maps it into
//! the root, refusing anything with a `/`, `..` or a symlink at that name
//! (and SQLite itself is told not to follow one). Query results are capped in
//! bytes so a guest cannot make the host allocate without bound.

use std::path::PathBuf;
use std::time::Duration;

use rusqlite::types::{Value as SqlValue, ValueRef};
use rusqlite::{OpenFlags, params_from_iter};
use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::sqlite::{self as wit, ErrorCode, SqliteError, Value};
use crate::fs::RootFs;

pub type Result<T> = std::result::Result<T, SqliteError>;

/// Default cap on the bytes of one query's result.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 256 * 1024 * 1024;
/// How long a statement waits for another connection's lock.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

fn error(code: ErrorCode, message: impl Into<String>) -> SqliteError {
    SqliteError {
        code,
        message: message.into(),
    }
}

fn sql_error(e: rusqlite::Error) -> SqliteError {
    use rusqlite::ErrorCode as C;
    let code = match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked) => ErrorCode::Busy,
        Some(C::ConstraintViolation) => ErrorCode::Constraint,
        Some(C::CannotOpen | C::NotADatabase | C::PermissionDenied) => ErrorCode::CannotOpen,
        _ => ErrorCode::Other,
    };
    error(code, e.to_string())
}

/// Where databases may be opened: the cache root.
pub struct SqliteRoot {
    root: PathBuf,
    max_result_bytes: usize,
}

impl SqliteRoot {
    pub fn new(root: &RootFs) -> SqliteRoot {
        SqliteRoot {
            root: root.path().to_path_buf(),
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        }
    }

    pub fn with_max_result_bytes(mut self, max: usize) -> Self {
        self.max_result_bytes = max;
        self
    }

    /// Open (creating) the database `name` in the root.
    pub fn open(&self, root: &RootFs, name: &str) -> Result<Connection> {
        let plain = !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains(['/', '\\', '\0'])
            && !name.starts_with(':') // `:memory:` and friends
            && !name.starts_with("file:");
        if !plain {
            return Err(error(
                ErrorCode::AccessDenied,
                format!("database name {name:?} is not a plain file name in the cache root"),
            ));
        }
        if let Ok(meta) = root.dir().symlink_metadata(name) {
            if !meta.is_file() {
                return Err(error(
                    ErrorCode::AccessDenied,
                    format!("database {name:?} in the cache root is not a regular file"),
                ));
            }
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
            | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let path = self.root.join(name);
        let conn = rusqlite::Connection::open_with_flags(&path, flags)
            .map_err(|e| error(ErrorCode::CannotOpen, format!("{}: {e}", path.display())))?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(sql_error)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(Connection {
            conn,
            max_result_bytes: self.max_result_bytes,
        })
    }
}

/// One open database.
#[derive(Debug)]
pub struct Connection {
    conn: rusqlite::Connection,
    max_result_bytes: usize,
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

fn from_sql(v: ValueRef<'_>) -> (Value, usize) {
    match v {
        ValueRef::Null => (Value::Null, 8),
        ValueRef::Integer(i) => (Value::Integer(i), 8),
        ValueRef::Real(r) => (Value::Real(r), 8),
        ValueRef::Text(t) => (
            Value::Text(String::from_utf8_lossy(t).into_owned()),
            8 + t.len(),
        ),
        ValueRef::Blob(b) => (Value::Blob(b.to_vec()), 8 + b.len()),
    }
}

impl Connection {
    /// Run one statement (rows it returns are skipped); rows changed.
    pub fn execute(&self, sql: &str, params: Vec<Value>) -> Result<u64> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_error)?;
        let mut rows = stmt
            .query(params_from_iter(params.into_iter().map(to_sql)))
            .map_err(sql_error)?;
        while rows.next().map_err(sql_error)?.is_some() {}
        Ok(self.conn.changes())
    }

    pub fn execute_batch(&self, sql: &str) -> Result<()> {
        self.conn.execute_batch(sql).map_err(sql_error)
    }

    pub fn query(&self, sql: &str, params: Vec<Value>) -> Result<Vec<Vec<Value>>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(sql_error)?;
        let columns = stmt.column_count();
        let mut rows = stmt
            .query(params_from_iter(params.into_iter().map(to_sql)))
            .map_err(sql_error)?;
        let mut result = Vec::new();
        let mut bytes = 0usize;
        while let Some(row) = rows.next().map_err(sql_error)? {
            let mut values = Vec::with_capacity(columns);
            for i in 0..columns {
                let (value, size) = from_sql(row.get_ref(i).map_err(sql_error)?);
                bytes += size;
                values.push(value);
            }
            if bytes > self.max_result_bytes {
                return Err(error(
                    ErrorCode::LimitExceeded,
                    format!("query result exceeds {} bytes", self.max_result_bytes),
                ));
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
}

impl wit::Host for SqliteView<'_> {}

impl wit::HostConnection for SqliteView<'_> {
    fn open(&mut self, name: String) -> wasmtime::Result<Result<Resource<Connection>>> {
        Ok(match self.sqlite.open(self.root, &name) {
            Ok(conn) => Ok(self.table.push(conn)?),
            Err(e) => Err(e),
        })
    }

    fn execute(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64>> {
        Ok(self.table.get(&c)?.execute(&sql, params))
    }

    fn execute_batch(
        &mut self,
        c: Resource<Connection>,
        sql: String,
    ) -> wasmtime::Result<Result<()>> {
        Ok(self.table.get(&c)?.execute_batch(&sql))
    }

    fn query(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Vec<Vec<Value>>>> {
        Ok(self.table.get(&c)?.query(&sql, params))
    }

    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
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
        c.execute_batch("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)")
            .unwrap();
        let row = vec![
            Value::Integer(-7),
            Value::Real(1.5),
            Value::Text("x".into()),
            Value::Blob(vec![1, 2]),
            Value::Null,
        ];
        assert_eq!(
            c.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", row.clone())
                .unwrap(),
            1
        );
        let rows = c.query("SELECT * FROM t", vec![]).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(matches!(rows[0][0], Value::Integer(-7)));
        assert!(matches!(&rows[0][3], Value::Blob(b) if b == &[1, 2]));
        let e = c
            .execute("INSERT INTO nowhere VALUES (1)", vec![])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Other);
        // Rows returned by `execute` are skipped, not an error.
        c.execute("PRAGMA journal_mode=WAL", vec![]).unwrap();
    }

    #[test]
    fn query_results_are_capped() {
        let (_dir, root, sqlite) = setup();
        let sqlite = sqlite.with_max_result_bytes(1000);
        let c = sqlite.open(&root, "t.db").unwrap();
        c.execute_batch("CREATE TABLE t (s TEXT)").unwrap();
        for _ in 0..20 {
            c.execute(
                "INSERT INTO t VALUES (?)",
                vec![Value::Text("y".repeat(100))],
            )
            .unwrap();
        }
        let e = c.query("SELECT s FROM t", vec![]).unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceeded);
    }
}
