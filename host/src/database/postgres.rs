//! The `database` interface on PostgreSQL.
//!
//! tokio-postgres with a deadpool pool, driven by a small tokio runtime of
//! the host's own (one worker thread for the whole process): the async
//! client lets every call be bounded by the driver call's deadline from the
//! outside (`tokio::time::timeout` around pool checkout, connect, prepare
//! and the rows) and a query still running at the deadline is cancelled on
//! the server, while the driver calls themselves stay blocking. A sync
//! client (`postgres` + `r2d2`) could only bound a call by socket timeouts
//! and the server's own `statement_timeout`, which do not cover a server
//! that stops answering.
//!
//! What the host enforces, whatever the driver's SQL says:
//! - the driver names a database; the URL, host, user and password stay
//!   here and are scrubbed from every message the driver (or a user) sees;
//! - the database fences the driver by its own privileges: a role with
//!   anything beyond `SELECT, INSERT, UPDATE, DELETE` on Glance's two cache
//!   tables (and `USAGE` on their sequences) is refused at connect, with
//!   the SQL that makes a dedicated role ([`grant_statements`]): no
//!   superuser, no role attributes, no `pg_*` role that reads files, runs
//!   programs, signals backends or reads all data, no object owned, no
//!   `CREATE` in any schema or the database, no other table privilege. What
//!   the role cannot do, no SQL a driver sends can do, however it is
//!   written; the statement check below stays as a second layer;
//! - each statement passes [`super::policy::check`] (one statement, an
//!   allow-list of statement kinds, no catalog, file, large-object,
//!   `dblink`, settings or address functions);
//! - parameters are converted to the types the server inferred for them,
//!   and a value that does not fit is refused before anything is sent;
//! - results are capped in bytes; the pool's size caps the connections;
//! - every session has `statement_timeout`, `lock_timeout` and
//!   `idle_in_transaction_session_timeout` set at connect time, so the
//!   server ends what the host stopped waiting for, and a transaction left
//!   open by a driver does not hold locks for long.

use std::pin::pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use futures_util::StreamExt;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Config, Row};

use super::common::{
    RoleCheck, Secrets, ends_transaction, judge_role, run, runtime, unix_seconds, unix_time,
    value_size,
};
pub use super::schema::postgres::{CACHE_SEQUENCES, GLANCE_CACHE_SCHEMA, grant_statements};
use super::schema::{CACHE_TABLES, TABLE_PRIVILEGES};
use super::tls::TlsError;
use super::{Backend, BackendConnection, DatabaseSettings, Outcome, Result, Want, error, policy};
use crate::bindings::database::{DatabaseError, ErrorCode, Value};
use crate::error::Error;
use crate::limits::Deadline;

/// Prepared statements one connection keeps before its cache is emptied
/// (a driver sending endless distinct SQL must not grow it forever).
const MAX_CACHED_STATEMENTS: usize = 256;

/// Predefined roles that reach beyond the cache tables.
const POWERFUL_ROLES: [&str; 14] = [
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
    "pg_read_all_data",
    "pg_write_all_data",
    "pg_read_all_settings",
    "pg_read_all_stats",
    "pg_monitor",
    "pg_checkpoint",
    "pg_create_subscription",
    "pg_maintain",
    "pg_use_reserved_connections",
    "pg_signal_autovacuum_worker",
];

/// A SQLAlchemy database URL (`postgresql+psycopg2://...`) as a libpq one;
/// a libpq URL as it is. Anything else is an [`Error::BadConfiguration`];
/// errors never contain the URL.
pub fn libpq_url(url: &str) -> std::result::Result<String, Error> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        // libpq's key=value form (`host=/run/postgresql dbname=glance`).
        if url.contains('=') {
            return Ok(url.to_string());
        }
        return Err(Error::BadConfiguration(
            "the database connection is not a URL (postgresql://user:password@host/db)".to_string(),
        ));
    };
    let dialect = scheme.split('+').next().unwrap_or("");
    match dialect {
        "postgresql" | "postgres" => Ok(format!("postgresql://{rest}")),
        other => Err(Error::BadConfiguration(format!(
            "the database connection is a {other:?} URL; the centralized driver needs PostgreSQL (postgresql://...)"
        ))),
    }
}

struct Shared {
    /// The name drivers use.
    name: String,
    pool: Pool,
    /// The TLS connector (also for cancel requests).
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    /// Strings never shown to a driver or user: the URL, password, hosts.
    secrets: Secrets,
    max_result_bytes: usize,
    allow_privileged_role: bool,
    role: RoleCheck,
}

/// A PostgreSQL database a driver may open by name.
pub struct PostgresBackend {
    shared: Arc<Shared>,
}

impl PostgresBackend {
    /// A backend for `settings`, known to drivers as `name`. Nothing is
    /// connected until a driver opens it. Settings that cannot be used are
    /// an [`Error::BadConfiguration`] naming the database, never the URL.
    pub fn new(name: &str, settings: &DatabaseSettings) -> std::result::Result<Self, Error> {
        let url = libpq_url(&settings.url)?;
        let bad_url = |e: TlsError| {
            Error::BadConfiguration(format!("the connection URL of database {name:?}: {e}"))
        };
        let (url, tls) = super::tls::split(&url).map_err(bad_url)?;
        let connector = tls.connector().map_err(bad_url)?;
        let mut config = Config::from_str(&url).map_err(|_| {
            Error::BadConfiguration(format!(
                "the connection URL of database {name:?} is not a valid PostgreSQL URL"
            ))
        })?;
        config.ssl_mode(tls.ssl_mode());
        let mut secrets = vec![settings.url.trim().to_string(), url.clone()];
        if let Some(password) = config.get_password() {
            secrets.push(String::from_utf8_lossy(password).into_owned());
        }
        for host in config.get_hosts() {
            match host {
                tokio_postgres::config::Host::Tcp(h) => secrets.push(h.clone()),
                tokio_postgres::config::Host::Unix(p) => secrets.push(p.display().to_string()),
            }
        }
        let ms = settings.statement_timeout.as_millis().max(1);
        let options = format!(
            "{} -c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms}",
            config.get_options().unwrap_or("")
        );
        config
            .options(options.trim())
            .application_name("image-cache")
            .connect_timeout(settings.connect_timeout)
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(30));
        let manager = Manager::from_config(
            config,
            connector.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .build()
            .map_err(|e| {
                Error::BadConfiguration(format!(
                    "database {name:?}: cannot make its connection pool: {e}"
                ))
            })?;
        Ok(PostgresBackend {
            shared: Arc::new(Shared {
                name: name.to_string(),
                pool,
                connector,
                secrets: Secrets::new(secrets),
                max_result_bytes: settings.max_result_bytes,
                allow_privileged_role: settings.allow_privileged_role,
                role: RoleCheck::default(),
            }),
        })
    }

    /// Connections the pool holds now, and at most.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.shared.pool.status();
        (s.size, s.max_size)
    }
}

impl Shared {
    /// `message` without any secret.
    fn scrub(&self, message: &str) -> String {
        self.secrets.scrub(message)
    }

    /// The role check's refusal: made of the role's grants and our own
    /// remedy, never of a secret, so not scrubbed (scrubbing a short host
    /// name would mangle the remedy's commands).
    fn refusal(&self, why: &str) -> DatabaseError {
        error(
            ErrorCode::AccessDenied,
            format!("database {:?}: {why}", self.name),
        )
    }

    fn error(&self, code: ErrorCode, message: &str) -> DatabaseError {
        error(
            code,
            format!("database {:?}: {}", self.name, self.scrub(message)),
        )
    }

    /// A client error in the driver's terms, scrubbed.
    fn client_error(&self, e: &tokio_postgres::Error) -> DatabaseError {
        if let Some(db) = e.as_db_error() {
            let state = db.code().code();
            let code = match state {
                s if s.starts_with("23") => ErrorCode::Constraint,
                "57014" | "55P03" => ErrorCode::TimedOut,
                "42501" => ErrorCode::AccessDenied,
                s if s.starts_with("08")
                    || s.starts_with("57P")
                    || s.starts_with("28")
                    || s == "53300"
                    || s == "3D000" =>
                {
                    ErrorCode::Unavailable
                }
                s if s.starts_with("54") => ErrorCode::LimitExceeded,
                _ => ErrorCode::Other,
            };
            return self.error(
                code,
                &format!("{} ({state}): {}", db.severity(), db.message()),
            );
        }
        // No answer from the server: refused, reset, closed, timed out.
        self.error(ErrorCode::Unavailable, &e.to_string())
    }

    /// Check out a connection, checking the role once per backend.
    async fn checkout(self: Arc<Self>) -> Result<Object> {
        let object = self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => self.client_error(&e),
            other => self.error(ErrorCode::Unavailable, &other.to_string()),
        })?;
        match self.role.outcome() {
            Some(Ok(())) => Ok(object),
            Some(Err(why)) => Err(self.refusal(&why)),
            None => {
                self.check_role(&object).await?;
                Ok(object)
            }
        }
    }

    /// Everything the connected role may do beyond a cache driver's needs,
    /// read from the catalogs; empty when it is fenced as it should be.
    async fn privilege_problems(&self, client: &Object) -> Result<Vec<String>> {
        let q = |sql: &'static str| async move {
            client
                .query(sql, &[])
                .await
                .map_err(|e| self.client_error(&e))
        };
        let mut problems = Vec::new();
        let attributes = q(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, \
             rolbypassrls FROM pg_roles WHERE rolname = current_user",
        )
        .await?;
        if let Some(row) = attributes.first() {
            for (i, what) in [
                "is a superuser",
                "may create roles (CREATEROLE)",
                "may create databases (CREATEDB)",
                "may replicate (REPLICATION)",
                "bypasses row security (BYPASSRLS)",
            ]
            .into_iter()
            .enumerate()
            {
                if row.try_get::<_, bool>(i).unwrap_or(true) {
                    problems.push(what.to_string());
                }
            }
            // A superuser may do everything; the rest would only be noise.
            if row.try_get::<_, bool>(0).unwrap_or(true) {
                return Ok(problems);
            }
        }
        let powerful = client
            .query(
                "SELECT rolname::text FROM pg_roles WHERE rolname = ANY($1) \
                 AND pg_has_role(current_user, oid, 'MEMBER') ORDER BY rolname",
                &[&POWERFUL_ROLES.as_slice()],
            )
            .await
            .map_err(|e| self.client_error(&e))?;
        if !powerful.is_empty() {
            problems.push(format!("is a member of {}", first_texts(&powerful)));
        }
        // A role it may become (SET ROLE) with powers of its own.
        let mighty = q("SELECT r.rolname::text FROM pg_roles r \
             WHERE pg_has_role(current_user, r.oid, 'MEMBER') AND r.rolname <> current_user \
               AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication \
                    OR r.rolbypassrls) ORDER BY 1 LIMIT 6")
        .await?;
        if !mighty.is_empty() {
            problems.push(format!(
                "is a member of a role with role attributes ({})",
                first_texts(&mighty)
            ));
        }
        let owned = q("SELECT kind || ' ' || name FROM ( \
               SELECT 'database' AS kind, datname::text AS name, datdba AS owner \
                 FROM pg_database WHERE datname = current_database() \
               UNION ALL SELECT 'schema', nspname::text, nspowner FROM pg_namespace \
               UNION ALL SELECT 'relation', c.relname::text, c.relowner FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
               UNION ALL SELECT 'function', p.proname::text, p.proowner FROM pg_proc p \
                 JOIN pg_namespace n ON n.oid = p.pronamespace \
                 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') \
             ) o WHERE pg_has_role(current_user, owner, 'MEMBER') ORDER BY 1 LIMIT 6")
        .await?;
        if !owned.is_empty() {
            problems.push(format!("owns {}", first_texts(&owned)));
        }
        let creates = q("SELECT nspname::text FROM pg_namespace \
             WHERE has_schema_privilege(current_user, oid, 'CREATE') ORDER BY 1 LIMIT 6")
        .await?;
        if !creates.is_empty() {
            problems.push(format!(
                "may create objects in schema {}",
                first_texts(&creates)
            ));
        }
        let db_create = q("SELECT has_database_privilege(current_database(), 'CREATE')").await?;
        if db_create
            .first()
            .is_some_and(|r| r.try_get::<_, bool>(0).unwrap_or(true))
        {
            problems.push("may create schemas in the database (CREATE)".to_string());
        }
        // Every table privilege on every relation, against what a driver
        // needs on the two cache tables.
        let grants = q(
            "SELECT c.relname::text, c.relkind::text, p.priv FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE', \
               'REFERENCES','TRIGGER']) AS p(priv) \
             WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND n.nspname NOT LIKE 'pg\\_%' \
               AND (has_table_privilege(current_user, c.oid, p.priv) \
                    OR (p.priv IN ('SELECT','INSERT','UPDATE','REFERENCES') \
                        AND has_any_column_privilege(current_user, c.oid, p.priv))) \
               AND NOT has_table_privilege('public', c.oid, p.priv) \
             UNION ALL SELECT c.relname::text, 'S', p.priv FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN unnest(ARRAY['USAGE','SELECT','UPDATE']) AS p(priv) \
             WHERE c.relkind = 'S' \
               AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
               AND has_sequence_privilege(current_user, c.oid, p.priv) \
             ORDER BY 1, 3",
        )
        .await?;
        let mut extra = Vec::new();
        let mut held = Vec::new();
        for row in &grants {
            let (Ok(table), Ok(kind), Ok(privilege)) = (
                row.try_get::<_, String>(0),
                row.try_get::<_, String>(1),
                row.try_get::<_, String>(2),
            ) else {
                continue;
            };
            let needed = if kind == "S" {
                CACHE_SEQUENCES.contains(&table.as_str()) && privilege == "USAGE"
            } else {
                CACHE_TABLES.contains(&table.as_str())
                    && TABLE_PRIVILEGES.contains(&privilege.as_str())
            };
            if needed {
                held.push((table, privilege));
            } else {
                extra.push(format!("{privilege} on {table}"));
            }
        }
        if !extra.is_empty() {
            let shown: Vec<&str> = extra.iter().take(8).map(String::as_str).collect();
            problems.push(format!(
                "holds {}{}",
                shown.join(", "),
                if extra.len() > shown.len() {
                    ", ..."
                } else {
                    ""
                }
            ));
        }
        let mut missing = Vec::new();
        for table in CACHE_TABLES {
            for privilege in TABLE_PRIVILEGES {
                if !held.iter().any(|(t, p)| t == table && p == privilege) {
                    missing.push(format!("{privilege} on {table}"));
                }
            }
        }
        if !missing.is_empty() && problems.is_empty() {
            // Too little is not a danger; it fails at the first statement,
            // but say so now, with the same remedy.
            log::warn!(
                "database {:?}: the role lacks {}",
                self.name,
                missing.join(", ")
            );
        }
        Ok(problems)
    }

    async fn check_role(&self, client: &Object) -> Result<()> {
        let problems = self.privilege_problems(client).await?;
        if problems.is_empty() || self.allow_privileged_role {
            return judge_role(&self.role, &self.name, &problems, true, String::new)
                .map_err(|why| self.refusal(&why));
        }
        let database = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .ok()
            .and_then(|r| r.try_get::<_, String>(0).ok())
            .unwrap_or_else(|| "glance".to_string());
        judge_role(&self.role, &self.name, &problems, false, || {
            format!(
                "a cache driver needs only SELECT, INSERT, UPDATE, DELETE on {} and USAGE on \
                 their sequences; give the cache a dedicated role, as `image-cache db grants` \
                 prints it: {}",
                CACHE_TABLES.join(" and "),
                grant_statements("image_cache", &database).join(" ")
            )
        })
        .map_err(|why| self.refusal(&why))
    }
}

/// The first column of each row, as text, joined by commas.
fn first_texts(rows: &[Row]) -> String {
    rows.iter()
        .filter_map(|r| r.try_get::<_, String>(0).ok())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Create Glance's two cache tables ([`GLANCE_CACHE_SCHEMA`]) in the
/// database at `url`, for a database of the cache's own (`image-cache db
/// init`); never needed where Glance's migrations ran. The role must be
/// allowed to create tables there (an administrator's). A URL that cannot
/// be used is an [`Error::BadConfiguration`], a server that refuses or
/// cannot be reached an [`Error::Database`]. Errors never show the URL.
pub fn init_schema(url: &str, timeout: Duration) -> std::result::Result<(), Error> {
    let bad = |e: TlsError| Error::BadConfiguration(e.to_string());
    let url = libpq_url(url)?;
    let (url, tls) = super::tls::split(&url).map_err(bad)?;
    let connector = tls.connector().map_err(bad)?;
    let mut config = Config::from_str(&url).map_err(|_| {
        Error::BadConfiguration("the database connection is not a valid PostgreSQL URL".to_string())
    })?;
    config.ssl_mode(tls.ssl_mode());
    let work = async move {
        let (client, connection) = config.connect(connector).await?;
        tokio::spawn(connection);
        // One transaction: both tables or neither.
        client
            .batch_execute(&format!("BEGIN; {GLANCE_CACHE_SCHEMA} COMMIT;"))
            .await
    };
    match run(Deadline(std::time::Instant::now() + timeout), work) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Database(match e.as_db_error() {
            Some(db) => format!("{} ({}): {}", db.severity(), db.code().code(), db.message()),
            None => "cannot reach the database".to_string(),
        })),
        Err(e) => Err(Error::Database(e.message)),
    }
}

impl Backend for PostgresBackend {
    fn connect(&self, deadline: Deadline) -> Result<Box<dyn BackendConnection>> {
        let shared = self.shared.clone();
        let object = run(deadline, shared.clone().checkout())??;
        Ok(Box::new(PostgresConnection {
            shared,
            held: Some(Held {
                object: Some(object),
                healthy: true,
            }),
            in_transaction: false,
        }))
    }
}

/// A pooled connection: back to the pool when dropped healthy, out of it
/// otherwise (a call stopped half-way, a lost server, an open transaction).
struct Held {
    object: Option<Object>,
    healthy: bool,
}

impl Drop for Held {
    fn drop(&mut self) {
        // A healthy connection goes back to the pool when `object` drops;
        // a broken one is taken out of it first.
        if let Some(object) = self.object.take()
            && (!self.healthy || object.is_closed())
        {
            drop(Object::take(object));
        }
    }
}

/// One connection a driver opened.
struct PostgresConnection {
    shared: Arc<Shared>,
    /// `None` once a call lost it.
    held: Option<Held>,
    /// A `BEGIN` without its `COMMIT`/`ROLLBACK` yet: the connection is not
    /// given back to the pool like this (closing it rolls back).
    in_transaction: bool,
}

impl Drop for PostgresConnection {
    fn drop(&mut self) {
        if let Some(held) = self.held.as_mut()
            && self.in_transaction
        {
            held.healthy = false;
        }
    }
}

impl PostgresConnection {
    fn statement_call(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
        want: Want,
    ) -> Result<Outcome> {
        policy::check(super::Dialect::Postgresql, sql)
            .map_err(|why| self.shared.error(ErrorCode::AccessDenied, &why.to_string()))?;
        let Some(mut held) = self.held.take() else {
            return Err(self.shared.error(
                ErrorCode::Unavailable,
                "this connection was lost; open a new one",
            ));
        };
        let shared = self.shared.clone();
        let sql_owned = sql.to_string();
        let cancel = held.object.as_ref().map(|o| o.cancel_token());
        // Until the work says otherwise, a connection stopped half-way is
        // not given back.
        held.healthy = false;
        let outcome = run(deadline, async move {
            let result = statement(&shared, &held, &sql_owned, params, want).await;
            held.healthy = held.object.as_ref().is_some_and(|o| !o.is_closed());
            (held, result)
        });
        match outcome {
            Ok((held, result)) => {
                if held.healthy {
                    self.held = Some(held);
                }
                if result.is_ok() {
                    match policy::first_word(sql).as_deref() {
                        Some("begin" | "start") => self.in_transaction = true,
                        // Only a plain end of the transaction clears it:
                        // `COMMIT AND CHAIN` or `ROLLBACK TO s` leave one
                        // open, and so does anything not recognised.
                        Some(_) if ends_transaction(sql) => self.in_transaction = false,
                        _ => {}
                    }
                }
                result
            }
            Err(e) => {
                // Stopped at the deadline: the server stops too.
                if let Some(token) = cancel {
                    let connector = self.shared.connector.clone();
                    runtime().spawn(async move {
                        let _ = tokio::time::timeout(
                            Duration::from_secs(5),
                            token.cancel_query(connector),
                        )
                        .await;
                    });
                }
                Err(e)
            }
        }
    }
}

async fn statement(
    shared: &Shared,
    held: &Held,
    sql: &str,
    params: Vec<Value>,
    want: Want,
) -> Result<Outcome> {
    let Some(client) = held.object.as_ref() else {
        return Err(shared.error(ErrorCode::Unavailable, "no connection"));
    };
    if client.statement_cache.size() >= MAX_CACHED_STATEMENTS {
        client.statement_cache.clear();
    }
    let stmt = client
        .prepare_cached(sql)
        .await
        .map_err(|e| shared.client_error(&e))?;
    let types = stmt.params();
    if types.len() != params.len() {
        return Err(shared.error(
            ErrorCode::Other,
            &format!(
                "the statement has {} parameters, {} values were given",
                types.len(),
                params.len()
            ),
        ));
    }
    let params = params
        .into_iter()
        .zip(types)
        .enumerate()
        .map(|(i, (v, ty))| {
            Param::convert(v, ty).map_err(|why| {
                shared.error(ErrorCode::Other, &format!("parameter ${}: {why}", i + 1))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let refs = params.iter().map(|p| p as &(dyn ToSql + Sync));
    match want {
        Want::Count => client
            .execute_raw(&stmt, refs)
            .await
            .map(Outcome::Count)
            .map_err(|e| shared.client_error(&e)),
        Want::Rows => {
            let columns: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
            let mut stream = pin!(
                client
                    .query_raw(&stmt, refs)
                    .await
                    .map_err(|e| shared.client_error(&e))?
            );
            let mut rows = Vec::new();
            let mut bytes = 0usize;
            while let Some(row) = stream.next().await {
                let row = row.map_err(|e| shared.client_error(&e))?;
                let mut values = Vec::with_capacity(columns.len());
                for (i, ty) in columns.iter().enumerate() {
                    let value = column(&row, i, ty).map_err(|why| {
                        shared.error(ErrorCode::Other, &format!("column {}: {why}", i + 1))
                    })?;
                    bytes = bytes.saturating_add(value_size(&value));
                    if bytes > shared.max_result_bytes {
                        return Err(shared.error(
                            ErrorCode::LimitExceeded,
                            &format!("query result exceeds {} bytes", shared.max_result_bytes),
                        ));
                    }
                    values.push(value);
                }
                rows.push(values);
            }
            Ok(Outcome::Rows(rows))
        }
    }
}

impl BackendConnection for PostgresConnection {
    fn call(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
        want: Want,
    ) -> Result<Outcome> {
        self.statement_call(sql, params, deadline, want)
    }

    fn dialect(&self) -> super::Dialect {
        super::Dialect::Postgresql
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// The export call ended inside a transaction: roll it back (its locks
    /// go with it); if that fails, the connection is closed, which rolls
    /// back on the server.
    fn end_of_call(&mut self, deadline: Deadline) {
        if !self.in_transaction {
            return;
        }
        if self.execute("ROLLBACK", Vec::new(), deadline).is_err() {
            if let Some(held) = self.held.as_mut() {
                held.healthy = false;
            }
            self.held = None;
        }
        self.in_transaction = false;
    }
}

/// A guest value converted to the type the server inferred for its `$n`.
#[derive(Debug)]
enum Param {
    Null,
    Bool(bool),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Text(String),
    Bytes(Vec<u8>),
    Time(SystemTime),
}

/// Integers a `real` carries exactly.
const EXACT_FLOAT_INT: i64 = 1 << 53;

impl Param {
    fn convert(v: Value, ty: &Type) -> std::result::Result<Param, String> {
        let mismatch = |v: &Value| {
            let given = match v {
                Value::Null => "null",
                Value::Boolean(_) => "a boolean",
                Value::Integer(_) => "an integer",
                Value::Real(_) => "a real",
                Value::Text(_) => "text",
                Value::Blob(_) => "a blob",
            };
            format!("the server expects {ty}, not {given}")
        };
        let out_of_range = |i: i64| format!("{i} does not fit in {ty}");
        let seconds = match v {
            Value::Real(r) => Some(r),
            Value::Integer(i) => Some(i as f64),
            _ => None,
        };
        Ok(match (v, ty) {
            (Value::Null, _) => Param::Null,
            (Value::Boolean(b), &Type::BOOL) => Param::Bool(b),
            (Value::Integer(i), &Type::INT2) => {
                Param::I16(i16::try_from(i).map_err(|_| out_of_range(i))?)
            }
            (Value::Integer(i), &Type::INT4) => {
                Param::I32(i32::try_from(i).map_err(|_| out_of_range(i))?)
            }
            (Value::Integer(i), &Type::INT8) => Param::I64(i),
            (Value::Integer(i), &Type::FLOAT4 | &Type::FLOAT8) if i.abs() <= EXACT_FLOAT_INT => {
                if *ty == Type::FLOAT4 {
                    Param::F32(i as f32)
                } else {
                    Param::F64(i as f64)
                }
            }
            (Value::Real(r), &Type::FLOAT8) => Param::F64(r),
            (Value::Real(r), &Type::FLOAT4) => Param::F32(r as f32),
            (Value::Text(t), &Type::TEXT | &Type::VARCHAR | &Type::BPCHAR | &Type::NAME) => {
                Param::Text(t)
            }
            (Value::Blob(b), &Type::BYTEA) => Param::Bytes(b),
            (Value::Real(_) | Value::Integer(_), &Type::TIMESTAMP | &Type::TIMESTAMPTZ) => {
                let seconds = seconds.unwrap_or(f64::NAN);
                Param::Time(unix_time(seconds).ok_or_else(|| {
                    format!("{seconds} is not a time (Unix seconds) the server can store")
                })?)
            }
            (v, _) => return Err(mismatch(&v)),
        })
    }
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Null => Ok(IsNull::Yes),
            Param::Bool(v) => v.to_sql(ty, out),
            Param::I16(v) => v.to_sql(ty, out),
            Param::I32(v) => v.to_sql(ty, out),
            Param::I64(v) => v.to_sql(ty, out),
            Param::F32(v) => v.to_sql(ty, out),
            Param::F64(v) => v.to_sql(ty, out),
            Param::Text(v) => v.to_sql(ty, out),
            Param::Bytes(v) => v.to_sql(ty, out),
            Param::Time(v) => v.to_sql(ty, out),
        }
    }

    // Checked in `Param::convert`, against the server's types.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// A `numeric` as the nearest `f64` (e.g. `EXTRACT(EPOCH FROM t)`).
struct Numeric(f64);

impl<'a> FromSql<'a> for Numeric {
    fn from_sql(
        _: &Type,
        raw: &'a [u8],
    ) -> std::result::Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let word =
            |i: usize| -> std::result::Result<u16, Box<dyn std::error::Error + Sync + Send>> {
                raw.get(i * 2..i * 2 + 2)
                    .map(|b| u16::from_be_bytes([b[0], b[1]]))
                    .ok_or_else(|| "short numeric".into())
            };
        let ndigits = word(0)? as usize;
        let weight = word(1)? as i16 as i32;
        let sign = word(2)?;
        match sign {
            0xC000 => return Ok(Numeric(f64::NAN)),
            0xD000 => return Ok(Numeric(f64::INFINITY)),
            0xF000 => return Ok(Numeric(f64::NEG_INFINITY)),
            _ => {}
        }
        let mut value = 0f64;
        for k in 0..ndigits {
            let digit = word(4 + k)? as f64;
            value += digit * 10_000f64.powi(weight - k as i32);
        }
        Ok(Numeric(if sign == 0x4000 { -value } else { value }))
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::NUMERIC
    }
}

/// Column `i` of `row` as a guest value.
fn column(row: &Row, i: usize, ty: &Type) -> std::result::Result<Value, String> {
    fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> std::result::Result<Option<T>, String> {
        row.try_get::<_, Option<T>>(i).map_err(|e| e.to_string())
    }
    let value = match *ty {
        Type::BOOL => get::<bool>(row, i)?.map(Value::Boolean),
        Type::INT2 => get::<i16>(row, i)?.map(|v| Value::Integer(v.into())),
        Type::INT4 => get::<i32>(row, i)?.map(|v| Value::Integer(v.into())),
        Type::INT8 => get::<i64>(row, i)?.map(Value::Integer),
        Type::OID => get::<u32>(row, i)?.map(|v| Value::Integer(v.into())),
        Type::FLOAT4 => get::<f32>(row, i)?.map(|v| Value::Real(v.into())),
        Type::FLOAT8 => get::<f64>(row, i)?.map(Value::Real),
        Type::NUMERIC => get::<Numeric>(row, i)?.map(|n| Value::Real(n.0)),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
            get::<String>(row, i)?.map(Value::Text)
        }
        Type::BYTEA => get::<Vec<u8>>(row, i)?.map(Value::Blob),
        Type::TIMESTAMP | Type::TIMESTAMPTZ => {
            get::<SystemTime>(row, i)?.map(|t| Value::Real(unix_seconds(t)))
        }
        ref other => {
            return Err(format!(
                "its type {other} is not one this interface carries; cast it (::text, ::float8, ...)"
            ));
        }
    };
    Ok(value.unwrap_or(Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlalchemy_urls_become_libpq_urls() {
        assert_eq!(
            libpq_url("postgresql+psycopg2://glance:s3cret@db.example/glance").unwrap(),
            "postgresql://glance:s3cret@db.example/glance"
        );
        assert_eq!(
            libpq_url(" postgres://u@h/d ").unwrap(),
            "postgresql://u@h/d"
        );
        let e = libpq_url("mysql+pymysql://glance:s3cret@db/glance").unwrap_err();
        assert!(matches!(e, Error::BadConfiguration(_)), "{e}");
        let e = e.to_string();
        assert!(e.contains("mysql") && !e.contains("s3cret"), "{e}");
        assert_eq!(
            libpq_url("host=/run/postgresql dbname=glance").unwrap(),
            "host=/run/postgresql dbname=glance"
        );
        let e = libpq_url("glance:s3cret@db").unwrap_err().to_string();
        assert!(!e.contains("s3cret"), "{e}");
    }

    #[test]
    fn parameters_take_the_servers_types() {
        assert!(matches!(
            Param::convert(Value::Integer(7), &Type::INT4),
            Ok(Param::I32(7))
        ));
        assert!(Param::convert(Value::Integer(1 << 40), &Type::INT4).is_err());
        assert!(Param::convert(Value::Integer(70_000), &Type::INT2).is_err());
        assert!(Param::convert(Value::Text("1".into()), &Type::INT8).is_err());
        assert!(Param::convert(Value::Real(1.5), &Type::INT8).is_err());
        assert!(Param::convert(Value::Boolean(true), &Type::INT4).is_err());
        assert!(Param::convert(Value::Blob(vec![1]), &Type::TEXT).is_err());
        assert!(matches!(
            Param::convert(Value::Null, &Type::TIMESTAMP),
            Ok(Param::Null)
        ));
        assert!(matches!(
            Param::convert(Value::Real(1.5e9), &Type::TIMESTAMP),
            Ok(Param::Time(_))
        ));
        assert!(Param::convert(Value::Real(f64::NAN), &Type::TIMESTAMP).is_err());
        assert!(Param::convert(Value::Real(1e300), &Type::TIMESTAMP).is_err());
        assert!(Param::convert(Value::Text("x".into()), &Type::INET).is_err());
    }

    #[test]
    fn secrets_are_scrubbed() {
        let backend = PostgresBackend::new(
            "glance",
            &DatabaseSettings::new("postgresql+psycopg2://glance:hunter22@db.internal:5433/glance"),
        )
        .unwrap();
        let m = backend
            .shared
            .scrub("could not connect to db.internal with password hunter22");
        assert!(!m.contains("hunter22") && !m.contains("db.internal"), "{m}");
        assert!(
            format!("{:?}", DatabaseSettings::new("postgresql://a:hunter22@h/d"))
                .find("hunter22")
                .is_none()
        );
    }
}
