//! `image-cache:driver/database`: shared SQL databases the operator
//! configured, opened by name.
//!
//! The guest names a database; the host maps the name to a configured
//! backend. A name that is not configured is `access-denied`, and the guest
//! never learns a host name, a connection string or a password.
//!
//! - [`postgres`]: the PostgreSQL backend (pool, deadlines, typed
//!   parameters, role checks, scrubbed errors);
//! - [`policy`]: what a driver's SQL may say, checked before it is sent.

pub mod policy;
pub mod postgres;
pub mod tls;

pub use postgres::{PostgresBackend, PostgresSettings};

/// The name the centralized driver opens its database by (Glance's
/// central database).
pub const CENTRALIZED_DATABASE: &str = "glance";

/// Default cap on the bytes of one query's result.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 64 * 1024 * 1024;

use std::collections::HashMap;

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};

use crate::bindings::database::{self as wit, DatabaseError, ErrorCode, Value};
use crate::runtime::Deadline;

pub type Result<T> = std::result::Result<T, DatabaseError>;

fn error(code: ErrorCode, message: impl Into<String>) -> DatabaseError {
    DatabaseError {
        code,
        message: message.into(),
    }
}

/// A database backend the operator configured under a name.
pub trait Backend: Send + Sync {
    /// A connection for one guest resource, ready by `deadline`.
    fn connect(&self, deadline: Deadline) -> Result<Box<dyn BackendConnection>>;
}

/// One connection of a backend.
pub trait BackendConnection: Send {
    /// Whether a transaction the driver began is still open.
    fn in_transaction(&self) -> bool;
    /// The driver call that used this connection ended: a transaction
    /// still open is rolled back (by `deadline`), so no lock or snapshot a
    /// driver took outlives its call.
    fn end_of_call(&mut self, deadline: Deadline);
    fn execute(&mut self, sql: &str, params: Vec<Value>, deadline: Deadline) -> Result<u64>;
    fn query(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
    ) -> Result<Vec<Vec<Value>>>;
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

    /// A root with the PostgreSQL database `settings` known to drivers as
    /// `name` (the centralized driver uses `glance`).
    pub fn with_postgres(
        self,
        name: &str,
        settings: &PostgresSettings,
    ) -> std::result::Result<DatabaseRoot, String> {
        let backend = PostgresBackend::new(name, settings)?;
        Ok(self.with_backend(name, Box::new(backend)))
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
    wit::add_to_linker::<T, HasDatabase>(linker, view)
}
