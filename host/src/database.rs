//! `image-cache:driver/database`: shared SQL databases the operator
//! configured, opened by name.
//!
//! The guest names a database; the host maps the name to a configured
//! backend. A name that is not configured is `access-denied`, and the guest
//! never learns a host name, a connection string or a password.
//!
//! - [`postgres`]: the PostgreSQL backend (pool, deadlines, typed
//!   parameters, role checks, scrubbed errors);
//! - [`mysql`]: the same for MySQL and MariaDB;
//! - `common`: what both share (the runtime, deadlines, scrubbing);
//! - [`policy`]: what a driver's SQL may say, checked before it is sent.

#[cfg(any(feature = "postgres", feature = "mysql"))]
mod common;
#[cfg(feature = "mysql")]
pub mod mysql;
pub mod policy;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod schema;
#[cfg(feature = "postgres")]
pub mod tls;

#[cfg(feature = "mysql")]
pub use mysql::MysqlBackend;
#[cfg(feature = "postgres")]
pub use postgres::PostgresBackend;

/// The name the centralized driver opens its database by (Glance's
/// central database).
pub const CENTRALIZED_DATABASE: &str = "glance";

/// Connections one process holds to one database by default: enough for a
/// server's concurrent calls (each holds one only for a statement or a
/// transaction), few enough for tens of nodes.
pub const DEFAULT_POOL_SIZE: usize = 4;

use std::collections::HashMap;
use std::time::Duration;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

pub use crate::bindings::database::Dialect;
use crate::bindings::database::{self as wit, DatabaseError, ErrorCode, Value};
use crate::error::Error;
use crate::limits::{DEFAULT_MAX_RESULT_BYTES, Deadline};

pub type Result<T> = std::result::Result<T, DatabaseError>;

fn error(code: ErrorCode, message: impl Into<String>) -> DatabaseError {
    DatabaseError {
        code,
        message: message.into(),
    }
}

/// What the operator configured for one database (PostgreSQL or MySQL).
#[derive(Clone)]
pub struct DatabaseSettings {
    /// A SQLAlchemy URL as Glance's `[database] connection` has it
    /// (`postgresql+psycopg2://...`, `mysql+pymysql://...`), a libpq one
    /// (`postgresql://user:password@host:port/db`, or `host=... dbname=...`)
    /// or a MySQL one (`mysql://`, `mariadb://`).
    pub url: String,
    /// Most connections the pool holds (what all drivers on one cache can
    /// hold together).
    pub pool_size: usize,
    /// Accept a role with more than a cache driver needs (a superuser,
    /// Glance's own role, an owner of tables): for tests and migrations
    /// only; a warning is logged for every such connection pool.
    pub allow_privileged_role: bool,
    /// Most bytes one query result may hold.
    pub max_result_bytes: usize,
    /// The server-side bound of one statement, lock wait and idle
    /// transaction (the driver call's deadline bounds the host's wait).
    pub statement_timeout: Duration,
    /// How long opening a connection may take at most.
    pub connect_timeout: Duration,
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseSettings")
            .field("url", &"(not shown)")
            .field("pool_size", &self.pool_size)
            .finish_non_exhaustive()
    }
}

impl DatabaseSettings {
    pub fn new(url: impl Into<String>) -> DatabaseSettings {
        DatabaseSettings {
            url: url.into(),
            pool_size: DEFAULT_POOL_SIZE,
            allow_privileged_role: false,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            statement_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// The SQL a configured URL's server speaks, from its scheme (a libpq
/// `key=value` string is PostgreSQL). A URL of no such server is an
/// [`Error::BadConfiguration`]; errors never contain the URL.
pub fn dialect_of_url(url: &str) -> std::result::Result<Dialect, Error> {
    let url = url.trim();
    let Some((scheme, _)) = url.split_once("://") else {
        if url.contains('=') {
            return Ok(Dialect::Postgresql);
        }
        return Err(Error::BadConfiguration(
            "the database connection is not a URL (postgresql://user:password@host/db or \
             mysql+pymysql://user:password@host/db)"
                .to_string(),
        ));
    };
    match scheme.split('+').next().unwrap_or("") {
        "postgresql" | "postgres" => Ok(Dialect::Postgresql),
        "mysql" | "mariadb" => Ok(Dialect::Mysql),
        other => Err(Error::BadConfiguration(format!(
            "the database connection is a {other:?} URL; the centralized driver needs \
             PostgreSQL (postgresql://...), MySQL or MariaDB (mysql+pymysql://...)"
        ))),
    }
}

/// Why a URL of `dialect` cannot be used by this build.
#[cfg(not(all(feature = "postgres", feature = "mysql")))]
fn not_built(dialect: Dialect) -> Error {
    let (what, feature) = match dialect {
        Dialect::Postgresql => ("PostgreSQL", "postgres"),
        Dialect::Mysql => ("MySQL", "mysql"),
    };
    Error::BadConfiguration(format!(
        "this build of image-cache has no {what} backend (the library's `{feature}` feature)"
    ))
}

/// The statements an administrator runs (in `database`, as the owner of
/// Glance's tables) so the cache's role or account `role` has exactly what
/// a driver needs, for a server speaking `dialect`.
pub fn grant_statements(dialect: Dialect, role: &str, database: &str) -> Vec<String> {
    match dialect {
        Dialect::Postgresql => schema::postgres::grant_statements(role, database),
        Dialect::Mysql => schema::mysql::grant_statements(role, database),
    }
}

/// Create Glance's two cache tables, as its migrations make them, in the
/// database at `url` (`image-cache db init`, for a database of the cache's
/// own; never needed where Glance's migrations ran). A URL that cannot be
/// used is an [`Error::BadConfiguration`], a server that refuses or cannot
/// be reached an [`Error::Database`]. Errors never show the URL.
pub fn init_schema(url: &str, timeout: Duration) -> std::result::Result<(), Error> {
    match dialect_of_url(url)? {
        #[cfg(feature = "postgres")]
        Dialect::Postgresql => postgres::init_schema(url, timeout),
        #[cfg(feature = "mysql")]
        Dialect::Mysql => mysql::init_schema(url, timeout),
        #[cfg(not(all(feature = "postgres", feature = "mysql")))]
        other => {
            let _ = timeout;
            Err(not_built(other))
        }
    }
}

/// The backend of this build for a server speaking `dialect`.
fn backend(
    dialect: Dialect,
    name: &str,
    settings: &DatabaseSettings,
) -> std::result::Result<Box<dyn Backend>, Error> {
    match dialect {
        #[cfg(feature = "postgres")]
        Dialect::Postgresql => Ok(Box::new(PostgresBackend::new(name, settings)?)),
        #[cfg(feature = "mysql")]
        Dialect::Mysql => Ok(Box::new(MysqlBackend::new(name, settings)?)),
        #[cfg(not(all(feature = "postgres", feature = "mysql")))]
        other => {
            let _ = (name, settings);
            Err(not_built(other))
        }
    }
}

/// A database backend the operator configured under a name.
pub trait Backend: Send + Sync {
    /// A connection for one guest resource, ready by `deadline`.
    fn connect(&self, deadline: Deadline) -> Result<Box<dyn BackendConnection>>;
}

/// One connection of a backend.
pub trait BackendConnection: Send {
    /// The SQL its server speaks.
    fn dialect(&self) -> Dialect;
    /// Whether a transaction the driver began is still open.
    fn in_transaction(&self) -> bool;
    /// The driver call that used this connection ended: a transaction
    /// still open is rolled back (by `deadline`), so no lock or snapshot a
    /// driver took outlives its call.
    fn end_of_call(&mut self, deadline: Deadline);
    /// Run one statement by `deadline`, wanting its count or its rows.
    fn call(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
        want: Want,
    ) -> Result<Outcome>;

    fn execute(&mut self, sql: &str, params: Vec<Value>, deadline: Deadline) -> Result<u64> {
        match self.call(sql, params, deadline, Want::Count)? {
            Outcome::Count(n) => Ok(n),
            Outcome::Rows(rows) => Ok(rows.len() as u64),
        }
    }

    fn query(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
    ) -> Result<Vec<Vec<Value>>> {
        match self.call(sql, params, deadline, Want::Rows)? {
            Outcome::Rows(rows) => Ok(rows),
            Outcome::Count(_) => Ok(Vec::new()),
        }
    }
}

/// What a statement's caller wants back.
pub enum Want {
    /// The rows it changed.
    Count,
    /// The rows it returned.
    Rows,
}

/// What a statement gave back.
pub enum Outcome {
    Count(u64),
    Rows(Vec<Vec<Value>>),
}

/// The databases a driver may open, by name.
#[derive(Default)]
pub struct DatabaseRoot {
    backends: HashMap<String, Box<dyn Backend>>,
}

impl std::fmt::Debug for DatabaseRoot {
    // Names only: what they map to stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DatabaseRoot")
            .field("names", &self.names())
            .finish()
    }
}

impl DatabaseRoot {
    pub fn new() -> DatabaseRoot {
        DatabaseRoot::default()
    }

    pub fn with_backend(mut self, name: &str, backend: Box<dyn Backend>) -> DatabaseRoot {
        self.backends.insert(name.to_string(), backend);
        self
    }

    /// A root with the database `settings` describe (PostgreSQL, MySQL or
    /// MariaDB, by the URL's scheme) known to drivers as `name` (the
    /// centralized driver uses `glance`). Settings that cannot be used
    /// (the URL, its TLS parameters, a backend this build lacks) are an
    /// [`Error::BadConfiguration`]; nothing is connected yet.
    pub fn with_database(
        self,
        name: &str,
        settings: &DatabaseSettings,
    ) -> std::result::Result<DatabaseRoot, Error> {
        let backend = backend(dialect_of_url(&settings.url)?, name, settings)?;
        Ok(self.with_backend(name, backend))
    }

    /// The names drivers may open.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.backends.keys().cloned().collect();
        names.sort();
        names
    }

    pub fn open(&self, name: &str, deadline: Deadline) -> Result<Connection> {
        match self.backends.get(name) {
            Some(backend) => Ok(Connection {
                inner: backend.connect(deadline)?,
            }),
            None => Err(error(
                ErrorCode::AccessDenied,
                format!(
                    "no database named {:?} is configured for this driver (the operator sets it \
                     with image_cache_database_url, IMAGE_CACHE_DATABASE_URL, --database-url \
                     or Glance's [database] connection)",
                    name.chars().take(64).collect::<String>()
                ),
            )),
        }
    }
}

/// One open database connection (a guest resource).
pub struct Connection {
    inner: Box<dyn BackendConnection>,
}

impl Connection {
    /// Run one statement by `deadline`; rows changed.
    pub fn execute(&mut self, sql: &str, params: Vec<Value>, deadline: Deadline) -> Result<u64> {
        self.inner.execute(sql, params, deadline)
    }

    /// Run one query by `deadline`; its rows.
    pub fn query(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
    ) -> Result<Vec<Vec<Value>>> {
        self.inner.query(sql, params, deadline)
    }
}

/// What the `database` host functions borrow from a store.
pub struct DatabaseView<'a> {
    pub databases: &'a DatabaseRoot,
    pub table: &'a mut ResourceTable,
    pub deadline: Deadline,
    /// Connections the instance holds, against `max_connections`.
    pub connections: &'a mut usize,
    pub max_connections: usize,
    /// Connections that began a transaction in the current call.
    pub transactions: &'a mut OpenTransactions,
}

/// Connections (by resource) that began a transaction during the current
/// driver call; when the call returns, each still open is rolled back.
#[derive(Default)]
pub struct OpenTransactions {
    reps: Vec<u32>,
}

impl OpenTransactions {
    fn note(&mut self, c: &Resource<Connection>, conn: &Connection) {
        if conn.inner.in_transaction() && !self.reps.contains(&c.rep()) {
            self.reps.push(c.rep());
        }
    }

    /// The driver call ended: roll back what it left open (a short grace
    /// for the server to answer; otherwise the connection is closed).
    pub fn end_call(&mut self, table: &mut ResourceTable) {
        for rep in self.reps.drain(..) {
            let resource = Resource::<Connection>::new_borrow(rep);
            if let Ok(conn) = table.get_mut(&resource) {
                let grace = Deadline(std::time::Instant::now() + std::time::Duration::from_secs(2));
                conn.inner.end_of_call(grace);
            }
        }
    }
}

impl wit::Host for DatabaseView<'_> {}

impl wit::HostConnection for DatabaseView<'_> {
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
        Ok(match self.databases.open(&name, self.deadline) {
            Ok(conn) => {
                let resource = self.table.push(conn)?;
                *self.connections += 1;
                Ok(resource)
            }
            Err(e) => Err(e),
        })
    }

    fn dialect(&mut self, c: Resource<Connection>) -> wasmtime::Result<Dialect> {
        Ok(self.table.get(&c)?.inner.dialect())
    }

    fn execute(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<u64>> {
        let deadline = self.deadline;
        let conn = self.table.get_mut(&c)?;
        let result = conn.inner.execute(&sql, params, deadline);
        self.transactions.note(&c, conn);
        Ok(result)
    }

    fn query(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<Value>,
    ) -> wasmtime::Result<Result<Vec<Vec<Value>>>> {
        let deadline = self.deadline;
        let conn = self.table.get_mut(&c)?;
        let result = conn.inner.query(&sql, params, deadline);
        self.transactions.note(&c, conn);
        Ok(result)
    }

    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        self.table.delete(c)?;
        *self.connections = self.connections.saturating_sub(1);
        Ok(())
    }
}

struct HasDatabase;

impl HasData for HasDatabase {
    type Data<'a> = DatabaseView<'a>;
}

/// Add the `database` interface to a linker; `view` borrows it from the store.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> DatabaseView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasDatabase>(linker, view)?;
    // Contract 0.2.0's names, served by the same functions.
    crate::compat::v0_2::link_database(linker, view)
}
