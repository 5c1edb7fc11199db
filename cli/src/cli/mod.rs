//! The command line: arguments, settings (flag/environment > config file >
//! defaults), logging, and how failures become exit codes.
//!
//! Exit codes: 0 success, 1 an operational error, 2 a usage error. Every
//! failure is one line on stderr, `image-cache: error: ...`.

mod commands;
pub(crate) mod format;
mod oci;
mod progress;
mod serve;
mod warm;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use image_cache::cache::{DEFAULT_MAX_SIZE, DEFAULT_STALL_TIME};
use image_cache::config::{Options, parse_duration, parse_size};
use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings};
use image_cache::limits::DEFAULT_SQLITE_DB;
use image_cache::signature::TrustedKeys;
use image_cache::{CacheConfig, Checksum, DriverSource, Grants, ImageCache, LoadPolicy};
use std::sync::Arc;

/// Manage an image cache directory (Glance's image cache): list, cache,
/// read, queue, prefetch, prune and clean images. The directory's driver
/// (sqlite or xattr, or a third-party WebAssembly component) keeps the
/// metadata; an existing Glance cache directory works as it is.
#[derive(Parser, Debug)]
#[command(name = "image-cache", version, max_term_width = 100)]
#[command(
    after_help = "Settings come from flags, then environment variables, then the \
--config file ([DEFAULT] image_cache_dir, image_cache_driver, image_cache_max_size, \
image_cache_stall_time, image_cache_sqlite_db, worker_self_reference_url, \
image_cache_database_url, image_cache_database_allow_privileged_role; [database] connection), \
then the defaults.\n\n\
Exit status: 0 success, 1 an operation failed, 2 a usage error."
)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
struct Global {
    /// The cache directory (image_cache_dir).
    #[arg(long, env = "IMAGE_CACHE_DIR", value_name = "DIR", global = true)]
    dir: Option<PathBuf>,

    /// The driver: sqlite (default), xattr, the path of a driver
    /// component (.wasm), or a component in an OCI registry,
    /// oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST], pulled into the
    /// --driver-store (image_cache_driver).
    #[arg(long, env = "IMAGE_CACHE_DRIVER", value_name = "DRIVER", global = true)]
    driver: Option<String>,

    /// A glance-cache.conf style INI file whose [DEFAULT] section gives the
    /// image_cache_* options.
    #[arg(long, env = "IMAGE_CACHE_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,

    /// The sqlite driver's database file in the cache directory
    /// (image_cache_sqlite_db; default cache.db).
    #[arg(
        long,
        env = "IMAGE_CACHE_SQLITE_DB",
        value_name = "NAME",
        global = true
    )]
    sqlite_db: Option<String>,

    /// Fail instead of falling back to the sqlite driver when the chosen
    /// driver cannot use the directory.
    #[arg(long, global = true)]
    no_fallback: bool,

    /// The SHA-256 (hex) a --driver component file must have; anything
    /// else is refused before it is compiled (image_cache_driver_sha256).
    #[arg(
        long,
        env = "IMAGE_CACHE_DRIVER_SHA256",
        value_name = "HEX",
        global = true
    )]
    driver_sha256: Option<String>,

    /// What a --driver component file is granted beyond fs and clock, e.g.
    /// `xattr` or `xattr,database` (image_cache_driver_grants; default
    /// none). Built-in drivers get what they need.
    #[arg(
        long,
        env = "IMAGE_CACHE_DRIVER_GRANTS",
        value_name = "LIST",
        global = true
    )]
    driver_grants: Option<String>,

    /// A public key file a --driver component file must be signed by;
    /// repeat it (or separate files with commas) to trust several keys.
    /// An unsigned or wrongly signed component is refused before it is
    /// compiled; built-in drivers are part of this binary and always
    /// trusted (image_cache_driver_trusted_keys; default: signatures are
    /// not checked).
    #[arg(
        long,
        env = "IMAGE_CACHE_DRIVER_TRUST",
        value_name = "KEYFILE",
        value_delimiter = ',',
        global = true
    )]
    driver_trust: Vec<PathBuf>,

    /// Where components pulled from OCI registries are kept, by SHA-256
    /// (default: $XDG_CACHE_HOME/image-cache/drivers, else
    /// ~/.cache/image-cache/drivers).
    #[arg(
        long,
        env = "IMAGE_CACHE_DRIVER_STORE",
        value_name = "DIR",
        global = true
    )]
    driver_store: Option<PathBuf>,

    /// Talk plain HTTP, not HTTPS, to the OCI registry of `drivers pull`,
    /// `drivers push` and --driver oci://... (a registry on loopback or a
    /// trusted network only).
    #[arg(long, global = true)]
    plain_http: bool,

    /// The centralized driver's database, as a URL: PostgreSQL
    /// (postgresql://user:password@host/db, or Glance's SQLAlchemy form
    /// postgresql+psycopg2://...) or MySQL/MariaDB
    /// (mysql+pymysql://user:password@host/db) (image_cache_database_url;
    /// else the config file's [database] connection). Never shown in
    /// output.
    #[arg(
        long,
        env = "IMAGE_CACHE_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL",
        global = true
    )]
    database_url: Option<String>,

    /// Most connections this process holds to the centralized driver's
    /// database (image_cache_database_pool_size; else the config file's
    /// [database] max_pool_size; default 4). Size it so that every node's
    /// pool, plus Glance's own, fits the server's max_connections.
    #[arg(
        long,
        env = "IMAGE_CACHE_DATABASE_POOL_SIZE",
        value_name = "N",
        value_parser = image_cache::config::parse_pool_size,
        global = true
    )]
    database_pool_size: Option<usize>,

    /// The database server's bound on one statement, lock wait and idle
    /// transaction (image_cache_database_statement_timeout; default: the
    /// driver call's deadline, 30s).
    #[arg(
        long,
        env = "IMAGE_CACHE_DATABASE_STATEMENT_TIMEOUT",
        value_name = "DURATION",
        value_parser = parse_duration,
        global = true
    )]
    database_statement_timeout: Option<Duration>,

    /// How long opening a database connection may take
    /// (image_cache_database_connect_timeout; default 10s).
    #[arg(
        long,
        env = "IMAGE_CACHE_DATABASE_CONNECT_TIMEOUT",
        value_name = "DURATION",
        value_parser = parse_duration,
        global = true
    )]
    database_connect_timeout: Option<Duration>,

    /// This node's name in the centralized driver's shared database
    /// (Glance's worker_self_reference_url, e.g. http://glance-api-1:9292).
    #[arg(
        long,
        env = "IMAGE_CACHE_WORKER_SELF_REFERENCE_URL",
        value_name = "URL",
        global = true
    )]
    worker_self_reference_url: Option<String>,

    /// Machine-readable output: one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,

    /// More log output on stderr (-v info, -vv debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, conflicts_with = "quiet")]
    verbose: u8,

    /// Only errors on stderr (no warnings).
    #[arg(short, long, global = true)]
    quiet: bool,
}

// Parsed once at start-up; the serve variant's size does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// List the cached images: id, size, hits, last accessed and last
    /// modified (local times), and the total.
    ListCached,

    /// List the images queued for prefetching, oldest first.
    ListQueued,

    /// Queue images for prefetching (see `prefetch`). An image already
    /// cached, being cached or queued is reported and left alone.
    Queue {
        /// Image ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
    },

    /// Remove an image from the prefetch queue; fails if it is not queued.
    DeleteQueued {
        /// Image id.
        id: String,
    },

    /// Empty the prefetch queue.
    DeleteAllQueued,

    /// Cache an image from a file or standard input. Nothing is cached if
    /// the source fails or the checksum does not match.
    Cache {
        /// Image id.
        id: String,
        /// The image bytes: a file, or `-` for standard input.
        #[arg(long, value_name = "FILE|-")]
        from: PathBuf,
        /// The expected digest: md5:HEX, sha256:HEX or sha512:HEX.
        #[arg(long, value_name = "ALGO:HEX", value_parser = parse_checksum)]
        checksum: Option<Checksum>,
    },

    /// Write a cached image to stdout or a file, counting a hit.
    Read {
        /// Image id.
        id: String,
        /// Write to FILE (through a temporary file beside it, renamed when
        /// complete) instead of stdout.
        #[arg(long, value_name = "FILE")]
        to: Option<PathBuf>,
    },

    /// Delete one cached image; fails if it is not cached.
    DeleteCached {
        /// Image id.
        id: String,
    },

    /// Delete every cached image. Asks for confirmation on a terminal;
    /// elsewhere --force is required.
    DeleteAllCached {
        /// Do not ask.
        #[arg(long, short)]
        force: bool,
    },

    /// Evict least recently accessed images until the cache is at or under
    /// the maximum size (Glance's pruner).
    Prune {
        /// The maximum size, e.g. 10G, 512MiB, 1048576 (default:
        /// image_cache_max_size, or 10 GiB). 0 empties the cache.
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max_size: Option<u64>,
    },

    /// Remove invalid files and stalled incomplete ones (Glance's cleaner).
    Clean {
        /// Incomplete files older than this are stalled, e.g. 3600, 1h, 1d
        /// (default: image_cache_stall_time, or 1 day).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        stall_time: Option<Duration>,
    },

    /// Cache every queued image whose file DIR/<id> exists (Glance's
    /// prefetcher, with a local directory as the image store). Images that
    /// fail stay queued; the exit status is 1 if any failed.
    Prefetch {
        /// The directory holding the images, one file per image id.
        #[arg(long, value_name = "DIR")]
        source: PathBuf,
    },

    /// Show whether an image is cached, being cached, queued or absent,
    /// with its size and hits.
    Status {
        /// Image id.
        id: String,
    },

    /// Show the total size of the cached images.
    Size,

    /// List the nodes whose caches hold an image (the centralized driver:
    /// their worker_self_reference_url), like Glance's
    /// GET /v2/cache/nodes/{image_id}.
    Nodes {
        /// Image id.
        id: String,
    },

    /// List the built-in drivers: contract version, imports, grants and
    /// SHA-256 of each component; `inspect PATH` for a component file;
    /// `keygen`, `sign` and `verify` for driver signatures; `pull` and
    /// `push` for components in OCI registries.
    Drivers {
        #[command(subcommand)]
        action: Option<DriversAction>,
    },

    /// The shared database of the centralized driver: the SQL that gives the
    /// cache a role fenced by the database's own privileges, or Glance's two
    /// cache tables for a database of the cache's own.
    Db {
        #[command(subcommand)]
        action: DbAction,
    },

    /// Serve the cache over HTTP: image downloads (GET/HEAD
    /// /v2/images/ID/file) with pull-through caching from an upstream,
    /// Glance's cache management API, prefetch/prune/clean on intervals,
    /// /healthz and /metrics.
    Serve(serve::ServeArgs),

    /// Ask a running server to fill images before they are needed (ids,
    /// the most-hit of the last days, or a Glance property), on itself or
    /// fanned out to other nodes, with a concurrency limit; prints
    /// progress on stderr and the final report; exit 1 if an image failed.
    Warm(warm::WarmArgs),

    /// Print every command and option as Markdown, from these definitions:
    /// the book's CLI reference (docs/src/reference/cli.md).
    #[command(hide = true)]
    HelpReference,
}

#[derive(Subcommand, Debug)]
pub enum DbAction {
    /// Print the SQL an administrator runs, in Glance's database, to give
    /// the cache a dedicated role: SELECT, INSERT, UPDATE, DELETE on
    /// cached_images and node_reference (on PostgreSQL, USAGE on their
    /// sequences), nothing else. The host refuses any role with more.
    Grants {
        /// The role's name (on MySQL, `user` or `user@host`; the host part
        /// is `%` unless given).
        #[arg(long, default_value = "image_cache")]
        role: String,
        /// The database's name.
        #[arg(long, default_value = "glance")]
        database: String,
        /// MySQL or MariaDB statements (the default follows the configured
        /// --database-url, else PostgreSQL).
        #[arg(long)]
        mysql: bool,
    },
    /// Create Glance's two cache tables (as its migrations would) in the
    /// configured database (--database-url, which must name a role allowed
    /// to create tables), for a database of the cache's own. Where Glance
    /// runs, `glance-manage db sync` makes them instead. Idempotent.
    Init,
}

#[derive(Subcommand, Debug)]
pub enum DriversAction {
    /// Show what a driver component is before running it: its name and
    /// version, contract version, imports, the grants it needs, its
    /// SHA-256 (to pin with --driver-sha256) and who signed it.
    Inspect {
        /// The component file (.wasm).
        path: PathBuf,
    },

    /// Make an Ed25519 key pair to sign drivers with (wasmsign2's key
    /// format): the secret key (file mode 0600) stays with whoever signs,
    /// the public key goes to the hosts (--driver-trust). Existing files
    /// are never overwritten.
    Keygen {
        /// Where the secret key goes.
        #[arg(long, value_name = "FILE")]
        secret_key: PathBuf,
        /// Where the public key goes.
        #[arg(long, value_name = "FILE")]
        public_key: PathBuf,
    },

    /// Sign a driver component (the WebAssembly tool-conventions signature
    /// format, as wasmsign2 writes it), adding to the signatures it
    /// carries. The signature is embedded in the component (replaced
    /// through a temporary file, renamed when complete), so it travels
    /// with it; --detached leaves the component as it is and writes
    /// COMPONENT.sig instead.
    Sign {
        /// The secret key file (from `drivers keygen`, or wasmsign2's,
        /// DER or PEM).
        #[arg(long, value_name = "SECRET_KEY_FILE")]
        key: PathBuf,
        /// Write the signature to COMPONENT.sig (or --output), not into
        /// the component.
        #[arg(long)]
        detached: bool,
        /// Write the signed component (with --detached: the signature) to
        /// this file instead.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// The component file (.wasm).
        component: PathBuf,
    },

    /// Check a component's signatures (embedded, else COMPONENT.sig)
    /// against public keys: the key ids found and which key verifies it.
    /// Exit status 1 if none does.
    Verify {
        /// A public key file; repeat for several (default: the
        /// --driver-trust keys).
        #[arg(long, value_name = "PUBLIC_KEY_FILE")]
        key: Vec<PathBuf>,
        /// The component file (.wasm).
        component: PathBuf,
    },

    /// Fetch a driver component from an OCI registry (the layout wkg
    /// publishes) into the --driver-store, checked against its digests:
    /// the manifest's, if the reference pins one, and the component's. With
    /// --driver-trust it must be signed by a trusted key, or it is not
    /// stored. Prints the stored file, its SHA-256 and the reference
    /// pinned by digest.
    Pull {
        /// oci://REGISTRY/REPOSITORY[:TAG][@sha256:DIGEST] (no tag and no
        /// digest: the tag latest).
        #[arg(value_name = "OCI_REFERENCE")]
        reference: String,
    },

    /// Publish a driver component to an OCI registry in wkg's layout
    /// (anonymous access: the registry must accept the push). Prints the
    /// manifest's digest, to pin with oci://...@sha256:DIGEST.
    Push {
        /// The component file (.wasm); sign it first (`drivers sign`) for
        /// hosts that trust keys: the signature is embedded and travels
        /// with it.
        component: PathBuf,
        /// oci://REGISTRY/REPOSITORY:TAG
        #[arg(value_name = "OCI_REFERENCE")]
        reference: String,
    },
}

/// A SHA-256 as 64 hex digits (any case), lowercased.
fn parse_sha256(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(s.to_ascii_lowercase())
    } else {
        Err(format!(
            "image_cache_driver_sha256 {s:?} is not a SHA-256 (64 hex digits, as `image-cache drivers inspect` prints)"
        ))
    }
}

fn parse_checksum(s: &str) -> Result<Checksum, String> {
    s.parse()
}

/// Why the tool stops without success.
#[derive(Debug)]
pub enum Failure {
    /// The invocation or the configuration is wrong: exit 2.
    Usage(String),
    /// An operation failed: exit 1, or the code of its kind ([`exit_code`]):
    /// not found, a full disk, access denied, too many files, the database.
    /// `kind` is the library's error kind (or the CLI's own) for the
    /// `--json` error document, `io_code` the file-system
    /// error code of an `io` error.
    Op {
        kind: &'static str,
        message: String,
        io_code: Option<&'static str>,
    },
    /// The command already printed its (partial) result; exit 1 with this
    /// line on stderr and no JSON error document.
    Reported(String),
    /// stdout was closed by the reader (`| head`): stop quietly.
    BrokenPipe,
}

/// The exit code of an operation that failed because the disk (or a quota)
/// is full: a script can tell "make room" from other failures.
pub const EXIT_NO_SPACE: u8 = 4;

/// The exit code of an operation that failed because the driver's database
/// could not be used (down, unreachable, a statement refused): an outage is
/// not a configuration to fix.
pub const EXIT_DATABASE: u8 = 5;

/// The exit code of an operation on something that is not there: an image
/// not cached or not queued, a file not found.
pub const EXIT_NOT_FOUND: u8 = 3;

/// The exit code of an operation the file system refused for permissions
/// (the cache directory's owner or modes are wrong).
pub const EXIT_ACCESS_DENIED: u8 = 6;

/// The exit code of an operation that ran out of file descriptors (the
/// process's or the system's open-files limit).
pub const EXIT_TOO_MANY_FILES: u8 = 7;

/// The exit code of a failed operation, from its error kind and, for an
/// `io` error, its file-system code.
pub fn exit_code(kind: &str, io_code: Option<&str>) -> u8 {
    match (kind, io_code) {
        (_, Some("no-space")) => EXIT_NO_SPACE,
        (_, Some("access-denied")) => EXIT_ACCESS_DENIED,
        (_, Some("limit-exceeded")) => EXIT_TOO_MANY_FILES,
        (_, Some("not-found")) | ("not-found" | "not-queued", _) => EXIT_NOT_FOUND,
        ("database", _) => EXIT_DATABASE,
        _ => 1,
    }
}

impl Failure {
    pub fn op(kind: &'static str, message: impl Into<String>) -> Failure {
        Failure::Op {
            kind,
            message: message.into(),
            io_code: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Usage(m) | Failure::Op { message: m, .. } | Failure::Reported(m) => {
                f.write_str(m)
            }
            Failure::BrokenPipe => f.write_str("stdout was closed"),
        }
    }
}

impl From<image_cache_serve::ServeError> for Failure {
    fn from(e: image_cache_serve::ServeError) -> Failure {
        use image_cache_serve::ServeError;
        match e {
            ServeError::Config(m) => Failure::Usage(m),
            ServeError::Io { .. } => Failure::op("io", e.to_string()),
            ServeError::Cache(e) => e.into(),
        }
    }
}

impl From<image_cache::Error> for Failure {
    fn from(e: image_cache::Error) -> Failure {
        Failure::Op {
            kind: e.kind(),
            message: e.to_string(),
            io_code: e.io_code(),
        }
    }
}

/// A library error's message without its kind's prefix (`bad
/// configuration: `, `database error: `), for a failure that words its
/// kind itself.
fn own_words(e: image_cache::Error) -> String {
    match e {
        image_cache::Error::BadConfiguration(m) | image_cache::Error::Database(m) => m,
        other => other.to_string(),
    }
}

/// A failed write to stdout.
pub fn stdout_failure(e: io::Error) -> Failure {
    if e.kind() == io::ErrorKind::BrokenPipe {
        Failure::BrokenPipe
    } else {
        Failure::op("io", format!("writing to stdout: {e}"))
    }
}

/// `writeln!` to stdout, returning a [`Failure`] from the function.
macro_rules! outln {
    ($out:expr) => {
        writeln!($out).map_err($crate::cli::stdout_failure)?
    };
    ($out:expr, $($arg:tt)*) => {
        writeln!($out, $($arg)*).map_err($crate::cli::stdout_failure)?
    };
}
pub(crate) use outln;

/// Settings after flags, environment, config file and defaults.
pub struct Settings {
    pub dir: Option<PathBuf>,
    pub driver: String,
    pub sqlite_db: String,
    pub no_fallback: bool,
    /// Pin of a component file driver.
    pub driver_sha256: Option<String>,
    /// Grants of a component file driver.
    pub grants: Grants,
    /// The public key files a component file driver must be signed by
    /// (none: signatures are not checked).
    pub driver_trust: Vec<PathBuf>,
    /// Where components pulled from registries are kept.
    pub driver_store: Option<PathBuf>,
    /// Plain HTTP to OCI registries.
    pub plain_http: bool,
    pub max_size: u64,
    pub stall_time: Duration,
    /// The centralized driver's database URL (never printed).
    database_url: Option<String>,
    database_pool_size: Option<usize>,
    database_statement_timeout: Option<Duration>,
    database_connect_timeout: Option<Duration>,
    pub worker_self_reference_url: Option<String>,
    allow_privileged_role: bool,
    pub json: bool,
    pub quiet: bool,
    /// Where the directory came from, for messages.
    config_file: Option<PathBuf>,
    /// glance-api.conf's `bind_host`, `bind_port` and
    /// `cache_prefetcher_interval`, for `serve`.
    pub bind_host: Option<String>,
    pub bind_port: Option<u16>,
    pub prefetch_interval: Option<Duration>,
    /// `image_cache_fail_policy`, for `serve`.
    pub fail_policy: Option<image_cache::FailPolicy>,
}

impl Settings {
    fn resolve(global: &Global) -> Result<Settings, Failure> {
        let file = match &global.config {
            Some(path) => Options::from_ini_file(path)
                .map_err(|e| Failure::Usage(format!("config file {e}")))?,
            None => Options::default(),
        };
        let flags = Options {
            image_cache_dir: global.dir.clone(),
            image_cache_driver: global.driver.clone(),
            image_cache_sqlite_db: global.sqlite_db.clone(),
            image_cache_driver_sha256: global.driver_sha256.clone(),
            image_cache_driver_grants: global.driver_grants.clone(),
            image_cache_driver_trusted_keys: Some(
                global
                    .driver_trust
                    .iter()
                    .filter(|p| !p.as_os_str().is_empty())
                    .cloned()
                    .collect::<Vec<_>>(),
            )
            .filter(|keys| !keys.is_empty()),
            image_cache_database_url: global.database_url.clone(),
            image_cache_database_pool_size: global.database_pool_size,
            image_cache_database_statement_timeout: global.database_statement_timeout,
            image_cache_database_connect_timeout: global.database_connect_timeout,
            worker_self_reference_url: global.worker_self_reference_url.clone(),
            ..Options::default()
        };
        let o = flags.or(file);
        let database_url = o.database_url().map(str::to_string);
        let database_pool_size = o.database_pool_size();
        let driver = o
            .image_cache_driver
            .filter(|d| !d.trim().is_empty())
            .unwrap_or_else(|| "sqlite".to_string());
        Ok(Settings {
            dir: o.image_cache_dir.filter(|d| !d.as_os_str().is_empty()),
            driver: driver.trim().to_string(),
            sqlite_db: o
                .image_cache_sqlite_db
                .unwrap_or_else(|| DEFAULT_SQLITE_DB.to_string()),
            no_fallback: global.no_fallback,
            driver_sha256: match o.image_cache_driver_sha256 {
                Some(hex) => Some(parse_sha256(&hex).map_err(Failure::Usage)?),
                None => None,
            },
            grants: Grants::parse(o.image_cache_driver_grants.as_deref().unwrap_or(""))
                .map_err(|e| Failure::Usage(format!("image_cache_driver_grants: {e}")))?,
            driver_trust: o.image_cache_driver_trusted_keys.unwrap_or_default(),
            driver_store: global
                .driver_store
                .clone()
                .filter(|d| !d.as_os_str().is_empty())
                .or_else(oci::default_store),
            plain_http: global.plain_http,
            max_size: o.image_cache_max_size.unwrap_or(DEFAULT_MAX_SIZE),
            stall_time: o.image_cache_stall_time.unwrap_or(DEFAULT_STALL_TIME),
            database_url,
            database_pool_size,
            database_statement_timeout: o.image_cache_database_statement_timeout,
            database_connect_timeout: o.image_cache_database_connect_timeout,
            worker_self_reference_url: o
                .worker_self_reference_url
                .clone()
                .filter(|u| !u.trim().is_empty()),
            allow_privileged_role: o
                .image_cache_database_allow_privileged_role
                .unwrap_or(false),
            json: global.json,
            quiet: global.quiet,
            config_file: global.config.clone(),
            bind_host: o.bind_host,
            bind_port: o.bind_port,
            prefetch_interval: o.cache_prefetcher_interval,
            fail_policy: o.image_cache_fail_policy,
        })
    }

    /// The driver the settings name. A bare word that is neither a built-in
    /// driver nor an existing file is a typo, not a component path.
    /// The shared database's URL, if one is configured.
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// A component in a registry (`oci://...`) is pulled into the store
    /// first (or found there, when pinned by a digest it holds) and is
    /// then a component file like any other: pinned, granted and its
    /// signature checked as one.
    pub fn driver_source(&self) -> Result<DriverSource, Failure> {
        self.resolve_driver(&self.driver)
    }

    /// A driver by name: built-in, a component file, or `oci://...`.
    pub fn resolve_driver(&self, spec: &str) -> Result<DriverSource, Failure> {
        if oci::is_oci(spec) {
            let pulled = self.pull(spec)?;
            log::info!(
                "driver {spec} is {} (sha256 {})",
                pulled.path.display(),
                pulled.sha256
            );
            return Ok(DriverSource::File(pulled.path));
        }
        DriverSource::named(spec).map_err(|e| Failure::Usage(e.to_string()))
    }

    /// What `serve`'s swap endpoint resolves names with: these settings'
    /// store, registry protocol and trusted keys.
    pub fn driver_resolver(&self) -> Result<image_cache_serve::DriverResolver, Failure> {
        let (store, plain_http, keys) = (
            self.driver_store.clone(),
            self.plain_http,
            self.trusted_keys()?,
        );
        Ok(image_cache_serve::DriverResolver(Arc::new(
            move |spec: &str| {
                if !oci::is_oci(spec) {
                    return DriverSource::named(spec).map_err(|e| e.to_string());
                }
                let store = store.as_deref().ok_or_else(|| {
                    "no driver store for oci:// drivers (--driver-store)".to_string()
                })?;
                let reference = oci::parse(spec).map_err(|e| e.to_string())?;
                oci::pull(&reference, plain_http, store, keys.as_deref())
                    .map(|p| DriverSource::File(p.path))
                    .map_err(|e| e.to_string())
            },
        )))
    }

    /// The driver store, or a usage error saying how to name one.
    fn driver_store(&self) -> Result<&std::path::Path, Failure> {
        self.driver_store.as_deref().ok_or_else(|| {
            Failure::Usage(
                "no driver store: give --driver-store DIR, set IMAGE_CACHE_DRIVER_STORE, or \
                 set XDG_CACHE_HOME or HOME"
                    .into(),
            )
        })
    }

    /// Pull an `oci://` reference into the store, under the trusted keys
    /// if any.
    fn pull(&self, reference: &str) -> Result<oci::Pulled, Failure> {
        let reference = oci::parse(reference)?;
        let keys = self.trusted_keys()?;
        oci::pull(
            &reference,
            self.plain_http,
            self.driver_store()?,
            keys.as_deref(),
        )
    }

    /// The keys a component file driver must be signed by, read from
    /// their files; none if no file is configured.
    pub fn trusted_keys(&self) -> Result<Option<Arc<TrustedKeys>>, Failure> {
        if self.driver_trust.is_empty() {
            return Ok(None);
        }
        TrustedKeys::from_files(&self.driver_trust)
            .map(|keys| Some(Arc::new(keys)))
            .map_err(|e| Failure::Usage(format!("image_cache_driver_trusted_keys: {e}")))
    }

    /// Open the cache the settings describe.
    pub fn open(&self) -> Result<ImageCache, Failure> {
        self.open_as(false)
    }

    /// Open for a server: it starts even if the driver's database is down
    /// (see `CacheConfig::start_while_database_down`).
    pub fn open_for_server(&self) -> Result<ImageCache, Failure> {
        self.open_as(true)
    }

    fn open_as(&self, server: bool) -> Result<ImageCache, Failure> {
        let Some(dir) = &self.dir else {
            let hint = match &self.config_file {
                Some(f) => format!(
                    " ({} has no image_cache_dir in its [DEFAULT] section)",
                    f.display()
                ),
                None => String::new(),
            };
            return Err(Failure::Usage(format!(
                "no cache directory: give --dir DIR, set IMAGE_CACHE_DIR, or set \
                 image_cache_dir in the --config file{hint}"
            )));
        };
        let mut config = CacheConfig::new(dir)
            .driver(self.driver_source()?)
            .fallback_to_sqlite(!self.no_fallback)
            .policy(LoadPolicy {
                sha256: self.driver_sha256.clone(),
                grants: self.grants,
                trusted_keys: self.trusted_keys()?,
            });
        config.sqlite_db = self.sqlite_db.clone();
        config.start_while_database_down = server;
        if let Some(url) = &self.database_url {
            let mut database = DatabaseSettings::new(url.clone());
            database.allow_privileged_role = self.allow_privileged_role;
            database.statement_timeout = self
                .database_statement_timeout
                .unwrap_or(config.limits.call_deadline);
            if let Some(n) = self.database_pool_size {
                database.pool_size = n;
            }
            if let Some(t) = self.database_connect_timeout {
                database.connect_timeout = t;
            }
            database.max_result_bytes = config.limits.max_query_bytes;
            let databases = DatabaseRoot::new()
                .with_database(CENTRALIZED_DATABASE, &database)
                .map_err(|e| Failure::Usage(own_words(e)))?;
            config.databases = Arc::new(databases);
        }
        if let Some(url) = &self.worker_self_reference_url {
            config
                .driver_options
                .push(("worker_self_reference_url".to_string(), url.clone()));
        }
        let cache = ImageCache::open(config)?;
        log::info!(
            "cache {} with driver {}",
            dir.display(),
            cache.driver().name()
        );
        Ok(cache)
    }
}

fn init_logging(global: &Global) {
    use log::LevelFilter;
    let ours = if global.quiet {
        LevelFilter::Error
    } else {
        match global.verbose {
            0 => LevelFilter::Warn,
            1 => LevelFilter::Info,
            2 => LevelFilter::Debug,
            _ => LevelFilter::Trace,
        }
    };
    let others = if global.quiet {
        LevelFilter::Error
    } else if global.verbose >= 3 {
        LevelFilter::Debug
    } else {
        LevelFilter::Warn
    };
    env_logger::Builder::new()
        .filter_level(others)
        .filter_module("image_cache", ours)
        .target(env_logger::Target::Stderr)
        .format(|buf, record| {
            let level = match record.level() {
                log::Level::Error => "error",
                log::Level::Warn => "warning",
                log::Level::Info => "info",
                log::Level::Debug => "debug",
                log::Level::Trace => "trace",
            };
            writeln!(buf, "image-cache: {level}: {}", record.args())
        })
        .init();
}

/// The server logs through `tracing` (the library's `log` records too):
/// info by default, -v debug (every request), -vv trace, -q errors only;
/// RUST_LOG overrides.
fn init_tracing(global: &Global, json: bool) {
    use tracing_subscriber::EnvFilter;
    let ours = if global.quiet {
        "error"
    } else {
        match global.verbose {
            0 => "info",
            1 => "debug",
            _ => "trace",
        }
    };
    let default = format!("warn,image_cache={ours}");
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal());
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// One line on stderr, whatever happens to stderr.
fn error_line(message: &str) {
    let one_line = message.replace(['\n', '\r'], " ");
    let _ = writeln!(io::stderr(), "image-cache: error: {one_line}");
}

pub fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_string());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        error_line(&format!(
            "internal error: {message}{place} (please report this)"
        ));
    }));

    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout (exit 0), usage errors to
            // stderr (exit 2); a closed stdout is no error.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match &cli.command {
        Command::Serve(args) => init_tracing(&cli.global, args.log_json()),
        _ => init_logging(&cli.global),
    }

    let json = cli.global.json;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Settings::resolve(&cli.global).and_then(|settings| match &cli.command {
            Command::Serve(args) => serve::run(&cli.global, &settings, args),
            Command::Warm(args) => warm::run(&settings, args),
            command => commands::run(&settings, command),
        })
    }));
    let result = match result {
        Ok(r) => r,
        // The panic hook printed the one line.
        Err(_) => return ExitCode::from(1),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::BrokenPipe) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            error_line(&message);
            ExitCode::from(2)
        }
        Err(Failure::Reported(message)) => {
            error_line(&message);
            ExitCode::from(1)
        }
        Err(Failure::Op {
            kind,
            message,
            io_code,
        }) => {
            error_line(&message);
            if json {
                let mut error = serde_json::json!({"kind": kind, "message": message});
                if let Some(code) = io_code {
                    error["io_code"] = serde_json::json!(code);
                }
                let doc = serde_json::json!({ "error": error });
                let _ = writeln!(io::stdout(), "{doc}");
            }
            ExitCode::from(exit_code(kind, io_code))
        }
    }
}

/// Whether a person is at the terminal on stdin.
pub fn stdin_is_terminal() -> bool {
    io::stdin().is_terminal()
}
