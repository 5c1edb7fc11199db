//! The `database` interface on MySQL and MariaDB.
//!
//! mysql_async with its own pool, on the same one-thread runtime as the
//! PostgreSQL backend, so every call is bounded by the driver call's
//! deadline from the outside; a statement still running at the deadline is
//! ended on the server with `KILL QUERY` from a connection of its own.
//!
//! What the host enforces, whatever the driver's SQL says (as on
//! PostgreSQL):
//! - the driver names a database; the URL, host, user and password stay
//!   here and are scrubbed from every message;
//! - the database fences the driver by its own privileges: an account with
//!   anything beyond `SELECT, INSERT, UPDATE, DELETE` on Glance's two cache
//!   tables (read from `SHOW GRANTS`: no global or database-wide privilege,
//!   no `GRANT OPTION`, no `PROXY`, no role, no routine) is refused at
//!   connect, with the statements that make a dedicated account
//!   ([`grant_statements`]);
//! - each statement passes [`super::policy::check`] for MySQL (no comments,
//!   no variables, no `LOAD_FILE`/`OUTFILE`, no system schemas, ...), and
//!   every session runs with `NO_BACKSLASH_ESCAPES` and `ANSI_QUOTES` so the
//!   server reads strings and names as the check does;
//! - parameters go as they are (`?`), results come back typed (`DATETIME`
//!   as Unix seconds: the session's time zone is UTC), capped in bytes; the
//!   pool caps the connections;
//! - every session has a statement time limit (`max_statement_time` on
//!   MariaDB, `max_execution_time` on MySQL), lock wait limits
//!   (`innodb_lock_wait_timeout`, `lock_wait_timeout`) and, on MariaDB, an
//!   idle-transaction limit (`idle_transaction_timeout`).
//!
//! URLs are Glance's (`mysql+pymysql://user:password@host:port/db`), with
//! PyMySQL's TLS parameters (`ssl_ca`, `ssl_cert`, `ssl_key`,
//! `ssl_check_hostname`, `ssl_verify_cert`) or mysqlclient's `ssl_mode`
//! (`DISABLED`, `REQUIRED`, `VERIFY_CA`, `VERIFY_IDENTITY`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{
    ClientIdentity, Conn, Opts, OptsBuilder, Pool, PoolConstraints, PoolOpts, SslOpts,
};

use super::common::{
    RoleCheck, Secrets, ends_transaction, judge_role, run, runtime, unix_time, value_size,
};
pub use super::schema::mysql::{GLANCE_CACHE_SCHEMA, grant_statements};
use super::schema::{CACHE_TABLES, TABLE_PRIVILEGES};
use super::{
    Backend, BackendConnection, DatabaseSettings, Dialect, Outcome, Result, Want, error, policy,
};
use crate::bindings::database::{DatabaseError, ErrorCode, Value};
use crate::error::Error;
use crate::limits::Deadline;

/// Prepared statements one connection keeps (least recently used go).
const MAX_CACHED_STATEMENTS: usize = 256;

/// How the connection is secured, as mysqlclient's `ssl_mode` says it.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TlsMode {
    Disabled,
    /// Encrypted, the server not verified.
    Required,
    /// The chain and the host name are verified.
    VerifyIdentity,
}

/// Why a chain-only check (`VERIFY_CA`, `ssl_check_hostname=false`) is
/// refused: mysql_async's switch for it does not work with the rustls this
/// host uses (it matches an error text rustls no longer prints, so every
/// such connection would fail with a confusing name error). Refusing says
/// so up front; plain `REQUIRED` would silently verify nothing.
fn verify_ca_unsupported() -> String {
    "a check of the certificate chain without the host name (ssl_mode=VERIFY_CA, \
     ssl_check_hostname=false) is not supported: connect by a name the server's certificate \
     holds (VERIFY_IDENTITY, the default with ssl_ca), or say ssl_mode=REQUIRED to encrypt \
     without verifying"
        .to_string()
}

/// A MySQL URL as the parts a connection needs. Errors never show it.
#[derive(Debug)]
struct Target {
    host: String,
    port: u16,
    user: Option<String>,
    password: Option<String>,
    database: Option<String>,
    socket: Option<String>,
    tls: TlsMode,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    connect_timeout: Option<Duration>,
}

fn truth(key: &str, value: &str) -> std::result::Result<bool, String> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(format!(
            "the database URL's {key} must be true or false, not {value:?}"
        )),
    }
}

impl Target {
    fn parse(url: &str) -> std::result::Result<Target, String> {
        let url = url.trim();
        let rest = url
            .split_once("://")
            .map(|(_, rest)| rest)
            .ok_or("the database connection is not a URL")?;
        let parsed = url::Url::parse(&format!("mysql://{rest}"))
            .map_err(|e| format!("the database connection is not a valid MySQL URL ({e})"))?;
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| "the database URL's user or password is not UTF-8".to_string())
        };
        let user = match parsed.username() {
            "" => None,
            u => Some(decode(u)?),
        };
        let password = parsed.password().map(decode).transpose()?;
        let database = parsed
            .path()
            .trim_start_matches('/')
            .split('/')
            .next()
            .filter(|d| !d.is_empty())
            .map(decode)
            .transpose()?;
        let mut target = Target {
            host: parsed.host_str().unwrap_or("localhost").to_string(),
            port: parsed.port().unwrap_or(3306),
            user,
            password,
            database,
            socket: None,
            tls: TlsMode::Disabled,
            ca: None,
            cert: None,
            key: None,
            connect_timeout: None,
        };
        let (mut mode, mut verify_cert, mut check_hostname) = (None, None, None);
        for (key, value) in parsed.query_pairs() {
            let value = value.into_owned();
            match key.as_ref() {
                "ssl_ca" => target.ca = Some(PathBuf::from(value)),
                "ssl_cert" => target.cert = Some(PathBuf::from(value)),
                "ssl_key" => target.key = Some(PathBuf::from(value)),
                "ssl_verify_cert" => verify_cert = Some(truth(&key, &value)?),
                "ssl_check_hostname" => check_hostname = Some(truth(&key, &value)?),
                "ssl_disabled" => {
                    if truth(&key, &value)? {
                        mode = Some(TlsMode::Disabled)
                    }
                }
                "ssl_mode" | "ssl-mode" => {
                    mode = Some(match value.to_ascii_uppercase().as_str() {
                        "DISABLED" => TlsMode::Disabled,
                        "REQUIRED" => TlsMode::Required,
                        "VERIFY_CA" => return Err(verify_ca_unsupported()),
                        "VERIFY_IDENTITY" => TlsMode::VerifyIdentity,
                        "PREFERRED" => {
                            return Err("ssl_mode=PREFERRED is not supported: it falls back to \
                                        plain text when TLS fails, which anyone on the path can \
                                        force; say REQUIRED (or VERIFY_CA, VERIFY_IDENTITY) or \
                                        DISABLED"
                                .to_string());
                        }
                        other => {
                            return Err(format!(
                                "ssl_mode {other:?} is not one of DISABLED, REQUIRED, \
                                 VERIFY_CA, VERIFY_IDENTITY"
                            ));
                        }
                    })
                }
                "unix_socket" => target.socket = Some(value),
                "charset" => {
                    // The host always speaks utf8mb4, which holds utf8.
                    if !matches!(
                        value.to_ascii_lowercase().as_str(),
                        "utf8" | "utf8mb4" | "utf8mb3"
                    ) {
                        return Err(format!(
                            "charset {value:?} is not supported: the host speaks utf8mb4"
                        ));
                    }
                }
                "connect_timeout" => {
                    let seconds: f64 = value
                        .parse()
                        .ok()
                        .filter(|s: &f64| s.is_finite() && *s > 0.0 && *s < 86_400.0)
                        .ok_or_else(|| format!("connect_timeout must be seconds, not {value:?}"))?;
                    target.connect_timeout = Some(Duration::from_secs_f64(seconds));
                }
                // PyMySQL's socket timeouts: the driver call's deadline
                // bounds every read and write here.
                "read_timeout" | "write_timeout" => {}
                other => {
                    return Err(format!(
                        "the database URL has a parameter this host does not know: {other:?} \
                         (known: ssl_ca, ssl_cert, ssl_key, ssl_verify_cert, \
                         ssl_check_hostname, ssl_mode, ssl_disabled, unix_socket, charset, \
                         connect_timeout)"
                    ));
                }
            }
        }
        // PyMySQL: any ssl_* file turns TLS on, verifying the certificate
        // and the host name unless told not to.
        let pymysql_tls = target.ca.is_some() || target.cert.is_some() || target.key.is_some();
        target.tls = match mode {
            Some(mode) => mode,
            None if pymysql_tls || verify_cert == Some(true) || check_hostname == Some(true) => {
                match (verify_cert.unwrap_or(true), check_hostname.unwrap_or(true)) {
                    (false, _) => TlsMode::Required,
                    (true, false) => return Err(verify_ca_unsupported()),
                    (true, true) => TlsMode::VerifyIdentity,
                }
            }
            None => TlsMode::Disabled,
        };
        if target.cert.is_some() != target.key.is_some() {
            return Err(
                "ssl_cert and ssl_key go together (a client certificate and its key)".to_string(),
            );
        }
        if target.tls == TlsMode::Disabled && pymysql_tls {
            return Err("TLS files are given but TLS is disabled".to_string());
        }
        Ok(target)
    }

    fn ssl_opts(&self) -> Option<SslOpts> {
        let mut ssl = match self.tls {
            TlsMode::Disabled => return None,
            TlsMode::Required => SslOpts::default().with_danger_accept_invalid_certs(true),
            TlsMode::VerifyIdentity => SslOpts::default(),
        };
        if let Some(ca) = &self.ca {
            // The given CA only, as libmysqlclient and PyMySQL do.
            ssl = ssl
                .with_root_certs(vec![ca.clone().into()])
                .with_disable_built_in_roots(true);
        }
        if let (Some(cert), Some(key)) = (&self.cert, &self.key) {
            ssl = ssl.with_client_identity(Some(ClientIdentity::new(
                cert.clone().into(),
                key.clone().into(),
            )));
        }
        Some(ssl)
    }

    fn secrets(&self, url: &str) -> Secrets {
        let mut secrets = vec![url.trim().to_string(), self.host.clone()];
        secrets.extend(self.password.clone());
        secrets.extend(self.socket.clone());
        Secrets::new(secrets)
    }
}

/// The session every connection gets: PostgreSQL's isolation (READ
/// COMMITTED: a scan does not wait on locked rows it does not change, so
/// a prune is not stopped by another session's lock on a row it keeps),
/// UTC times, strings and names read as the statement check reads them,
/// and the server-side time limits.
fn session_setup(timeout: Duration) -> Vec<String> {
    let seconds = timeout.as_secs().max(1);
    vec![
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED".to_string(),
        "SET SESSION time_zone = '+00:00', \
         sql_mode = 'STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,\
         NO_ENGINE_SUBSTITUTION,NO_BACKSLASH_ESCAPES,ANSI_QUOTES', \
         character_set_results = 'utf8mb4'"
            .to_string(),
        format!("SET SESSION innodb_lock_wait_timeout = {seconds}, lock_wait_timeout = {seconds}"),
    ]
}

/// The statement and idle-transaction limits, which MariaDB and MySQL name
/// differently; run on each new connection once its server is known.
fn server_limits(version: &str, timeout: Duration) -> String {
    let seconds = timeout.as_secs_f64().max(0.001);
    if version.to_ascii_lowercase().contains("mariadb") {
        format!(
            "SET SESSION max_statement_time = {seconds:.3}, idle_transaction_timeout = {}",
            timeout.as_secs().max(1)
        )
    } else {
        format!(
            "SET SESSION max_execution_time = {}",
            timeout.as_millis().max(1)
        )
    }
}

struct Shared {
    name: String,
    pool: Pool,
    /// For `KILL QUERY` connections, outside the pool.
    opts: Opts,
    secrets: Secrets,
    max_result_bytes: usize,
    allow_privileged_role: bool,
    role: RoleCheck,
    connect_timeout: Duration,
}

/// A MySQL or MariaDB database a driver may open by name.
pub struct MysqlBackend {
    shared: Arc<Shared>,
}

fn builder(target: &Target, settings: &DatabaseSettings) -> OptsBuilder {
    let timeout = settings.statement_timeout;
    let mut b = OptsBuilder::default()
        .ip_or_hostname(target.host.clone())
        .tcp_port(target.port)
        .user(target.user.clone())
        .pass(target.password.clone())
        .db_name(target.database.clone())
        .prefer_socket(false)
        .client_found_rows(true)
        .stmt_cache_size(MAX_CACHED_STATEMENTS)
        .tcp_keepalive(Some(Duration::from_secs(30)))
        .ssl_opts(target.ssl_opts())
        .init(session_setup(timeout))
        .after_connect(move |conn: &mut Conn| {
            Box::pin(async move {
                let version: Option<String> = conn.query_first("SELECT VERSION()").await?;
                conn.query_drop(server_limits(&version.unwrap_or_default(), timeout))
                    .await
            })
        });
    if let Some(socket) = &target.socket {
        b = b.socket(Some(socket.clone()));
    }
    b
}

impl MysqlBackend {
    /// A backend for `settings`, known to drivers as `name`. Nothing is
    /// connected until a driver opens it. Settings that cannot be used are
    /// an [`Error::BadConfiguration`] naming the database, never the URL.
    pub fn new(name: &str, settings: &DatabaseSettings) -> std::result::Result<Self, Error> {
        let target = Target::parse(&settings.url).map_err(|e| {
            Error::BadConfiguration(format!("the connection URL of database {name:?}: {e}"))
        })?;
        if target.database.is_none() {
            return Err(Error::BadConfiguration(format!(
                "the connection URL of database {name:?} names no database \
                 (mysql+pymysql://user:password@host/glance)"
            )));
        }
        let opts: Opts = builder(&target, settings).into();
        let pool_opts = PoolOpts::new()
            .with_constraints(
                PoolConstraints::new(0, settings.pool_size.max(1)).ok_or_else(|| {
                    Error::BadConfiguration("the pool size must be at least 1".to_string())
                })?,
            )
            // Sessions keep what `init` set; a driver cannot change it
            // (`SET` and variables are refused), and every transaction it
            // left open is rolled back before the connection goes back.
            .with_reset_connection(false)
            .with_inactive_connection_ttl(Duration::from_secs(60));
        let pooled = OptsBuilder::from_opts(opts.clone()).pool_opts(pool_opts);
        Ok(MysqlBackend {
            shared: Arc::new(Shared {
                name: name.to_string(),
                pool: Pool::new(pooled),
                opts,
                secrets: target.secrets(&settings.url),
                max_result_bytes: settings.max_result_bytes,
                allow_privileged_role: settings.allow_privileged_role,
                role: RoleCheck::default(),
                connect_timeout: target.connect_timeout.unwrap_or(settings.connect_timeout),
            }),
        })
    }
}

/// A MySQL server error code as the interface's error kind.
fn error_code(code: u16) -> ErrorCode {
    match code {
        // Duplicate key, foreign key, NOT NULL, no default, CHECK.
        1062 | 1216 | 1217 | 1451 | 1452 | 1048 | 1364 | 1557 | 1586 | 3819 | 4025 => {
            ErrorCode::Constraint
        }
        // Lock wait timeout; statement time exceeded (MySQL 3024, MariaDB
        // 1969); interrupted (KILL QUERY).
        1205 | 3024 | 1969 | 1317 | 1907 => ErrorCode::TimedOut,
        // A privilege the account lacks.
        1044 | 1142 | 1143 | 1227 | 1370 | 1410 => ErrorCode::AccessDenied,
        // Bad login, too many connections, unknown database, shutting down,
        // connection lost or refused.
        1040 | 1045 | 1049 | 1053 | 1129 | 1130 | 1203 | 2002 | 2003 | 2006 | 2013 => {
            ErrorCode::Unavailable
        }
        // Packet or row too large, out of memory or sort space.
        1037 | 1038 | 1118 | 1153 | 1301 => ErrorCode::LimitExceeded,
        _ => ErrorCode::Other,
    }
}

impl Shared {
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
            format!("database {:?}: {}", self.name, self.secrets.scrub(message)),
        )
    }

    /// A client error in the driver's terms, scrubbed. Server errors carry
    /// their number and SQLSTATE (`ERROR 1146 (42S02): ...`).
    fn client_error(&self, e: &mysql_async::Error) -> DatabaseError {
        match e {
            mysql_async::Error::Server(s) => self.error(
                error_code(s.code),
                &format!("ERROR {} ({}): {}", s.code, s.state, s.message),
            ),
            // No answer from the server: refused, reset, closed, TLS.
            mysql_async::Error::Io(mysql_async::IoError::Io(e)) => {
                self.error(ErrorCode::Unavailable, &e.to_string())
            }
            mysql_async::Error::Io(mysql_async::IoError::Tls(e)) => {
                self.error(ErrorCode::Unavailable, &format!("TLS: {e}"))
            }
            mysql_async::Error::Driver(e) => self.error(ErrorCode::Unavailable, &e.to_string()),
            other => self.error(ErrorCode::Unavailable, &other.to_string()),
        }
    }

    /// Check out a connection, checking the account once per backend.
    async fn checkout(self: Arc<Self>) -> Result<Conn> {
        let mut conn = match tokio::time::timeout(self.connect_timeout, self.pool.get_conn()).await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(self.client_error(&e)),
            Err(_) => {
                return Err(self.error(
                    ErrorCode::Unavailable,
                    "no connection within the connect timeout",
                ));
            }
        };
        match self.role.outcome() {
            Some(Ok(())) => Ok(conn),
            Some(Err(why)) => Err(self.refusal(&why)),
            None => {
                self.check_role(&mut conn).await?;
                Ok(conn)
            }
        }
    }

    async fn check_role(&self, conn: &mut Conn) -> Result<()> {
        let database: Option<String> = conn
            .query_first("SELECT DATABASE()")
            .await
            .map_err(|e| self.client_error(&e))?;
        let database = database.unwrap_or_default();
        let grants: Vec<String> = conn
            .query("SHOW GRANTS")
            .await
            .map_err(|e| self.client_error(&e))?;
        let (problems, missing) = grant_problems(&grants, &database);
        if problems.is_empty() && !missing.is_empty() {
            log::warn!(
                "database {:?}: the account lacks {}",
                self.name,
                missing.join(", ")
            );
        }
        judge_role(
            &self.role,
            &self.name,
            &problems,
            self.allow_privileged_role,
            || {
                format!(
                    "a cache driver needs only SELECT, INSERT, UPDATE, DELETE on {}; give the \
                     cache a dedicated account, as `image-cache db grants --mysql` prints it: {}",
                    CACHE_TABLES.join(" and "),
                    grant_statements("image_cache", &database).join(" ")
                )
            },
        )
        .map_err(|why| self.refusal(&why))
    }
}

/// Split `s` at the first `sep` outside backquotes, quotes and brackets.
fn split_top(s: &str, sep: &str) -> Option<(String, String)> {
    let (mut quote, mut depth) = (None::<char>, 0i32);
    let upper = s.to_ascii_uppercase();
    let mut i = 0;
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    while i < chars.len() {
        let (at, c) = chars[i];
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                '`' | '\'' | '"' => quote = Some(c),
                '(' => depth += 1,
                ')' => depth -= 1,
                _ if depth == 0 && upper[at..].starts_with(sep) => {
                    return Some((s[..at].to_string(), s[at + sep.len()..].to_string()));
                }
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// A quoted (backquotes, or double quotes under `ANSI_QUOTES`) or bare
/// name without its quotes (and a database-level grant's `\_` and `\%`
/// unescaped).
fn unquote(name: &str) -> String {
    let name = name.trim();
    let inner = ['`', '"']
        .iter()
        .find_map(|&q| {
            name.strip_prefix(q)
                .and_then(|n| n.strip_suffix(q))
                .map(|n| n.replace(&format!("{q}{q}"), &q.to_string()))
        })
        .unwrap_or_else(|| name.to_string());
    inner.replace("\\_", "_").replace("\\%", "%")
}

/// What `SHOW GRANTS` says the account may do beyond a cache driver's
/// needs in `database` (the problems), and what it lacks of them.
pub fn grant_problems(grants: &[String], database: &str) -> (Vec<String>, Vec<String>) {
    let mut problems = Vec::new();
    let mut held: Vec<(String, String)> = Vec::new();
    for line in grants {
        let line = line.trim();
        let Some(body) = line
            .get(..6)
            .filter(|g| g.eq_ignore_ascii_case("GRANT "))
            .map(|_| &line[6..])
        else {
            // `SET DEFAULT ROLE ...` and the like: about roles, which a
            // `GRANT role TO` line already reported.
            continue;
        };
        if split_top(line, " WITH GRANT OPTION").is_some() {
            problems.push("may grant its privileges (WITH GRANT OPTION)".to_string());
        }
        let Some((privileges, rest)) = split_top(body, " ON ") else {
            let role = split_top(body, " TO ").map(|(r, _)| r).unwrap_or_default();
            problems.push(format!("is granted the role {}", role.trim()));
            continue;
        };
        let object = split_top(&rest, " TO ")
            .map(|(o, _)| o)
            .unwrap_or(rest)
            .trim()
            .to_string();
        let privileges: Vec<String> = {
            let mut list = Vec::new();
            let mut rest = privileges.trim().to_string();
            while let Some((one, more)) = split_top(&rest, ",") {
                list.push(one);
                rest = more;
            }
            list.push(rest);
            list.into_iter()
                .map(|p| {
                    // `SELECT (col, ...)`: a column grant of SELECT.
                    p.split('(')
                        .next()
                        .unwrap_or("")
                        .trim()
                        .to_ascii_uppercase()
                })
                .filter(|p| !p.is_empty())
                .collect()
        };
        if privileges.iter().any(|p| p == "PROXY") {
            problems.push(format!("may proxy as {object}"));
            continue;
        }
        let upper = object.to_ascii_uppercase();
        if upper.starts_with("FUNCTION ")
            || upper.starts_with("PROCEDURE ")
            || upper.starts_with("PACKAGE ")
        {
            problems.push(format!("holds {} on {object}", privileges.join(", ")));
            continue;
        }
        let (db, table) = match split_top(&object, ".") {
            Some((db, table)) => (unquote(&db), unquote(&table)),
            None => (database.to_string(), unquote(&object)),
        };
        for privilege in privileges {
            let needed = db == database
                && CACHE_TABLES.contains(&table.as_str())
                && TABLE_PRIVILEGES.contains(&privilege.as_str());
            if needed {
                held.push((table.clone(), privilege));
            } else if privilege == "USAGE" {
                // No privilege at all.
            } else {
                let on = if table == "*" {
                    format!("{db}.*")
                } else {
                    format!("{db}.{table}")
                };
                problems.push(format!("holds {privilege} on {on}"));
            }
        }
    }
    problems.dedup();
    let mut missing = Vec::new();
    for table in CACHE_TABLES {
        for privilege in TABLE_PRIVILEGES {
            if !held.iter().any(|(t, p)| t == table && p == privilege) {
                missing.push(format!("{privilege} on {table}"));
            }
        }
    }
    (problems, missing)
}

/// Create Glance's two cache tables ([`GLANCE_CACHE_SCHEMA`]) in the
/// database at `url` (`image-cache db init`, for a database of the cache's
/// own). A URL that cannot be used is an [`Error::BadConfiguration`], a
/// server that refuses or cannot be reached an [`Error::Database`]. Errors
/// never show the URL.
pub fn init_schema(url: &str, timeout: Duration) -> std::result::Result<(), Error> {
    let target = Target::parse(url).map_err(Error::BadConfiguration)?;
    let mut settings = DatabaseSettings::new(url);
    settings.statement_timeout = timeout;
    let opts: Opts = builder(&target, &settings).into();
    let work = async move {
        let mut conn = Conn::new(opts).await?;
        // DDL commits by itself on MySQL; each table is made if missing,
        // so a second run (or a race with another) finishes the work.
        for table in GLANCE_CACHE_SCHEMA {
            conn.query_drop(table).await?;
        }
        conn.disconnect().await
    };
    match run(Deadline(std::time::Instant::now() + timeout), work) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(mysql_async::Error::Server(s))) => Err(Error::Database(format!(
            "ERROR {} ({}): {}",
            s.code, s.state, s.message
        ))),
        Ok(Err(_)) => Err(Error::Database("cannot reach the database".to_string())),
        Err(e) => Err(Error::Database(e.message)),
    }
}

impl Backend for MysqlBackend {
    fn connect(&self, deadline: Deadline) -> Result<Box<dyn BackendConnection>> {
        let shared = self.shared.clone();
        let conn = run(deadline, shared.clone().checkout())??;
        Ok(Box::new(MysqlConnection {
            shared,
            conn: Some(conn),
            in_transaction: false,
        }))
    }
}

/// One connection a driver opened.
struct MysqlConnection {
    shared: Arc<Shared>,
    /// `None` once a call lost it.
    conn: Option<Conn>,
    /// A `BEGIN` without its `COMMIT`/`ROLLBACK` yet.
    in_transaction: bool,
}

/// Close `conn` instead of giving it back to the pool (a call stopped half
/// way, a lost server, a transaction still open).
fn discard(conn: Conn) {
    runtime().spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.disconnect()).await;
    });
}

impl Drop for MysqlConnection {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.in_transaction {
                discard(conn);
            } else {
                // Back to the pool, from inside the runtime it belongs to.
                runtime().spawn(async move { drop(conn) });
            }
        }
    }
}

impl MysqlConnection {
    fn statement_call(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
        want: Want,
    ) -> Result<Outcome> {
        policy::check(Dialect::Mysql, sql)
            .map_err(|why| self.shared.error(ErrorCode::AccessDenied, &why.to_string()))?;
        let Some(mut conn) = self.conn.take() else {
            return Err(self.shared.error(
                ErrorCode::Unavailable,
                "this connection was lost; open a new one",
            ));
        };
        let shared = self.shared.clone();
        let sql_owned = sql.to_string();
        let id = conn.id();
        let outcome = run(deadline, async move {
            let result = statement(&shared, &mut conn, &sql_owned, params, want).await;
            (conn, result)
        });
        match outcome {
            Ok((conn, result)) => {
                let lost = matches!(&result, Err(e) if e.code == ErrorCode::Unavailable);
                if lost || conn.is_disconnected() {
                    discard(conn);
                } else {
                    self.conn = Some(conn);
                }
                if result.is_ok() {
                    match policy::first_word(sql).as_deref() {
                        Some("begin" | "start") => self.in_transaction = true,
                        Some(_) if ends_transaction(sql) => self.in_transaction = false,
                        _ => {}
                    }
                }
                result
            }
            Err(e) => {
                // Stopped at the deadline (the connection went with the
                // work): the server stops too.
                let opts = self.shared.opts.clone();
                runtime().spawn(async move {
                    let kill = async {
                        let mut killer = Conn::new(opts).await?;
                        killer.query_drop(format!("KILL QUERY {id}")).await?;
                        killer.disconnect().await
                    };
                    let _ = tokio::time::timeout(Duration::from_secs(5), kill).await;
                });
                Err(e)
            }
        }
    }
}

/// A guest value as a MySQL parameter.
fn param(v: Value) -> std::result::Result<mysql_async::Value, String> {
    Ok(match v {
        Value::Null => mysql_async::Value::NULL,
        Value::Boolean(b) => mysql_async::Value::Int(b.into()),
        Value::Integer(i) => mysql_async::Value::Int(i),
        Value::Real(r) if r.is_finite() => mysql_async::Value::Double(r),
        Value::Real(r) => return Err(format!("{r} is not a number the server can store")),
        Value::Text(t) => mysql_async::Value::Bytes(t.into_bytes()),
        Value::Blob(b) => mysql_async::Value::Bytes(b),
    })
}

/// MySQL's character set number for binary strings.
const BINARY_CHARSET: u16 = 63;

/// A result value of `column` as a guest value.
fn column(
    value: mysql_async::Value,
    column: &mysql_async::Column,
) -> std::result::Result<Value, String> {
    use mysql_async::consts::ColumnType as T;
    Ok(match value {
        mysql_async::Value::NULL => Value::Null,
        mysql_async::Value::Int(i) => Value::Integer(i),
        mysql_async::Value::UInt(u) => Value::Integer(
            i64::try_from(u).map_err(|_| format!("{u} does not fit in a signed 64-bit integer"))?,
        ),
        mysql_async::Value::Float(f) => Value::Real(f.into()),
        mysql_async::Value::Double(f) => Value::Real(f),
        mysql_async::Value::Bytes(bytes) => match column.column_type() {
            T::MYSQL_TYPE_DECIMAL | T::MYSQL_TYPE_NEWDECIMAL => {
                let text = String::from_utf8_lossy(&bytes);
                Value::Real(
                    text.parse()
                        .map_err(|_| format!("{text:?} is not a decimal number"))?,
                )
            }
            _ if column.character_set() == BINARY_CHARSET => Value::Blob(bytes),
            _ => Value::Text(
                String::from_utf8(bytes).map_err(|_| "text that is not UTF-8".to_string())?,
            ),
        },
        mysql_async::Value::Date(y, mo, d, h, mi, s, us) => {
            let days = days_from_civil(y.into(), mo.into(), d.into());
            let seconds = days as f64 * 86_400.0
                + f64::from(h) * 3600.0
                + f64::from(mi) * 60.0
                + f64::from(s)
                + f64::from(us) / 1e6;
            unix_time(seconds).ok_or_else(|| format!("{y}-{mo}-{d} is not a time"))?;
            Value::Real(seconds)
        }
        mysql_async::Value::Time(..) => {
            return Err(
                "its type TIME is not one this interface carries; cast it (CAST(... AS CHAR))"
                    .to_string(),
            );
        }
    })
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

async fn statement(
    shared: &Shared,
    conn: &mut Conn,
    sql: &str,
    params: Vec<Value>,
    want: Want,
) -> Result<Outcome> {
    let stmt = conn.prep(sql).await.map_err(|e| shared.client_error(&e))?;
    if usize::from(stmt.num_params()) != params.len() {
        return Err(shared.error(
            ErrorCode::Other,
            &format!(
                "the statement has {} parameters, {} values were given",
                stmt.num_params(),
                params.len()
            ),
        ));
    }
    let params = params
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            param(v).map_err(|why| {
                shared.error(ErrorCode::Other, &format!("parameter {}: {why}", i + 1))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let params = if params.is_empty() {
        mysql_async::Params::Empty
    } else {
        mysql_async::Params::Positional(params)
    };
    match want {
        Want::Count => {
            conn.exec_drop(&stmt, params)
                .await
                .map_err(|e| shared.client_error(&e))?;
            Ok(Outcome::Count(conn.affected_rows()))
        }
        Want::Rows => {
            let mut result = conn
                .exec_iter(&stmt, params)
                .await
                .map_err(|e| shared.client_error(&e))?;
            let columns = result.columns();
            let mut rows = Vec::new();
            let mut bytes = 0usize;
            let mut over = false;
            while let Some(row) = result.next().await.map_err(|e| shared.client_error(&e))? {
                if over {
                    // Read to the end, so the connection stays usable.
                    continue;
                }
                let Some(columns) = columns.as_ref() else {
                    break;
                };
                let mut values = Vec::with_capacity(columns.len());
                for (i, (value, col)) in row.unwrap().into_iter().zip(columns.iter()).enumerate() {
                    let value = column(value, col).map_err(|why| {
                        shared.error(ErrorCode::Other, &format!("column {}: {why}", i + 1))
                    })?;
                    bytes = bytes.saturating_add(value_size(&value));
                    values.push(value);
                }
                if bytes > shared.max_result_bytes {
                    over = true;
                    rows.clear();
                    continue;
                }
                rows.push(values);
            }
            if over {
                return Err(shared.error(
                    ErrorCode::LimitExceeded,
                    &format!("query result exceeds {} bytes", shared.max_result_bytes),
                ));
            }
            Ok(Outcome::Rows(rows))
        }
    }
}

impl BackendConnection for MysqlConnection {
    fn call(
        &mut self,
        sql: &str,
        params: Vec<Value>,
        deadline: Deadline,
        want: Want,
    ) -> Result<Outcome> {
        self.statement_call(sql, params, deadline, want)
    }

    fn dialect(&self) -> Dialect {
        Dialect::Mysql
    }

    fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    fn end_of_call(&mut self, deadline: Deadline) {
        if !self.in_transaction {
            return;
        }
        if self.execute("ROLLBACK", Vec::new(), deadline).is_err()
            && let Some(conn) = self.conn.take()
        {
            discard(conn);
        }
        self.in_transaction = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glance_urls_parse_and_never_show_the_password() {
        let t =
            Target::parse("mysql+pymysql://glance:s%40cret@db.example:3307/glance?charset=utf8")
                .unwrap();
        assert_eq!(
            (
                t.host.as_str(),
                t.port,
                t.user.as_deref(),
                t.password.as_deref()
            ),
            ("db.example", 3307, Some("glance"), Some("s@cret"))
        );
        assert_eq!(t.database.as_deref(), Some("glance"));
        assert_eq!(t.tls, TlsMode::Disabled);
        let t = Target::parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem").unwrap();
        assert_eq!(t.tls, TlsMode::VerifyIdentity);
        let e = Target::parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_check_hostname=false")
            .unwrap_err();
        assert!(e.contains("VERIFY_IDENTITY"), "{e}");
        let t =
            Target::parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_verify_cert=false").unwrap();
        assert_eq!(t.tls, TlsMode::Required);
        let t = Target::parse("mysql://u:p@h/d?ssl_mode=REQUIRED").unwrap();
        assert_eq!(t.tls, TlsMode::Required);
        for bad in [
            "mysql://u:hunter22@h/d?ssl_mode=PREFERRED",
            "mysql://u:hunter22@h/d?ssl_mode=sometimes",
            "mysql://u:hunter22@h/d?sslmode=require",
            "mysql://u:hunter22@h/d?charset=latin1",
            "mysql://u:hunter22@h/d?ssl_cert=/c.pem",
            "mysql://u:hunter22@h/d?ssl_ca=/ca.pem&ssl_mode=DISABLED",
            "mysql://u:hunter22@h:notaport/d",
        ] {
            let e = Target::parse(bad).unwrap_err();
            assert!(!e.contains("hunter22"), "{e}");
        }
    }

    #[test]
    fn grants_beyond_the_cache_tables_are_problems() {
        let fenced = [
            "GRANT USAGE ON *.* TO `glance`@`%` IDENTIFIED BY PASSWORD '*ABC'".to_string(),
            "GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`cached_images` TO `glance`@`%`"
                .to_string(),
            "GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`node_reference` TO `glance`@`%`"
                .to_string(),
        ];
        let (problems, missing) = grant_problems(&fenced, "ic_1");
        assert!(
            problems.is_empty() && missing.is_empty(),
            "{problems:?} {missing:?}"
        );
        // As the server prints them under ANSI_QUOTES.
        let ansi: Vec<String> = fenced.iter().map(|g| g.replace('`', "\"")).collect();
        let (problems, missing) = grant_problems(&ansi, "ic_1");
        assert!(
            problems.is_empty() && missing.is_empty(),
            "{problems:?} {missing:?}"
        );
        for (extra, says) in [
            (
                "GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION",
                "ALL PRIVILEGES on *.*",
            ),
            ("GRANT FILE ON *.* TO `glance`@`%`", "FILE on *.*"),
            (
                "GRANT ALL PRIVILEGES ON `ic\\_1`.* TO `glance`@`%`",
                "ALL PRIVILEGES on ic_1.*",
            ),
            (
                "GRANT SELECT ON `ic_1`.`images` TO `glance`@`%`",
                "SELECT on ic_1.images",
            ),
            (
                "GRANT DROP ON `ic_1`.`cached_images` TO `glance`@`%`",
                "DROP on ic_1.cached_images",
            ),
            (
                "GRANT SELECT ON `other`.`cached_images` TO `glance`@`%`",
                "SELECT on other.cached_images",
            ),
            ("GRANT `dba` TO `glance`@`%`", "role `dba`"),
            ("GRANT PROXY ON ''@'%' TO 'glance'@'%'", "proxy"),
            (
                "GRANT EXECUTE ON PROCEDURE `ic_1`.`p` TO `glance`@`%`",
                "EXECUTE on PROCEDURE",
            ),
            (
                "GRANT SELECT (`id`), UPDATE (`hits`) ON `ic_1`.`secrets` TO `glance`@`%`",
                "SELECT on ic_1.secrets",
            ),
        ] {
            let mut grants = fenced.to_vec();
            grants.push(extra.to_string());
            let (problems, _) = grant_problems(&grants, "ic_1");
            assert!(
                problems.iter().any(|p| p.contains(says)),
                "{extra}: {problems:?}"
            );
        }
        let (_, missing) = grant_problems(&fenced[..2], "ic_1");
        assert_eq!(missing.len(), 4, "{missing:?}");
        let with_option = [fenced[1].clone() + " WITH GRANT OPTION"];
        let (problems, _) = grant_problems(&with_option, "ic_1");
        assert!(
            problems.iter().any(|p| p.contains("GRANT OPTION")),
            "{problems:?}"
        );
    }

    #[test]
    fn grant_statements_name_the_account_and_tables() {
        let s = grant_statements("image_cache", "glance");
        assert_eq!(
            s[0],
            "GRANT SELECT, INSERT, UPDATE, DELETE ON `glance`.`cached_images` TO 'image_cache'@'%';"
        );
        assert!(grant_statements("cache@10.0.0.%", "g")[1].ends_with("TO 'cache'@'10.0.0.%';"));
    }

    #[test]
    fn datetimes_are_unix_seconds() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        let col = mysql_async::Column::new(mysql_async::consts::ColumnType::MYSQL_TYPE_DATETIME);
        assert!(matches!(
            column(mysql_async::Value::Date(2026, 12, 7, 9, 30, 0, 500_000), &col),
            Ok(Value::Real(s)) if s == 1_796_635_800.5
        ));
    }
}
