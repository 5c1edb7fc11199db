//! Shared set-up for the integration suites: one runtime per test process
//! (compiled components kept under the target directory), temporary roots,
//! and the list of drivers every conformance test runs against.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use image_cache::{CacheConfig, DriverSource, Error, ImageCache, Limits, Runtime};
use tempfile::TempDir;

pub mod mariadb;
pub mod pg;
pub mod registry;
pub mod tls;

/// What a cache on the centralized driver uses: the shared PostgreSQL
/// (held up while it lives), a database of its own and a node name.
pub struct PgSetup {
    _use: std::sync::RwLockReadGuard<'static, ()>,
    pub db: pg::TestDatabase,
    pub node: String,
    pub databases: Arc<image_cache::database::DatabaseRoot>,
}

impl PgSetup {
    pub fn new() -> PgSetup {
        let (guard, cluster) = pg::postgres();
        let db = cluster.database();
        PgSetup {
            _use: guard,
            node: format!("http://{}:9292", db.name.replace('_', "-")),
            databases: db.root(),
            db,
        }
    }

    /// Point a cache config at this database and node.
    pub fn configure(&self, config: &mut CacheConfig) {
        self.configure_node(config, &self.node);
    }

    pub fn configure_node(&self, config: &mut CacheConfig, node: &str) {
        config.databases = self.databases.clone();
        config
            .driver_options
            .push(("worker_self_reference_url".to_string(), node.to_string()));
    }
}

impl Default for PgSetup {
    fn default() -> Self {
        PgSetup::new()
    }
}

/// What a cache on the centralized driver uses on MariaDB: the shared
/// server (held up while it lives), a database of its own and a node name.
pub struct MariaSetup {
    _use: std::sync::RwLockReadGuard<'static, ()>,
    pub db: mariadb::TestDatabase,
    pub node: String,
    pub databases: Arc<image_cache::database::DatabaseRoot>,
}

impl MariaSetup {
    pub fn new() -> MariaSetup {
        let (guard, server) = mariadb::mariadb();
        let db = server.database();
        MariaSetup {
            _use: guard,
            node: format!("http://{}:9292", db.name.replace('_', "-")),
            databases: db.root(),
            db,
        }
    }
}

impl Default for MariaSetup {
    fn default() -> Self {
        MariaSetup::new()
    }
}

/// The shared database of a centralized driver's test cache.
pub enum Centralized {
    Postgres(PgSetup),
    Mariadb(MariaSetup),
}

impl Centralized {
    /// On the database this test runs on (see [`on_mariadb`]).
    pub fn new() -> Centralized {
        if ON_MARIADB.with(|m| m.get()) {
            Centralized::Mariadb(MariaSetup::new())
        } else {
            Centralized::Postgres(PgSetup::new())
        }
    }

    pub fn configure(&self, config: &mut CacheConfig) {
        let (databases, node) = match self {
            Centralized::Postgres(pg) => (&pg.databases, &pg.node),
            Centralized::Mariadb(m) => (&m.databases, &m.node),
        };
        config.databases = databases.clone();
        config
            .driver_options
            .push(("worker_self_reference_url".to_string(), node.clone()));
    }
}

impl Default for Centralized {
    fn default() -> Self {
        Centralized::new()
    }
}

thread_local! {
    static ON_MARIADB: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `test` with its centralized caches on MariaDB instead of PostgreSQL
/// (each test runs on a thread of its own).
pub fn on_mariadb(test: impl FnOnce()) {
    ON_MARIADB.with(|m| m.set(true));
    test();
}

/// Whether `driver` is the built-in centralized driver.
pub fn is_centralized(driver: &DriverSource) -> bool {
    match driver {
        DriverSource::Builtin(name) => *name == "centralized",
        DriverSource::File(path) => path.ends_with("contract-0.2.0/centralized_driver.wasm"),
    }
}

/// A driver component of an earlier release, kept as built
/// (`tests/fixtures/contract-VERSION/NAME.wasm`).
pub fn release(version: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("fixtures/contract-{version}"))
        .join(format!("{name}.wasm"))
}

/// A cache configuration on `root` with release `version`'s driver `name`,
/// granted what its built-in self was, with no fallback.
pub fn release_config(root: &Path, version: &str, name: &str) -> CacheConfig {
    CacheConfig::new(root)
        .driver(DriverSource::File(release(version, name)))
        .fallback_to_sqlite(false)
        .policy(image_cache::LoadPolicy {
            grants: image_cache::Grants::of(&image_cache::contract::Capability::ALL),
            ..Default::default()
        })
}

/// Whether `driver` is an earlier release's built-in driver, which is
/// granted what its built-in self was.
fn is_release(driver: &DriverSource) -> bool {
    matches!(driver, DriverSource::File(p)
        if p.starts_with(Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")))
}

/// Environment variable naming a third-party driver component to run the
/// conformance suite against as well.
pub const EXTERNAL_DRIVER_ENV: &str = "IMAGE_CACHE_TEST_DRIVER";

/// Where compiled components are kept between test processes.
pub fn artifact_dir() -> PathBuf {
    // The test binary is <target>/<profile>/deps/<name>.
    let exe = std::env::current_exe().expect("test binary path");
    let target = exe.ancestors().nth(3).expect("target directory");
    target.join("tmp").join("compiled-drivers")
}

/// The runtime shared by every cache in this test process.
pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| Runtime::new(Limits::default(), Some(artifact_dir())).expect("runtime"))
        .clone()
}

/// The driver a conformance module runs against, by name: `sqlite`,
/// `xattr`, or `external` (the component in `$IMAGE_CACHE_TEST_DRIVER`).
pub fn driver(name: &str) -> Option<DriverSource> {
    match name {
        "xattr@0.2.0" => Some(DriverSource::File(release("0.2.0", "xattr_driver"))),
        "centralized@0.2.0" => Some(DriverSource::File(release("0.2.0", "centralized_driver"))),
        "external" => std::env::var_os(EXTERNAL_DRIVER_ENV).map(|p| DriverSource::File(p.into())),
        builtin => Some(DriverSource::Builtin(
            image_cache::builtin::find(builtin)
                .expect("built-in driver")
                .name,
        )),
    }
}

/// Grants for a third-party driver under test: `IMAGE_CACHE_TEST_DRIVER_GRANTS`
/// (e.g. `sqlite` or `xattr,sqlite`), none by default.
pub fn external_policy() -> image_cache::LoadPolicy {
    let grants = std::env::var("IMAGE_CACHE_TEST_DRIVER_GRANTS").unwrap_or_default();
    image_cache::LoadPolicy {
        sha256: None,
        grants: image_cache::Grants::parse(&grants)
            .unwrap_or_else(|e| panic!("IMAGE_CACHE_TEST_DRIVER_GRANTS: {e}")),
        ..Default::default()
    }
}

/// A cache on a fresh temporary root.
pub struct TestCache {
    pub dir: TempDir,
    pub cache: ImageCache,
    pub driver: DriverSource,
    /// The database and node of a centralized driver's cache.
    pub db: Option<Centralized>,
}

impl TestCache {
    /// A cache using exactly `driver` (no fallback: a conformance failure
    /// must not hide behind the sqlite driver).
    pub fn new(driver: &DriverSource) -> TestCache {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = is_centralized(driver).then(Centralized::new);
        let cache = open_with(dir.path(), driver, db.as_ref());
        TestCache {
            dir,
            cache,
            driver: driver.clone(),
            db,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// Cache `bytes` as image `id` through a write session.
    pub fn put(&self, id: &str, bytes: &[u8]) {
        self.cache
            .cache_reader(id, None, bytes)
            .unwrap_or_else(|e| panic!("caching {id}: {e}"));
    }

    /// Read image `id` fully (counting the hit).
    pub fn get(&self, id: &str) -> Vec<u8> {
        let mut out = Vec::new();
        self.cache
            .read_image(id, &mut out)
            .unwrap_or_else(|e| panic!("reading {id}: {e}"));
        out
    }

    /// The resolution of the times this cache records, in seconds: Glance's
    /// `DATETIME` columns keep whole seconds on MySQL and MariaDB.
    pub fn time_resolution(&self) -> f64 {
        match self.db {
            Some(Centralized::Mariadb(_)) => 1.0,
            _ => 0.0,
        }
    }

    /// A recorded time as this cache keeps it.
    pub fn recorded_time(&self, t: f64) -> f64 {
        match self.time_resolution() {
            r if r > 0.0 => (t / r).floor() * r,
            _ => t,
        }
    }

    /// Wait until a time recorded now sorts after every time recorded so
    /// far (into the next whole second where times keep whole seconds).
    pub fn tick(&self) {
        if self.time_resolution() > 0.0 {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            let to_next = Duration::from_secs(1) - Duration::from_nanos(now.subsec_nanos().into());
            std::thread::sleep(to_next + Duration::from_millis(20));
        }
    }

    /// Names of the regular files in a directory of the root, sorted.
    pub fn files_in(&self, rel: &str) -> Vec<String> {
        files_in(&self.path(rel))
    }

    /// Reopen the same root with another driver (or the same).
    /// (A centralized driver keeps its database and node.)
    pub fn reopen(&self, driver: &DriverSource) -> ImageCache {
        open_with(self.root(), driver, self.db.as_ref())
    }
}

pub fn open(root: &Path, driver: &DriverSource) -> ImageCache {
    open_with(root, driver, None)
}

/// A cache on `root` with exactly `driver`, its database set up by `db`.
pub fn open_with(root: &Path, driver: &DriverSource, db: Option<&Centralized>) -> ImageCache {
    let policy = if is_release(driver) {
        image_cache::LoadPolicy {
            grants: image_cache::Grants::of(&image_cache::contract::Capability::ALL),
            ..Default::default()
        }
    } else {
        external_policy()
    };
    let mut config = CacheConfig::new(root)
        .driver(driver.clone())
        .fallback_to_sqlite(false)
        .policy(policy);
    if let Some(db) = db {
        db.configure(&mut config);
    }
    ImageCache::with_runtime(runtime(), config)
        .unwrap_or_else(|e| panic!("opening {}: {e}", root.display()))
}

pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Names, sizes and modification times of the entries of `dir` (symbolic
/// links as themselves), sorted: a canary directory's state, which a
/// driver must never change.
pub fn canary_state(dir: &Path) -> Vec<(PathBuf, u64, std::time::SystemTime)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            // `DirEntry::metadata` does not follow a symbolic link.
            let m = e.metadata().unwrap();
            (e.path(), m.len(), m.modified().unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Every path under `dir` with its size, for "touches nothing" checks.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                stack.push(e.path());
            }
            out.push((e.path(), if meta.is_dir() { 0 } else { meta.len() }));
        }
    }
    out.sort();
    out
}

/// Set a file's modification time `age` into the past.
pub fn age_file(path: &Path, age: Duration) {
    let file = std::fs::File::options().write(true).open(path).unwrap();
    let t = SystemTime::now() - age;
    file.set_times(std::fs::FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

/// `n` bytes of a recognisable pattern for image `seed`.
pub fn image_bytes(seed: u8, n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Runs each listed test function against every driver: a module per
/// driver, a test per function, so a failure names both.
#[macro_export]
macro_rules! for_each_driver {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $( #[test] fn $test() { super::$test(&$crate::driver("sqlite").unwrap()) } )*
        }
        mod xattr {
            $( #[test] fn $test() { super::$test(&$crate::driver("xattr").unwrap()) } )*
        }
        /// On a real PostgreSQL (see `support/pg.rs`).
        mod centralized {
            $( #[test] fn $test() { super::$test(&$crate::driver("centralized").unwrap()) } )*
        }
        /// On a real MariaDB (see `support/mariadb.rs`).
        mod centralized_mariadb {
            $( #[test] fn $test() {
                $crate::on_mariadb(|| super::$test(&$crate::driver("centralized").unwrap()))
            } )*
        }
        /// Release 0.2.0's xattr driver, through the contract adapter.
        mod xattr_v0_2 {
            $( #[test] fn $test() { super::$test(&$crate::driver("xattr@0.2.0").unwrap()) } )*
        }
        /// A third-party driver: `IMAGE_CACHE_TEST_DRIVER=path/to/driver.wasm
        /// cargo test --test conformance external -- --include-ignored`
        /// (grants from `IMAGE_CACHE_TEST_DRIVER_GRANTS`, e.g. `sqlite`).
        mod external {
            $( #[test]
               #[ignore = "needs IMAGE_CACHE_TEST_DRIVER=path/to/driver.wasm and --include-ignored"]
               fn $test() {
                match $crate::driver("external") {
                    Some(d) => super::$test(&d),
                    None => panic!(
                        "{} is not set: name the third-party driver component to test",
                        $crate::EXTERNAL_DRIVER_ENV
                    ),
                }
            } )*
        }
    };
}

/// A test-fixture component built by tests/build.rs (never by the library),
/// e.g. `hostile_driver`.
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("IMAGE_CACHE_FIXTURES_DIR")).join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: build the workspace first",
        path.display()
    );
    path
}

/// A built-in driver (`sqlite_driver`, `xattr_driver`,
/// `centralized_driver`) as a release would ship it: signed, embedded, by
/// the key tests/build.rs made for this build ([`builtin_signing_key`]).
pub fn signed_builtin(name: &str) -> PathBuf {
    fixture(&format!("signed/{name}"))
}

/// The public key that signed [`signed_builtin`]'s components.
pub fn builtin_signing_key() -> PathBuf {
    Path::new(env!("IMAGE_CACHE_FIXTURES_DIR")).join("signed/builtin-signing.pub")
}

/// An outsider's driver component, built from `wit/` alone by its own cargo
/// (tests/plugin, its own workspace and target directory
/// `<target>/plugin`), turned into a component as a third party would:
/// built on first use.
pub fn third_party_plugin() -> &'static Path {
    static PLUGIN: OnceLock<PathBuf> = OnceLock::new();
    PLUGIN.get_or_init(|| {
        let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("plugin");
        let target = profile_dir()
            .parent()
            .expect("target directory")
            .join("plugin");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(&crate_dir)
            .args(["build", "--quiet", "--release", "--locked"])
            .args(["--target", "wasm32-unknown-unknown", "--target-dir"])
            .arg(&target);
        // This test's own cargo settings are not the plugin's.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if (key.starts_with("CARGO_") || key.starts_with("RUSTFLAGS"))
                && key != "CARGO_HOME"
                && !key.starts_with("CARGO_NET_")
                && !key.starts_with("CARGO_HTTP_")
                && !key.starts_with("CARGO_REGISTR")
            {
                build.env_remove(&key);
            }
        }
        let status = build.status().expect("running cargo for tests/plugin");
        assert!(status.success(), "building tests/plugin failed");
        let module =
            std::fs::read(target.join("wasm32-unknown-unknown/release/third_party_driver.wasm"))
                .expect("the plugin's core module");
        let component = wit_component::ComponentEncoder::default()
            .module(&module)
            .and_then(|e| e.validate(true).encode())
            .expect("the plugin as a component");
        let path = target.join("third_party_driver.wasm");
        std::fs::write(&path, component).expect("writing the plugin component");
        path
    })
}

/// The host's refusal of a driver's file-system call: an `io` error with
/// the code `access-denied` whose message contains `expected`.
pub fn assert_access_denied(e: Error, expected: &str) {
    match e {
        Error::Io { code, message } => {
            assert_eq!(code, image_cache::error::IoCode::AccessDenied, "{message}");
            assert!(
                message.contains(expected),
                "expected {expected:?}: {message}"
            );
        }
        e => panic!("expected the host's access-denied refusal, got {e:?}"),
    }
}

/// `<target>/<profile>` of this test binary (`<target>/<profile>/deps/cli-*`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.ancestors()
        .nth(2)
        .expect("profile directory")
        .to_path_buf()
}

/// Run `cmd` to its end; it must succeed (its stderr is the message).
#[track_caller]
pub fn output_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The `image-cache` binary of this build profile, built on first use
/// (or `$IMAGE_CACHE_BIN`).
pub fn cli_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("IMAGE_CACHE_BIN") {
            return PathBuf::from(path);
        }
        let profile = profile_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            // Both packages, as `cargo test` builds them: the same feature
            // unification, so this build reuses the test build's
            // dependencies instead of rebuilding them with other features.
            .args([
                "build",
                "--quiet",
                "-p",
                "image-cache-cli",
                "-p",
                "image-cache-tests",
                "--bin",
                "image-cache",
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        // The variables `cargo test` sets for this process describe this
        // package; some build scripts (ring's) ask cargo to rerun them when
        // such a variable changes, so passing them on would rebuild half
        // the dependency tree for the nested build, and again for the next
        // test build.
        for (name, _) in std::env::vars_os() {
            let name = name.to_string_lossy();
            if [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
            ]
            .iter()
            .any(|p| name.starts_with(p))
                || name == "CARGO_TARGET_TMPDIR"
                // This package's build script's output directory (ring's
                // build script reruns when OUT_DIR changes).
                || name == "OUT_DIR"
            {
                build.env_remove(&*name);
            }
        }
        if profile.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("running cargo build for the binary");
        assert!(
            status.success(),
            "cargo build -p image-cache-cli --bin image-cache failed"
        );
        let bin = profile.join(format!("image-cache{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// The ids `get-cached-images` lists, in its order.
pub fn cached_ids(cache: &ImageCache) -> Vec<String> {
    cache
        .get_cached_images()
        .unwrap()
        .into_iter()
        .map(|i| i.image_id)
        .collect()
}

/// The ids of the `n` least recently accessed images, oldest first.
pub fn lru_ids(cache: &ImageCache, n: u32) -> Vec<String> {
    cache
        .get_least_recently_accessed_batch(n)
        .unwrap()
        .into_iter()
        .map(|e| e.image_id)
        .collect()
}

/// The message of the bad-configuration error `result` must be.
pub fn bad_configuration<T>(result: Result<T, Error>) -> String {
    match result {
        Err(Error::BadConfiguration(message)) => message,
        Err(e) => panic!("expected a bad-configuration error, got {e:?}"),
        Ok(_) => panic!("expected a bad-configuration error, got success"),
    }
}

/// A small file system of its own (a tmpfs of `size`, e.g. `"64m"`),
/// mounted at a fresh directory and unmounted when dropped: for full-disk
/// tests. `None` (with the reason printed) where mounting is not allowed
/// (it needs root).
pub struct SmallFs {
    _top: tempfile::TempDir,
    path: PathBuf,
}

impl SmallFs {
    pub fn mount(size: &str) -> Option<SmallFs> {
        SmallFs::mount_with(&format!("size={size}"))
    }

    /// With tmpfs mount options (`size=2m,nr_inodes=400`).
    pub fn mount_with(options: &str) -> Option<SmallFs> {
        let top = tempfile::tempdir().expect("temp dir");
        let path = top.path().join("small");
        std::fs::create_dir(&path).expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(&path)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            eprintln!("skipped: cannot mount a tmpfs ({options}) here (it needs root)");
            return None;
        }
        Some(SmallFs { _top: top, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fill the file system to the last byte with a file beside whatever
    /// else it holds; removing the file returned makes the room again.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path.join("filler");
        let mut filler = std::fs::File::create(&path).expect("filler");
        for size in [64 << 10, 4 << 10, 512, 1] {
            let chunk = vec![0u8; size];
            while filler
                .write_all(&chunk)
                .and_then(|()| filler.sync_data())
                .is_ok()
            {}
        }
        path
    }

    /// Use up the file system's last inode (a tmpfs mounted with
    /// `nr_inodes`) with empty files in a directory beside whatever else
    /// it holds; removing the directory returned frees them.
    pub fn fill_inodes(&self) -> PathBuf {
        let dir = self.path.join("inode-filler");
        std::fs::create_dir(&dir).expect("inode filler directory");
        let mut n = 0u64;
        while std::fs::File::create(dir.join(n.to_string())).is_ok() {
            n += 1;
        }
        dir
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}
