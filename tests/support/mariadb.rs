//! A throwaway MariaDB for the centralized driver's tests on MySQL.
//!
//! One server per test process: `mariadb-install-db` + `mariadbd` in a
//! temporary directory (as the `mysql` user when the tests run as root), a
//! Unix socket there and a free loopback port, stopped when the process
//! exits. `IMAGE_CACHE_TEST_MARIADB=mysql://root:pw@host:port/` uses a
//! running server instead (an administrator who may create accounts and
//! databases; its TLS is its own business). Without either the tests fail
//! and say how to install the server.
//!
//! Drivers connect over TCP with a password (the tests look for it in
//! every message), each test in a database of its own with an account of
//! its own (named as the database): MySQL's accounts are server-wide, and
//! one granted the cache tables of two databases holds more than a driver
//! of either needs. Our own server takes TCP connections over TLS only
//! (`require_secure_transport`), with a certificate for `localhost` signed
//! by a CA made here ([`Server::tls_ca`]); the tests administer it over the
//! Unix socket with the `mariadb` client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings};

/// Debian's server binaries (mariadb-server).
pub const MARIADBD: &str = "/usr/sbin/mariadbd";
pub const INSTALL_DB: &str = "/usr/bin/mariadb-install-db";
/// A running server to use instead of starting one.
pub const MARIADB_ENV: &str = "IMAGE_CACHE_TEST_MARIADB";
/// The drivers' accounts' password: the tests look for it.
pub const PASSWORD: &str = "Pw-7a1d4b-m4r1a";

/// A MariaDB server the tests administer.
pub struct Server {
    host: String,
    port: u16,
    /// How the administrator connects (`mariadb` client arguments).
    admin: Vec<String>,
    local: Option<Local>,
}

struct Local {
    dir: PathBuf,
    as_mysql: bool,
    ca: PathBuf,
    child: Mutex<Option<Child>>,
}

static SERVERS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn stop_pid_file(dir: &Path) {
    if let Ok(pid) = std::fs::read_to_string(dir.join("mariadb.pid"))
        && let Ok(pid) = pid.trim().parse::<i32>()
    {
        // SAFETY: a plain signal to a process this test process started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

extern "C" fn stop_servers() {
    let dirs = SERVERS.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in dirs {
        stop_pid_file(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Servers of test processes that were killed (no `atexit` ran): stopped
/// and removed by the next test process.
fn stop_abandoned() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let named = entry
            .file_name()
            .to_string_lossy()
            .starts_with("image-cache-mariadb-");
        let Ok(owner) = std::fs::read_to_string(dir.join("owner.pid")) else {
            continue;
        };
        if named && !Path::new("/proc").join(owner.trim()).exists() {
            stop_pid_file(&dir);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: a plain system call without arguments.
    unsafe { libc::geteuid() == 0 }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn run(mut c: Command, what: &str) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

impl Server {
    /// The server shared by this test process.
    pub fn shared() -> &'static Server {
        static SHARED: OnceLock<Server> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var(MARIADB_ENV) {
            Ok(url) if !url.trim().is_empty() => Server::external(url.trim()),
            _ => Server::start_local(),
        })
    }

    fn external(url: &str) -> Server {
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
        let authority = rest.split('/').next().unwrap_or("");
        let (userinfo, hostport) = authority.rsplit_once('@').unwrap_or(("root", authority));
        let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().unwrap_or(3306)),
            None => (hostport.to_string(), 3306),
        };
        let mut admin = vec![
            format!("--host={host}"),
            format!("--port={port}"),
            format!("--user={user}"),
        ];
        if !password.is_empty() {
            admin.push(format!("--password={password}"));
        }
        let s = Server {
            host,
            port,
            admin,
            local: None,
        };
        s.create_account();
        s
    }

    fn start_local() -> Server {
        if !Path::new(MARIADBD).exists() || !Path::new(INSTALL_DB).exists() {
            panic!(
                "MariaDB server binaries are missing ({MARIADBD}): the centralized driver's \
                 MySQL tests need a real server. Install it with \
                 `apt-get install -y mariadb-server`, or point {MARIADB_ENV} at a running \
                 server (mysql://root:password@host:port/)"
            );
        }
        stop_abandoned();
        let as_mysql = is_root();
        let dir = tempfile::Builder::new()
            .prefix("image-cache-mariadb-")
            .tempdir()
            .expect("temp dir")
            .keep();
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())
            .expect("writing owner.pid");
        {
            let mut dirs = SERVERS.lock().unwrap();
            if dirs.is_empty() {
                // SAFETY: registers a plain extern "C" function.
                unsafe { libc::atexit(stop_servers) };
            }
            dirs.push(dir.clone());
        }
        let ca = crate::tls::localhost_certificate(&dir, &dir, "image-cache test CA (MariaDB)");
        if as_mysql {
            let mut chown = Command::new("chown");
            chown.args(["-R", "mysql:mysql"]).arg(&dir);
            run(chown, "chown of the MariaDB directory");
        }
        let mut install = Command::new(INSTALL_DB);
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        if as_mysql {
            install.arg("--user=mysql");
        }
        run(install, "mariadb-install-db");
        let s = Server {
            host: "127.0.0.1".to_string(),
            port: free_port(),
            admin: vec![
                format!("--socket={}", dir.join("mariadb.sock").display()),
                "--user=root".to_string(),
            ],
            local: Some(Local {
                dir,
                as_mysql,
                ca,
                child: Mutex::new(None),
            }),
        };
        s.start();
        s.create_account();
        s
    }

    /// Start our server (again), waiting until it takes connections.
    pub fn start(&self) {
        let local = self.local.as_ref().expect("a server of our own");
        let dir = &local.dir;
        let mut c = Command::new(MARIADBD);
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("server.log").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-name-resolve")
            .arg("--skip-log-bin")
            .arg("--max-connections=300")
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--innodb-log-file-size=16M")
            // The kernel keeps what a killed server wrote; commits stay
            // synchronous to the server.
            .arg("--innodb-flush-log-at-trx-commit=2")
            .arg(format!("--ssl-ca={}", local.ca.display()))
            .arg(format!("--ssl-cert={}", dir.join("server.crt").display()))
            .arg(format!("--ssl-key={}", dir.join("server.key").display()))
            .arg("--require-secure-transport=ON")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if local.as_mysql {
            c.arg("--user=mysql");
        }
        let child = c.spawn().expect("starting mariadbd");
        *local.child.lock().unwrap() = Some(child);
        let start = Instant::now();
        loop {
            let ok = Command::new("mariadb")
                .arg("--no-defaults")
                .args(&self.admin)
                .args(["-N", "-B", "-e", "SELECT 1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return;
            }
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "MariaDB did not start in 60 s: {log}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop our server at once (connections are cut, as in a crash).
    pub fn stop(&self) {
        let local = self.local.as_ref().expect("a server of our own");
        if let Some(mut child) = local.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The CA of our server's certificate (`None` for an external server).
    pub fn tls_ca(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.ca.as_path())
    }

    /// Whether this process started the server (and so may stop it).
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Run SQL as the administrator (in `database`, if any); tab-separated
    /// rows.
    pub fn admin_sql(&self, database: Option<&str>, sql: &str) -> String {
        let mut c = Command::new("mariadb");
        c.arg("--no-defaults")
            .args(&self.admin)
            .args(["-N", "-B", "-e", sql]);
        if let Some(db) = database {
            c.arg(db);
        }
        run(c, &format!("mariadb {sql:?}"))
    }

    fn create_account(&self) {
        self.admin_sql(
            None,
            &format!(
                "CREATE USER IF NOT EXISTS 'cache_admin'@'%' IDENTIFIED BY '{PASSWORD}'; \
                 GRANT ALL PRIVILEGES ON *.* TO 'cache_admin'@'%'"
            ),
        );
    }

    /// A URL of `account` for `database` over TCP (with TLS parameters
    /// `tls`, e.g. `?ssl_ca=...`).
    pub fn url(&self, account: &str, database: &str, tls: &str) -> String {
        format!(
            "mysql+pymysql://{account}:{PASSWORD}@{}:{}/{database}{tls}",
            self.host, self.port
        )
    }

    /// The TLS parameters our server needs (`ssl_mode=REQUIRED`: encrypted,
    /// the certificate not checked; the TLS test checks it).
    fn default_tls(&self) -> &'static str {
        if self.local.is_some() {
            "?ssl_mode=REQUIRED"
        } else {
            ""
        }
    }

    /// A new database as an operator sets it up: Glance's two tables (as
    /// its migration makes them), the drivers' account granted what
    /// `image-cache db grants --mysql` prints.
    pub fn database(&'static self) -> TestDatabase {
        let db = self.bare_database();
        for table in image_cache::database::mysql::GLANCE_CACHE_SCHEMA {
            db.sql(table);
        }
        db.grant_cache_privileges(&db.name);
        db
    }

    /// A new, empty database, and its drivers' account with nothing yet.
    pub fn bare_database(&'static self) -> TestDatabase {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ic_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.admin_sql(
            None,
            &format!(
                "CREATE DATABASE {name}; \
                 CREATE USER '{name}'@'%' IDENTIFIED BY '{PASSWORD}'"
            ),
        );
        TestDatabase {
            server: self,
            url: self.url(&name, &name, self.default_tls()),
            admin_url: self.url("cache_admin", &name, self.default_tls()),
            name,
        }
    }
}

/// A database of one test.
#[derive(Clone)]
pub struct TestDatabase {
    server: &'static Server,
    pub name: String,
    /// As the drivers' account (named as the database), with its
    /// password, over TCP.
    pub url: String,
    /// As an account with every privilege.
    pub admin_url: String,
}

impl TestDatabase {
    /// The databases a cache may open: this one as `glance`.
    pub fn root(&self) -> Arc<DatabaseRoot> {
        self.root_with(DatabaseSettings::new(self.url.clone()))
    }

    pub fn root_with(&self, settings: DatabaseSettings) -> Arc<DatabaseRoot> {
        Arc::new(
            DatabaseRoot::new()
                .with_database(CENTRALIZED_DATABASE, &settings)
                .expect("database settings"),
        )
    }

    /// Run SQL as the administrator in this database.
    pub fn sql(&self, sql: &str) -> String {
        self.server.admin_sql(Some(&self.name), sql)
    }

    /// Run what `image-cache db grants --mysql` prints for `account`.
    pub fn grant_cache_privileges(&self, account: &str) {
        let statements = image_cache::database::mysql::grant_statements(account, &self.name);
        self.server.admin_sql(None, &statements.join("\n"));
    }
}

/// Tests share the server; the one that stops it has it alone.
static USE: RwLock<()> = RwLock::new(());

/// The shared server, held up for the life of the guard.
pub fn mariadb() -> (RwLockReadGuard<'static, ()>, &'static Server) {
    let guard = USE.read().unwrap_or_else(|p| p.into_inner());
    (guard, Server::shared())
}

/// The shared server, alone (to stop and start it); `None` when it is an
/// external one this process may not stop.
pub fn mariadb_alone() -> (RwLockWriteGuard<'static, ()>, Option<&'static Server>) {
    let guard = USE.write().unwrap_or_else(|p| p.into_inner());
    let server = Server::shared();
    (guard, server.is_local().then_some(server))
}
