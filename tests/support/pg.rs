//! A throwaway PostgreSQL for the centralized driver's tests.
//!
//! One cluster per test process: `initdb` + `pg_ctl` in a temporary
//! directory (run as the `postgres` user when the tests run as root), a
//! Unix socket there and a free loopback port, stopped when the process
//! exits. `IMAGE_CACHE_TEST_POSTGRES=postgresql://admin@host/db` uses a
//! running server instead (the admin may create roles and databases).
//! Without either the tests fail and say how to install the server.
//!
//! Drivers connect over TCP as the role `glance` with a password (so the
//! tests see that no error ever shows it), each test in a database of its
//! own. Our own cluster takes TCP connections over TLS only (`hostssl`),
//! with a server certificate for `localhost` signed by a CA made here
//! ([`Cluster::tls_ca`]); the Unix socket the tests administer it by is
//! plain.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard};

use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings};

/// The server binaries' directory on Debian (postgresql-15).
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
/// A running server to use instead of starting one.
pub const PG_ENV: &str = "IMAGE_CACHE_TEST_POSTGRES";
/// The drivers' role and its password: the tests look for it in messages.
pub const ROLE: &str = "glance";
pub const PASSWORD: &str = "Pw-9f3c2e-s3cr3t";

/// Make a CA and a server certificate for `localhost`, turn TLS on, and
/// refuse TCP connections without it. The CA's PEM file.
fn serve_tls_only(data: &Path, dir: &Path, as_postgres: bool) -> PathBuf {
    let ca_file = crate::tls::localhost_certificate(data, dir, "image-cache test CA");
    let conf = data.join("postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).expect("postgresql.conf");
    text.push_str("\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
    std::fs::write(&conf, text).expect("postgresql.conf");
    let hba = data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    let mut out = String::new();
    for line in text.lines() {
        match line.strip_prefix("host ") {
            Some(rest) => out.push_str(&format!("hostssl {rest}\n")),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out.push_str("hostnossl all all all reject\n");
    std::fs::write(&hba, out).expect("pg_hba.conf");
    if as_postgres {
        run(
            {
                let mut c = Command::new("chown");
                c.args(["-R", "postgres:postgres"]).arg(data);
                c
            },
            "chown of the cluster's TLS files",
        );
    }
    ca_file
}

/// A PostgreSQL server the tests administer.
pub struct Cluster {
    /// psql connection string of an administrator.
    admin: String,
    /// Host and port drivers connect to (TCP).
    host: String,
    port: u16,
    /// Our own cluster's data directory and binaries (none: external).
    local: Option<Local>,
}

struct Local {
    dir: PathBuf,
    data: PathBuf,
    bin: PathBuf,
    as_postgres: bool,
    /// The CA that signed the server's certificate.
    ca: PathBuf,
}

static CLUSTERS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

extern "C" fn stop_clusters() {
    let dirs = CLUSTERS.lock().map(|d| d.clone()).unwrap_or_default();
    for dir in dirs {
        let data = dir.join("data");
        let _ = pg_command(&Path::new(PG_BIN).join("pg_ctl"), is_root())
            .args(["stop", "-m", "immediate", "-D"])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Clusters of test processes that were killed (no `atexit` ran): stopped
/// and removed by the next test process.
fn stop_abandoned_clusters(as_postgres: bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let named = entry
            .file_name()
            .to_string_lossy()
            .starts_with("image-cache-pg-");
        let Ok(owner) = std::fs::read_to_string(dir.join("owner.pid")) else {
            continue;
        };
        let alive = Path::new("/proc").join(owner.trim()).exists();
        if named && !alive {
            let _ = pg_command(&Path::new(PG_BIN).join("pg_ctl"), as_postgres)
                .args(["stop", "-m", "immediate", "-D"])
                .arg(dir.join("data"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

fn is_root() -> bool {
    // SAFETY: a plain system call without arguments.
    unsafe { libc::geteuid() == 0 }
}

/// A command run as the `postgres` user when we are root (the server
/// refuses to run as root).
fn pg_command(program: &Path, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Cluster {
    /// The cluster shared by this test process.
    pub fn shared() -> &'static Cluster {
        static SHARED: OnceLock<Cluster> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var(PG_ENV) {
            Ok(url) if !url.trim().is_empty() => Cluster::external(url.trim()),
            _ => Cluster::start_local(),
        })
    }

    /// A cluster this process started and may stop: the shared one, or,
    /// when the shared one is external, one of its own.
    pub fn local() -> &'static Cluster {
        static LOCAL: OnceLock<Cluster> = OnceLock::new();
        let shared = Cluster::shared();
        if shared.local.is_some() {
            return shared;
        }
        LOCAL.get_or_init(Cluster::start_local)
    }

    fn external(url: &str) -> Cluster {
        let (host, port) = host_port(url);
        let c = Cluster {
            admin: url.to_string(),
            host,
            port,
            local: None,
        };
        c.create_role();
        c
    }

    fn start_local() -> Cluster {
        let bin = PathBuf::from(PG_BIN);
        if !bin.join("initdb").exists() || !bin.join("pg_ctl").exists() {
            panic!(
                "PostgreSQL server binaries are missing ({PG_BIN}/initdb): the centralized \
                 driver's tests need a real server. Install it with \
                 `apt-get install -y postgresql-15`, or point {PG_ENV} at a running server \
                 (postgresql://admin@host:port/postgres)"
            );
        }
        let as_postgres = is_root();
        stop_abandoned_clusters(as_postgres);
        let dir = tempfile::Builder::new()
            .prefix("image-cache-pg-")
            .tempdir()
            .expect("temp dir")
            .keep();
        std::fs::write(dir.join("owner.pid"), std::process::id().to_string())
            .expect("writing owner.pid");
        {
            let mut dirs = CLUSTERS.lock().unwrap();
            if dirs.is_empty() {
                // SAFETY: registers a plain extern "C" function.
                unsafe { libc::atexit(stop_clusters) };
            }
            dirs.push(dir.clone());
        }
        if as_postgres {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:postgres"]).arg(&dir);
                    c
                },
                "chown of the cluster directory",
            );
        }
        let data = dir.join("data");
        let mut initdb = pg_command(&bin.join("initdb"), as_postgres);
        initdb
            .args(["-U", "postgres", "-E", "UTF8", "--no-sync", "-A", "trust"])
            .arg("--auth-host=scram-sha-256")
            .arg("-D")
            .arg(&data);
        run(initdb, "initdb");
        let ca = serve_tls_only(&data, &dir, as_postgres);
        let port = free_port();
        let local = Local {
            dir: dir.clone(),
            data,
            bin,
            as_postgres,
            ca,
        };
        let c = Cluster {
            admin: format!(
                "host={} port={port} user=postgres dbname=postgres",
                dir.display()
            ),
            host: "127.0.0.1".to_string(),
            port,
            local: Some(local),
        };
        c.start();
        c.create_role();
        c
    }

    /// Start our cluster (again), waiting until it takes connections.
    pub fn start(&self) {
        let local = self.local.as_ref().expect("a cluster of our own");
        let mut pg_ctl = pg_command(&local.bin.join("pg_ctl"), local.as_postgres);
        pg_ctl
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&local.data)
            .arg("-l")
            .arg(local.dir.join("server.log"))
            .arg("-o")
            .arg(format!(
                // fsync off: the kernel keeps what a crashed server wrote;
                // commits are still synchronous, so an immediate stop loses
                // nothing that was committed.
                "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
                self.port,
                local.dir.display()
            ))
            .stdout(Stdio::null());
        run(pg_ctl, "pg_ctl start");
    }

    /// Stop our cluster at once (connections are cut, as in a crash).
    pub fn stop(&self) {
        let local = self.local.as_ref().expect("a cluster of our own");
        let mut pg_ctl = pg_command(&local.bin.join("pg_ctl"), local.as_postgres);
        pg_ctl
            .args(["stop", "-w", "-m", "immediate", "-D"])
            .arg(&local.data)
            .stdout(Stdio::null());
        run(pg_ctl, "pg_ctl stop");
    }

    /// The CA of our cluster's TLS certificate (`None` for an external
    /// server, whose TLS is its own business).
    pub fn tls_ca(&self) -> Option<&Path> {
        self.local.as_ref().map(|l| l.ca.as_path())
    }

    /// Run SQL as the administrator in `database`.
    pub fn admin_sql(&self, database: &str, sql: &str) -> String {
        let psql = match &self.local {
            Some(l) => l.bin.join("psql"),
            None => PathBuf::from("psql"),
        };
        let conninfo = if self.local.is_some() {
            format!(
                "{} dbname={database}",
                self.admin.replace(" dbname=postgres", "")
            )
        } else {
            with_database(&self.admin, database)
        };
        let out = Command::new(&psql)
            .arg(conninfo)
            .args(["-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", psql.display()));
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn create_role(&self) {
        self.admin_sql(
            "postgres",
            &format!(
                "DO $$ BEGIN \
                   IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{ROLE}') THEN \
                     CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'; \
                   END IF; END $$"
            ),
        );
        if self.local.is_some() {
            // The superuser over TCP too, for the test that it is refused.
            self.admin_sql(
                "postgres",
                &format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"),
            );
        }
    }

    /// A new database as an operator sets it up for the cache: owned by the
    /// administrator, Glance's two cache tables in it (made as its
    /// migrations make them), and the drivers' role fenced by exactly the
    /// privileges `image-cache db grants` prints.
    pub fn database(&'static self) -> TestDatabase {
        let db = self.new_database("");
        db.sql(image_cache::database::postgres::GLANCE_CACHE_SCHEMA);
        db.grant_cache_privileges(ROLE);
        db
    }

    /// A new, empty database owned by the drivers' role (for tests of the
    /// statement checks, which need a role that may create tables; its
    /// connections must allow a privileged role).
    pub fn owned_database(&'static self) -> TestDatabase {
        self.new_database(&format!(" OWNER {ROLE}"))
    }

    /// A new, empty database without Glance's tables, owned by the
    /// administrator, the drivers' role allowed to connect only.
    pub fn bare_database(&'static self) -> TestDatabase {
        let db = self.new_database("");
        db.sql(&format!("GRANT CONNECT ON DATABASE {} TO {ROLE}", db.name));
        db
    }

    fn new_database(&'static self, owner: &str) -> TestDatabase {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ic_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        self.admin_sql("postgres", &format!("CREATE DATABASE {name}{owner}"));
        TestDatabase {
            cluster: self,
            name: name.clone(),
            url: format!(
                "postgresql://{ROLE}:{PASSWORD}@{}:{}/{name}",
                self.host, self.port
            ),
            superuser_url: self.local.as_ref().map(|_| {
                format!(
                    "postgresql://postgres:{PASSWORD}@{}:{}/{name}",
                    self.host, self.port
                )
            }),
        }
    }
}

fn host_port(url: &str) -> (String, u16) {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or("");
    let hostport = authority.rsplit('@').next().unwrap_or("");
    match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().unwrap_or(5432)),
        None => (hostport.to_string(), 5432),
    }
}

fn with_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let prefix = match base.find("://").map(|i| i + 3) {
        Some(start) => match base[start..].find('/') {
            Some(slash) => &base[..start + slash],
            None => base,
        },
        None => base,
    };
    format!("{prefix}/{database}{query}")
}

/// A database of one test.
#[derive(Clone)]
pub struct TestDatabase {
    cluster: &'static Cluster,
    pub name: String,
    /// As the drivers' role, with its password, over TCP.
    pub url: String,
    /// As the cluster's superuser (our own cluster only).
    pub superuser_url: Option<String>,
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
        self.cluster.admin_sql(&self.name, sql)
    }

    /// Run what `image-cache db grants` prints for `role` (the role exists).
    pub fn grant_cache_privileges(&self, role: &str) {
        let statements = image_cache::database::postgres::grant_statements(role, &self.name);
        self.sql(&statements.join("\n"));
    }

    /// This database's connections with a role that has more than a cache
    /// driver needs allowed (the statement-check tests).
    pub fn privileged_root(&self) -> Arc<DatabaseRoot> {
        let mut settings = DatabaseSettings::new(self.url.clone());
        settings.allow_privileged_role = true;
        self.root_with(settings)
    }
}

/// Tests share the cluster; the one that stops it has it alone.
static USE: RwLock<()> = RwLock::new(());

/// The shared cluster, held up for the life of the guard.
pub fn postgres() -> (RwLockReadGuard<'static, ()>, &'static Cluster) {
    let guard = USE.read().unwrap_or_else(|p| p.into_inner());
    (guard, Cluster::shared())
}

/// The cluster this process started, alone (to stop and start it).
pub fn postgres_alone() -> (RwLockWriteGuard<'static, ()>, &'static Cluster) {
    let guard = USE.write().unwrap_or_else(|p| p.into_inner());
    (guard, Cluster::local())
}
