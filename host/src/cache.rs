//! The cache above the driver: Glance's `ImageCache`, as a library.
//!
//! [`ImageCache`] owns the root, picks the driver (falling back to sqlite if
//! the chosen one cannot configure itself, unless that is switched off),
//! and moves image bytes natively through the files the driver opens. It is
//! `Send + Sync`; concurrent calls run on a pool of driver instances, and the
//! driver can be swapped while calls are in flight.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::bindings::types::{CachedImage, CleanReport, LruEntry, PruneReport, ReadRecord};
use crate::checksum::{Checksum, Hasher};
use crate::database::DatabaseRoot;
use crate::driver::{Driver, Placement, Session};
use crate::error::{Error, Result};
use crate::fail::FailPolicy;
use crate::fs::RootFs;
use crate::limits::DEFAULT_SQLITE_DB;
use crate::runtime::{DriverSource, Limits, LoadPolicy, Runtime, default_artifact_dir};
use crate::xattr::XattrSupport;

/// Glance's default `image_cache_max_size`: 10 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;
/// Glance's default `image_cache_stall_time`: one day.
pub const DEFAULT_STALL_TIME: Duration = Duration::from_secs(86_400);
/// Bytes moved per read/write of a large image.
const CHUNK: usize = 1 << 20;
/// The first buffer of a stream of unknown size: small images should not
/// pay for zeroing a megabyte; it grows to CHUNK once reads fill it.
const FIRST_CHUNK: usize = 64 << 10;

/// How to open a cache.
#[derive(Clone, Debug)]
pub struct CacheConfig {
    /// `image_cache_dir`: the cache root.
    pub root: PathBuf,
    /// `image_cache_driver`: built-in `sqlite` (default), `xattr`, or a file.
    pub driver: DriverSource,
    /// `image_cache_sqlite_db`: the database file name in the root.
    pub sqlite_db: String,
    /// Fall back to sqlite, with a warning, if the driver cannot configure
    /// (never for a driver linked with `database`: its metadata is shared).
    pub fallback_to_sqlite: bool,
    /// Whether the xattr import reaches the file system.
    pub xattr: XattrSupport,
    /// Limits for each driver instance.
    pub limits: Limits,
    /// Where compiled components are kept (none: compile every start).
    pub artifacts: Option<PathBuf>,
    /// The pin, grants and trusted keys for a driver loaded from a file.
    pub policy: LoadPolicy,
    /// The databases drivers may open through the `database` interface.
    pub databases: Arc<DatabaseRoot>,
    /// Extra driver options (Glance's names), passed to `configure`.
    pub driver_options: Vec<(String, String)>,
    /// Open even if the driver's database cannot be reached now: its calls
    /// fail with [`Error::Database`] until it can (a server serves what it
    /// can meanwhile). Default: the open fails.
    pub start_while_database_down: bool,
    /// What a call does when the driver fails (see [`FailPolicy`]; also
    /// [`ImageCache::set_fail_policy`]). Default: fail-closed.
    pub fail_policy: FailPolicy,
}

impl CacheConfig {
    pub fn new(root: impl Into<PathBuf>) -> CacheConfig {
        CacheConfig {
            root: root.into(),
            driver: DriverSource::Builtin("sqlite"),
            sqlite_db: DEFAULT_SQLITE_DB.to_string(),
            fallback_to_sqlite: true,
            xattr: XattrSupport::FileSystem,
            limits: Limits::default(),
            artifacts: default_artifact_dir(),
            policy: LoadPolicy::default(),
            databases: Arc::new(DatabaseRoot::new()),
            driver_options: Vec::new(),
            start_while_database_down: false,
            fail_policy: FailPolicy::default(),
        }
    }

    /// Pin and grant a driver loaded from a file.
    pub fn policy(mut self, policy: LoadPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn driver(mut self, driver: DriverSource) -> Self {
        self.driver = driver;
        self
    }

    pub fn fallback_to_sqlite(mut self, fallback: bool) -> Self {
        self.fallback_to_sqlite = fallback;
        self
    }

    pub fn fail_policy(mut self, policy: FailPolicy) -> Self {
        self.fail_policy = policy;
        self
    }

    fn driver_options(&self) -> Vec<(String, String)> {
        let mut options = vec![("image_cache_sqlite_db".to_string(), self.sqlite_db.clone())];
        options.extend(self.driver_options.iter().cloned());
        options
    }
}

/// What caching a stream did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TeeReport {
    /// Bytes passed on to the caller.
    pub bytes: u64,
    /// Whether the image is now cached by this call.
    pub cached: bool,
    /// Why it was not cached, if the cache itself failed (logged too).
    pub cache_error: Option<String>,
}

/// When a newly swapped-in driver is rolled back by itself: more than
/// `max_faults` faults within `window` of the swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RollbackPolicy {
    pub max_faults: u64,
    pub window: Duration,
}

/// What the cache did with its drivers, for logs and metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Driver swaps (rollbacks included).
    pub swaps: AtomicU64,
    /// Rollbacks: asked for, automatic after faults, or by fail-reload.
    pub rollbacks: AtomicU64,
    /// Driver faults seen by calls through this cache.
    pub driver_faults: AtomicU64,
    /// Rollbacks made by [`FailPolicy::Reload`] after a fault (each is
    /// counted in `rollbacks` too).
    pub fail_reloads: AtomicU64,
}

/// The driver serving calls and the one before it (kept ready to roll
/// back to), with when the current one came in and its faults since.
struct Drivers {
    current: Arc<Driver>,
    previous: Option<Arc<Driver>>,
    since: Instant,
    faults: u64,
    /// The current driver was put back because the one after it faulted
    /// (fail-reload, automatic rollback): its previous one is the driver
    /// that faulted, which fail-reload does not go back to.
    restored_after_fault: bool,
}

/// An image cache on one root.
pub struct ImageCache {
    runtime: Arc<Runtime>,
    root: Arc<RootFs>,
    config: CacheConfig,
    driver: RwLock<Arc<Driver>>,
    drivers: Mutex<Drivers>,
    rollback_policy: Mutex<Option<RollbackPolicy>>,
    fail_policy: Mutex<FailPolicy>,
    last_rollback: Mutex<Option<String>>,
    pub stats: CacheStats,
}

/// Make sure the root exists, is a directory and is writable, leaving
/// nothing in it (an unnamed `O_TMPFILE` file, or `faccessat` where the
/// file system has no such files): no probe is ever listed as an image.
fn prepare_root(path: &Path) -> Result<RootFs> {
    let bad =
        |why: String| Error::BadConfiguration(format!("cache root {}: {why}", path.display()));
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(bad("not a directory".into())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| bad(format!("cannot create it: {e}")))?;
        }
        Err(e) => return Err(bad(format!("cannot use it: {e}"))),
    }
    let root = RootFs::new(path).map_err(|e| bad(format!("cannot open it: {e}")))?;
    writable(&root).map_err(|e| bad(format!("not writable ({e})")))?;
    Ok(root)
}

fn writable(root: &RootFs) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = root.dir().as_raw_fd();
    // SAFETY: plain system calls on a directory descriptor we hold, with a
    // static NUL-terminated path; a returned descriptor is closed here.
    unsafe {
        let fd = libc::openat(
            dir,
            c".".as_ptr(),
            libc::O_TMPFILE | libc::O_WRONLY | libc::O_CLOEXEC,
            0o600,
        );
        if fd >= 0 {
            libc::close(fd);
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EISDIR) | Some(libc::EINVAL) => {
                if libc::faccessat(
                    dir,
                    c".".as_ptr(),
                    libc::W_OK | libc::X_OK,
                    libc::AT_EACCESS,
                ) == 0
                {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            _ => Err(e),
        }
    }
}

impl ImageCache {
    /// Open a cache with a runtime of its own.
    pub fn open(config: CacheConfig) -> Result<ImageCache> {
        let runtime = Runtime::new(config.limits.clone(), config.artifacts.clone())?;
        ImageCache::with_runtime(runtime, config)
    }

    /// Open a cache on a shared runtime (one engine for many caches).
    pub fn with_runtime(runtime: Arc<Runtime>, config: CacheConfig) -> Result<ImageCache> {
        let root = Arc::new(prepare_root(&config.root)?);
        let driver = match start_driver(&runtime, &root, &config, &config.driver, &config.policy) {
            Ok(driver) => driver,
            // An unreachable database is an outage, not a driver that
            // cannot be configured; and a driver that keeps its metadata in
            // a shared database never falls back, whatever went wrong:
            // sqlite would run a shared cache on local bookkeeping (prune
            // deleting files whose rows every node still sees).
            Err(e)
                if config.fallback_to_sqlite
                    && !is_sqlite(&config.driver)
                    && !shares_a_database(&config)
                    && !matches!(e, Error::Database(_)) =>
            {
                log::warn!(
                    "driver {} cannot be used ({e}); falling back to the sqlite driver",
                    config.driver.name()
                );
                start_driver(
                    &runtime,
                    &root,
                    &config,
                    &DriverSource::Builtin("sqlite"),
                    &LoadPolicy::default(),
                )?
            }
            Err(e) => return Err(e),
        };
        let fail_policy = config.fail_policy;
        Ok(ImageCache {
            runtime,
            root,
            config,
            driver: RwLock::new(driver.clone()),
            drivers: Mutex::new(Drivers {
                current: driver,
                previous: None,
                since: Instant::now(),
                faults: 0,
                restored_after_fault: false,
            }),
            rollback_policy: Mutex::new(None),
            fail_policy: Mutex::new(fail_policy),
            last_rollback: Mutex::new(None),
            stats: CacheStats::default(),
        })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// The driver now serving calls.
    pub fn driver(&self) -> Arc<Driver> {
        self.driver
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the driver: the new one is loaded and configured first; if
    /// that fails the old one stays and the error is returned. Calls and
    /// sessions already running finish on the old driver, which is kept
    /// ready for [`ImageCache::rollback`]. A component file gets the
    /// configured grants and trusted keys (and no pin: use
    /// [`ImageCache::swap_driver_with`]).
    pub fn swap_driver(&self, source: &DriverSource) -> Result<()> {
        let policy = LoadPolicy {
            sha256: None,
            grants: self.config.policy.grants,
            trusted_keys: self.config.policy.trusted_keys.clone(),
        };
        self.swap_driver_with(source, &policy)
    }

    /// [`ImageCache::swap_driver`] with a pin and grants of its own.
    pub fn swap_driver_with(&self, source: &DriverSource, policy: &LoadPolicy) -> Result<()> {
        let new = start_driver(&self.runtime, &self.root, &self.config, source, policy)?;
        self.install(new, "swap");
        Ok(())
    }

    /// Swap back to the driver that served before the last swap (it was
    /// kept configured); the current one becomes the one to go back to.
    pub fn rollback(&self) -> Result<()> {
        let previous = self.drivers_lock().previous.clone();
        match previous {
            Some(previous) => {
                self.install(previous, "rollback");
                self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => Err(Error::NotFound(
                "no previous driver to roll back to: the driver has not been swapped".into(),
            )),
        }
    }

    fn drivers_lock(&self) -> std::sync::MutexGuard<'_, Drivers> {
        self.drivers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn install(&self, new: Arc<Driver>, why: &str) {
        let mut drivers = self.drivers_lock();
        self.install_locked(&mut drivers, new, why);
    }

    /// [`ImageCache::install`] under the drivers' lock already held, so a
    /// decision taken under it (roll back this faulting driver) is not
    /// raced by another.
    fn install_locked(&self, drivers: &mut Drivers, new: Arc<Driver>, why: &str) {
        let old = std::mem::replace(&mut drivers.current, new.clone());
        drivers.previous = Some(old);
        drivers.since = Instant::now();
        drivers.faults = 0;
        drivers.restored_after_fault = false;
        *self.driver.write().unwrap_or_else(|p| p.into_inner()) = new;
        self.stats.swaps.fetch_add(1, Ordering::Relaxed);
        log::info!("driver {why}: now {}", drivers.current.name());
    }

    /// Roll a newly swapped-in driver back by itself when it faults more
    /// than `policy.max_faults` times within `policy.window` of the swap
    /// (none: never).
    pub fn set_rollback_policy(&self, policy: Option<RollbackPolicy>) {
        *self
            .rollback_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Why the last automatic rollback happened, if one did.
    pub fn last_rollback(&self) -> Option<String> {
        self.last_rollback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// What a call does when the driver fails (see [`FailPolicy`]).
    pub fn fail_policy(&self) -> FailPolicy {
        *self.fail_policy.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Change the fail policy; calls from now on follow it.
    /// [`FailPolicy::Open`] behaves as [`FailPolicy::Closed`] here: the
    /// library has no upstream to serve from (a server does).
    pub fn set_fail_policy(&self, policy: FailPolicy) {
        *self.fail_policy.lock().unwrap_or_else(|p| p.into_inner()) = policy;
    }

    /// Rollbacks [`FailPolicy::Reload`] made after a fault.
    pub fn fail_reloads(&self) -> u64 {
        self.stats.fail_reloads.load(Ordering::Relaxed)
    }

    /// Run `f`, calls of this cache on this thread, such that no driver
    /// call in it waits: for a caller that must not be held up, such as a
    /// server answering a hit on its event loop. A host import that would
    /// wait (SQLite's pause for another process's lock, a file lock held
    /// elsewhere) answers at once as if the call's deadline had passed, and
    /// each call has at most a second
    /// ([`NO_WAIT_DEADLINE`](crate::limits::NO_WAIT_DEADLINE)).
    ///
    /// `None` when a call wanted to wait (what `f` returned says nothing
    /// then), or the driver is not called this way at all (it is granted a
    /// database, where every call is a round trip; or such a call of it
    /// faulted before): ask again without this, where waiting is fine.
    pub fn without_waiting<T>(&self, f: impl FnOnce() -> Result<T>) -> Option<Result<T>> {
        let driver = self.driver();
        if !driver.calls_without_waiting() {
            return None;
        }
        let (result, wanted_to_wait) = crate::limits::without_waiting(f);
        if wanted_to_wait {
            return None;
        }
        if let Err(Error::DriverFault { .. }) = &result {
            driver.stop_calls_without_waiting();
        }
        Some(result)
    }

    /// Run one call on the current driver, counting its faults against the
    /// rollback policy. Every operation goes through here, and so through
    /// the fail policy: under [`FailPolicy::Reload`] a call that faults
    /// rolls the driver back (when there is a previous one) and runs once
    /// more on it. Only whole calls are retried (metadata calls, session
    /// opens before any byte moved); a session's own calls never come here.
    fn run<T>(&self, call: impl Fn(&Arc<Driver>) -> Result<T>) -> Result<T> {
        let driver = self.driver();
        let result = call(&driver);
        let Err(Error::DriverFault { message, .. }) = &result else {
            return result;
        };
        self.note_fault(&driver, message);
        if self.fail_policy() != FailPolicy::Reload || !self.reload_after_fault(&driver, message) {
            return result;
        }
        let driver = self.driver();
        let retried = call(&driver);
        if let Err(Error::DriverFault { message, .. }) = &retried {
            self.note_fault(&driver, message);
        }
        retried
    }

    /// [`FailPolicy::Reload`] after `faulty` faulted: roll back to the
    /// previous driver, unless `faulty` no longer serves (another call, an
    /// automatic rollback or a swap replaced it: the retry goes to the
    /// driver serving now). Whether the call is to be tried again. No
    /// rollback without a previous driver, nor from a driver that was
    /// itself put back after a fault (that would return to the driver
    /// that faulted; a swap or a rollback by hand re-arms it).
    fn reload_after_fault(&self, faulty: &Arc<Driver>, message: &str) -> bool {
        let mut drivers = self.drivers_lock();
        if !Arc::ptr_eq(&drivers.current, faulty) {
            return true;
        }
        if drivers.restored_after_fault {
            return false;
        }
        let Some(previous) = drivers.previous.clone() else {
            return false;
        };
        let reason = format!(
            "driver {} faulted ({message}); fail-reload rolled back to {}",
            faulty.name(),
            previous.name()
        );
        self.install_locked(&mut drivers, previous, "fail-reload rollback");
        drivers.restored_after_fault = true;
        drop(drivers);
        self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        self.stats.fail_reloads.fetch_add(1, Ordering::Relaxed);
        log::warn!("{reason}; retrying the call");
        *self.last_rollback.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        true
    }

    fn note_fault(&self, driver: &Arc<Driver>, message: &str) {
        self.stats.driver_faults.fetch_add(1, Ordering::Relaxed);
        let Some(policy) = *self
            .rollback_policy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
        else {
            return;
        };
        let mut drivers = self.drivers_lock();
        if !Arc::ptr_eq(&drivers.current, driver) || drivers.previous.is_none() {
            return;
        }
        if drivers.since.elapsed() > policy.window {
            return;
        }
        drivers.faults += 1;
        if drivers.faults <= policy.max_faults {
            return;
        }
        let previous = drivers.previous.clone().expect("checked above");
        let reason = format!(
            "driver {} faulted {} times within {:?} of being swapped in (last: {message}); rolled back to {}",
            driver.name(),
            drivers.faults,
            policy.window,
            previous.name()
        );
        self.install_locked(&mut drivers, previous, "automatic rollback");
        drivers.restored_after_fault = true;
        drop(drivers);
        log::warn!("{reason}");
        self.stats.rollbacks.fetch_add(1, Ordering::Relaxed);
        *self.last_rollback.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    pub fn get_cache_size(&self) -> Result<u64> {
        self.run(|d| d.get_cache_size())
    }

    pub fn get_hit_count(&self, id: &str) -> Result<u64> {
        self.run(|d| d.get_hit_count(id))
    }

    pub fn get_cached_images(&self) -> Result<Vec<CachedImage>> {
        self.run(|d| d.get_cached_images())
    }

    /// Record reads that completed in sessions dropped without
    /// [`ImageReader::finish`], in one driver call (a server batches its
    /// hits this way): hits + 1 and last accessed at each read's time, for
    /// each image that is still cached. How many were recorded.
    pub fn record_reads(&self, reads: &[ReadRecord]) -> Result<u64> {
        if reads.is_empty() {
            return Ok(0);
        }
        self.run(|d| d.record_reads(reads))
    }

    pub fn is_cached(&self, id: &str) -> Result<bool> {
        self.run(|d| d.is_cached(id))
    }

    pub fn is_being_cached(&self, id: &str) -> Result<bool> {
        self.run(|d| d.is_being_cached(id))
    }

    pub fn is_cacheable(&self, id: &str) -> Result<bool> {
        self.run(|d| d.is_cacheable(id))
    }

    pub fn is_queued(&self, id: &str) -> Result<bool> {
        self.run(|d| d.is_queued(id))
    }

    pub fn queue_image(&self, id: &str) -> Result<bool> {
        self.run(|d| d.queue_image(id))
    }

    pub fn get_queued_images(&self) -> Result<Vec<String>> {
        self.run(|d| d.get_queued_images())
    }

    pub fn delete_cached_image(&self, id: &str) -> Result<()> {
        self.run(|d| d.delete_cached_image(id))
    }

    /// Every cached image evicted; how many. A driver's call stops after
    /// about ten seconds of evicting (see [`ImageCache::prune`]): called
    /// again until one removes nothing.
    pub fn delete_all_cached_images(&self) -> Result<u64> {
        let mut total = 0u64;
        for _ in 0..MAX_EVICTION_CALLS {
            let removed = self.run(|d| d.delete_all_cached_images())?;
            total = total.saturating_add(removed);
            if removed == 0 {
                break;
            }
        }
        Ok(total)
    }

    pub fn delete_queued_image(&self, id: &str) -> Result<()> {
        self.run(|d| d.delete_queued_image(id))
    }

    pub fn delete_all_queued_images(&self) -> Result<u64> {
        self.run(|d| d.delete_all_queued_images())
    }

    pub fn get_least_recently_accessed(&self) -> Result<Option<(String, u64)>> {
        self.run(|d| d.get_least_recently_accessed())
    }

    pub fn get_least_recently_accessed_batch(&self, count: u32) -> Result<Vec<LruEntry>> {
        self.run(|d| d.get_least_recently_accessed_batch(count))
    }

    pub fn get_image_size(&self, id: &str) -> Result<u64> {
        self.run(|d| d.get_image_size(id))
    }

    /// The nodes whose caches hold the image (Glance's `get_cached_nodes`);
    /// [`Error::Unsupported`] for drivers that keep one node's metadata.
    pub fn get_cached_nodes(&self, id: &str) -> Result<Vec<String>> {
        self.run(|d| d.get_cached_nodes(id))
    }

    /// Evict least recently accessed images until the cache fits in
    /// `max_size` bytes (0 empties it). The built-in drivers stop evicting after about ten
    /// seconds of it (a call must end well inside its deadline) and report
    /// what they removed; while one removed something, failed nothing and
    /// left the cache over `max_size`, it is called again, and the reports
    /// add up (a million images pruned to half take several calls).
    pub fn prune(&self, max_size: u64) -> Result<PruneReport> {
        let mut report = self.run(|d| d.prune(max_size))?;
        for _ in 1..MAX_EVICTION_CALLS {
            if report.size_after <= max_size
                || report.removed.is_empty()
                || !report.failures.is_empty()
            {
                break;
            }
            let next = self.run(|d| d.prune(max_size))?;
            let progress = !next.removed.is_empty();
            report.removed.extend(next.removed);
            report.bytes_removed = report.bytes_removed.saturating_add(next.bytes_removed);
            report.size_after = next.size_after;
            report.failures.extend(next.failures);
            if !progress {
                break;
            }
        }
        Ok(report)
    }

    /// Remove invalid files, and incomplete files older than `stall_time`.
    pub fn clean(&self, stall_time: Duration) -> Result<CleanReport> {
        self.run(|d| d.clean(Some(stall_time.as_secs())))
    }

    /// Start writing an image; see [`ImageWriter`].
    pub fn open_for_write(&self, id: &str) -> Result<ImageWriter> {
        let session = self.run(|d| d.open_for_write(id))?;
        Ok(ImageWriter {
            session,
            id: id.to_string(),
            written: 0,
        })
    }

    /// Start reading a cached image; see [`ImageReader`].
    pub fn open_for_read(&self, id: &str) -> Result<ImageReader> {
        let session = self.run(|d| d.open_for_read(id))?;
        Ok(ImageReader {
            session: Some(session),
            id: id.to_string(),
        })
    }

    /// A cached image's file found by the host alone, without a driver
    /// call: `<id>` at the top of the root, a regular file (no symlink)
    /// that the host sealed as `id` when it was committed. For serving
    /// while the driver cannot answer (its database is down): the seal,
    /// which no driver can write, says the file is that image. An unsealed
    /// file is not trusted: [`Error::NotFound`]. No hit is counted.
    pub fn open_sealed(&self, id: &str) -> Result<std::fs::File> {
        crate::error::validate_image_id(id)?;
        let opened = self
            .root
            .open(id)
            .map_err(|_| Error::NotFound(id.to_string()))?;
        match crate::xattr::read_seal(&opened.file) {
            Ok(crate::xattr::Seal::Id(sealed)) if sealed == id.as_bytes() => Ok(opened.file),
            Ok(_) => Err(Error::NotFound(id.to_string())),
            Err(e) => Err(Error::io(format_args!("reading the seal of {id:?}"), &e)),
        }
    }

    /// Read a cached image into `sink`, counting the hit; bytes copied.
    pub fn read_image<W: Write>(&self, id: &str, mut sink: W) -> Result<u64> {
        let mut reader = self.open_for_read(id)?;
        let size = reader.session.as_ref().expect("open session").file_size();
        // One more byte than the image, so a small one is read in one call.
        let mut buf = vec![0u8; (size as usize).saturating_add(1).min(CHUNK)];
        let mut total = 0u64;
        {
            let file = reader.session.as_mut().expect("open session").file();
            loop {
                let n = match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io(format_args!("reading image {id:?}"), &e)),
                };
                sink.write_all(&buf[..n]).map_err(Error::Sink)?;
                total += n as u64;
            }
        }
        sink.flush().map_err(Error::Sink)?;
        reader.finish()?;
        Ok(total)
    }

    /// Cache the file at `path` as image `id`, verifying `expected` if given.
    pub fn cache_file(&self, id: &str, path: &Path, expected: Option<&Checksum>) -> Result<u64> {
        let mut source = std::fs::File::open(path).map_err(|e| {
            Error::Source(io::Error::new(e.kind(), format!("{}: {e}", path.display())))
        })?;
        if expected.is_some() {
            return self.cache_reader(id, expected, source);
        }
        // No digest to compute: let the kernel copy (copy_file_range).
        let mut writer = self.open_for_write(id)?;
        match io::copy(&mut source, writer.session.file()) {
            Ok(n) => {
                writer.commit(None)?;
                Ok(n)
            }
            Err(e) => {
                let reason = format!("copy failed: {e}");
                let _ = writer.abort(&reason);
                Err(classify_copy_error(e, path))
            }
        }
    }

    /// Cache the whole of `file` as image `id`, recording `checksum`: for a
    /// caller that verified the bytes already (a server's fill, spooled
    /// and checked against the upstream's size and digests). The bytes
    /// are copied by the kernel (`copy_file_range`, a reflink where the
    /// file system can), and the write session lasts only that copy.
    /// `file` is read from its start with positioned reads; its offset is
    /// left alone.
    pub fn cache_verified(
        &self,
        id: &str,
        file: &std::fs::File,
        checksum: Option<&Checksum>,
    ) -> Result<u64> {
        let mut source = file.try_clone().map_err(|e| {
            Error::Source(io::Error::new(e.kind(), format!("the verified file: {e}")))
        })?;
        // A duplicate shares the offset: rewind it (and leave it there).
        io::Seek::seek(&mut source, io::SeekFrom::Start(0)).map_err(|e| {
            Error::Source(io::Error::new(e.kind(), format!("the verified file: {e}")))
        })?;
        let size = file
            .metadata()
            .map_err(|e| {
                Error::Source(io::Error::new(e.kind(), format!("the verified file: {e}")))
            })?
            .len();
        let mut writer = self.open_for_write(id)?;
        match io::copy(&mut (&mut source).take(size), writer.session.file()) {
            Ok(n) if n == size => {
                writer.commit(checksum)?;
                Ok(n)
            }
            Ok(n) => {
                let _ = writer.abort("the verified file changed while it was copied");
                Err(Error::Source(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the verified file ended after {n} of {size} bytes"),
                )))
            }
            Err(e) => {
                let failure = Error::io(format_args!("writing image {id:?} into the cache"), &e);
                let _ = writer.abort(&failure.to_string());
                Err(failure)
            }
        }
    }

    /// Cache everything `source` yields as image `id`; strict: an image
    /// that cannot be cached (already cached, being cached) is an error.
    pub fn cache_reader<R: Read>(
        &self,
        id: &str,
        expected: Option<&Checksum>,
        source: R,
    ) -> Result<u64> {
        let writer = self.open_for_write(id)?;
        let report = self.tee(id, Some(writer), expected, source, io::sink(), None)?;
        match report.cache_error {
            Some(e) => Err(Error::io_message(e)),
            None => Ok(report.bytes),
        }
    }

    /// Glance's caching iterator: pass every byte of `source` on to `sink`
    /// while caching it as image `id`.
    ///
    /// - Not cacheable (cached, or another writer): the bytes just pass.
    /// - The source fails: the write is aborted, the error returned.
    /// - `expected` does not match: aborted, [`Error::ChecksumMismatch`]
    ///   (the bytes already passed on are the caller's concern).
    /// - The cache itself fails (disk full, driver error): the bytes keep
    ///   flowing, the failure is logged and reported in the result.
    pub fn cache_stream<R: Read, W: Write>(
        &self,
        id: &str,
        expected: Option<&Checksum>,
        source: R,
        sink: W,
    ) -> Result<TeeReport> {
        let (writer, cache_error) = match self.open_for_write(id) {
            Ok(writer) => (Some(writer), None),
            Err(Error::AlreadyCached(_) | Error::BeingCached(_)) => (None, None),
            Err(e @ Error::InvalidImageId(_)) => return Err(e),
            Err(e) => {
                log::warn!("cannot cache image {id:?}, passing it through: {e}");
                (None, Some(e.to_string()))
            }
        };
        self.tee(id, writer, expected, source, sink, cache_error)
    }

    fn tee<R: Read, W: Write>(
        &self,
        id: &str,
        mut writer: Option<ImageWriter>,
        expected: Option<&Checksum>,
        mut source: R,
        mut sink: W,
        mut cache_error: Option<String>,
    ) -> Result<TeeReport> {
        let abort = |writer: &mut Option<ImageWriter>, reason: &str| {
            if let Some(w) = writer.take()
                && let Err(e) = w.abort(reason)
            {
                log::warn!("aborting the write of image {id:?}: {e}");
            }
        };
        let mut hasher = expected.map(|c| Hasher::new(c.algorithm));
        let mut buf = vec![0u8; FIRST_CHUNK];
        let mut bytes = 0u64;
        loop {
            if bytes >= FIRST_CHUNK as u64 && buf.len() < CHUNK {
                buf.resize(CHUNK, 0);
            }
            let n = match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    abort(&mut writer, &format!("the image source failed: {e}"));
                    return Err(Error::Source(e));
                }
            };
            let chunk = &buf[..n];
            if let Some(h) = hasher.as_mut() {
                h.update(chunk);
            }
            if let Some(w) = writer.as_mut()
                && let Err(e) = w.write_all(chunk)
            {
                let message = format!("writing image {id:?} into the cache failed: {e}");
                log::warn!("{message}; passing the rest through");
                abort(&mut writer, &message);
                cache_error = Some(message);
            }
            if let Err(e) = sink.write_all(chunk) {
                abort(&mut writer, &format!("the destination failed: {e}"));
                return Err(Error::Sink(e));
            }
            bytes += n as u64;
        }
        if let Err(e) = sink.flush() {
            abort(&mut writer, &format!("the destination failed: {e}"));
            return Err(Error::Sink(e));
        }
        if let (Some(expected), Some(h)) = (expected, hasher) {
            let actual = h.finish();
            if actual != expected.hex {
                abort(&mut writer, "checksum mismatch");
                return Err(Error::ChecksumMismatch {
                    image_id: id.to_string(),
                    expected: expected.to_string(),
                    actual: format!("{}:{actual}", expected.algorithm.name()),
                });
            }
        }
        let cached = match writer {
            Some(w) => match w.commit(expected) {
                Ok(()) => true,
                Err(e) => {
                    log::warn!("committing image {id:?} to the cache failed: {e}");
                    cache_error = Some(e.to_string());
                    false
                }
            },
            None => false,
        };
        Ok(TeeReport {
            bytes,
            cached,
            cache_error,
        })
    }
}

/// Most calls one prune or delete-all makes (each works for about ten
/// seconds at most): a bound, should a driver keep reporting progress.
const MAX_EVICTION_CALLS: usize = 1000;

fn is_sqlite(source: &DriverSource) -> bool {
    matches!(source, DriverSource::Builtin("sqlite"))
}

/// Whether the configured driver is linked with the `database` import (the
/// centralized driver, or a component granted it).
fn shares_a_database(config: &CacheConfig) -> bool {
    match &config.driver {
        DriverSource::Builtin(name) => crate::builtin::find(name)
            .is_some_and(|b| b.grants.contains(&crate::contract::Capability::Database)),
        _ => config.policy.grants.database,
    }
}

fn classify_copy_error(e: io::Error, source: &Path) -> Error {
    // io::copy cannot say which side failed; ask the source.
    match std::fs::metadata(source) {
        Ok(_) if e.kind() != io::ErrorKind::InvalidData => Error::io("writing into the cache", &e),
        _ => Error::Source(io::Error::new(
            e.kind(),
            format!("{}: {e}", source.display()),
        )),
    }
}

fn start_driver(
    runtime: &Arc<Runtime>,
    root: &Arc<RootFs>,
    config: &CacheConfig,
    source: &DriverSource,
    policy: &LoadPolicy,
) -> Result<Arc<Driver>> {
    let component = runtime.component(source, policy)?;
    Driver::start(
        runtime.clone(),
        component,
        Placement {
            root: root.clone(),
            options: config.driver_options(),
            xattr: config.xattr,
            databases: config.databases.clone(),
            start_while_database_down: config.start_while_database_down,
        },
    )
}

/// A write session: write the bytes, then [`commit`](ImageWriter::commit)
/// or [`abort`](ImageWriter::abort). Dropped without either, the write is
/// aborted as "incomplete fetch" and the file lands in `invalid/`.
pub struct ImageWriter {
    session: Session,
    id: String,
    written: u64,
}

impl ImageWriter {
    pub fn image_id(&self) -> &str {
        &self.id
    }

    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Flush the bytes to stable storage and publish the image.
    pub fn commit(self, checksum: Option<&Checksum>) -> Result<()> {
        if let Err(e) = self.session.file_ref().sync_data() {
            let failure = Error::io(format_args!("flushing image {:?}", self.id), &e);
            let _ = self.abort(&failure.to_string());
            return Err(failure);
        }
        let checksum = checksum.map(|c| c.to_string());
        self.session.commit(checksum.as_deref())
    }

    /// Give up: the file moves to `invalid/` with `reason`.
    pub fn abort(self, reason: &str) -> Result<()> {
        self.session.abort(reason)
    }
}

impl Write for ImageWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.session.file().write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.session.file().flush()
    }
}

/// A read of a cached image. Reading to the end (or calling
/// [`finish`](ImageReader::finish)) counts the hit; dropping it earlier
/// counts nothing.
pub struct ImageReader {
    session: Option<Session>,
    id: String,
}

impl ImageReader {
    pub fn image_id(&self) -> &str {
        &self.id
    }

    /// The size of the file being read.
    pub fn size(&self) -> io::Result<u64> {
        match &self.session {
            Some(s) => Ok(s.file_ref().metadata()?.len()),
            None => Ok(0),
        }
    }

    /// The open cached file, for a caller that moves the bytes itself
    /// (e.g. a server answering range requests with positioned reads);
    /// [`finish`](ImageReader::finish) still counts the hit. `None` once
    /// the read has finished.
    pub fn file(&self) -> Option<&std::fs::File> {
        self.session.as_ref().map(|s| s.file_ref())
    }

    /// The checksum recorded when the image was cached (Glance's MD5 hex
    /// digest when the writer gave one), if the driver keeps one. One
    /// driver call; it does not end the read. An error (a driver fault)
    /// ends the read without a hit.
    pub fn checksum(&mut self) -> Result<Option<String>> {
        match self.session.as_mut() {
            Some(session) => {
                let result = session.checksum();
                if result.is_err() {
                    self.session = None;
                }
                result
            }
            None => Ok(None),
        }
    }

    /// End the read and count the hit (once).
    pub fn finish(&mut self) -> Result<()> {
        match self.session.take() {
            Some(session) => session.finish_read(),
            None => Ok(()),
        }
    }
}

impl Read for ImageReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(session) = self.session.as_mut() else {
            return Ok(0);
        };
        let n = session.file().read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.finish().map_err(io::Error::other)?;
        }
        Ok(n)
    }
}
