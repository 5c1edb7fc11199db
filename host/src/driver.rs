//! A loaded driver on one cache root: a bounded pool of configured
//! instances, the typed calls and sessions on top of them, and the checks on
//! everything a driver hands back.
//!
//! An instance is checked out of the pool for one call (or for a whole
//! session) and checked back in afterwards. A trap, a missed deadline (in
//! wasm or in a host import), a host panic or a broken contract poisons only
//! that instance: it is dropped and the next call makes a fresh one; the
//! caller gets [`Error::DriverFault`].
//!
//! What a driver returns is checked before the host acts on it: ids are
//! valid ids, listings are sorted and bounded, a write session's file is
//! the session's own `incomplete/<id>` (same device and inode) and a read
//! session's the cached `<id>`, and error messages are cut to a bounded,
//! printable line.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use wasmtime::Store;
use wasmtime::component::{Resource, ResourceAny};

use crate::bindings::types::{
    CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport, ReadRecord,
};
use crate::compat::{Bindings, Exports, GuestResult};
use crate::database::DatabaseRoot;
use crate::error::{Error, Result, validate_image_id};
use crate::fs::{FileIdentity, OpenFile, RootFs};
use crate::limits::{DEFAULT_SQLITE_DB, Deadline, printable};
use crate::runtime::{DriverComponent, HostState, MemoryBudget, Runtime, Sandbox};
use crate::xattr::XattrSupport;

/// Most idle instances kept per driver.
const MAX_IDLE: usize = 32;

/// A driver component bound to one cache root.
pub struct Driver {
    runtime: Arc<Runtime>,
    component: Arc<DriverComponent>,
    sandbox: Arc<Sandbox>,
    options: Vec<(String, String)>,
    info: DriverInfo,
    pool: Mutex<Pool>,
    freed: Condvar,
    /// Whether calls made without waiting go to this driver (see
    /// [`ImageCache::without_waiting`](crate::ImageCache::without_waiting)):
    /// not once one of them faulted.
    calls_without_waiting: AtomicBool,
}

/// Instances of a driver: the idle ones, and how many exist.
struct Pool {
    idle: Vec<(Instance, Instant)>,
    live: usize,
    /// Calls waiting for an instance (only then is the condvar signalled:
    /// a signal is a system call on the hot path).
    waiting: usize,
}

/// One instance of the driver: its store and its exports.
pub(crate) struct Instance {
    store: Store<HostState>,
    bindings: Bindings,
}

/// Where a driver runs: the root and its settings.
pub struct Placement {
    pub root: Arc<RootFs>,
    pub options: Vec<(String, String)>,
    pub xattr: XattrSupport,
    /// The databases the driver may open by name (`database` interface).
    pub databases: Arc<DatabaseRoot>,
    /// Start even if the driver's database cannot be reached now (its
    /// `configure` fails with a `database` error): every call then tries
    /// to configure a new instance, and fails the same way until the
    /// database is back. For a server, which serves what it can meanwhile.
    pub start_while_database_down: bool,
}

impl Driver {
    /// Instantiate and configure the driver on the root. A driver that
    /// cannot configure itself is an error here, before anyone uses it.
    pub fn start(
        runtime: Arc<Runtime>,
        component: Arc<DriverComponent>,
        placement: Placement,
    ) -> Result<Arc<Driver>> {
        let limits = runtime.limits().clone();
        // The last `image_cache_sqlite_db` given, as the driver reads it.
        let db_name = placement
            .options
            .iter()
            .rev()
            .find(|(k, _)| k == "image_cache_sqlite_db")
            .map_or(DEFAULT_SQLITE_DB, |(_, v)| v.as_str())
            .to_string();
        let tolerate = placement.start_while_database_down;
        let sandbox = Arc::new(Sandbox {
            root: placement.root,
            db_name,
            database: placement.databases,
            xattr: placement.xattr,
            memory: MemoryBudget::new(limits.memory_bytes),
        });
        let mut driver = Driver {
            runtime,
            component,
            sandbox,
            options: placement.options,
            info: DriverInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
            },
            pool: Mutex::new(Pool {
                idle: Vec::new(),
                live: 1,
                waiting: 0,
            }),
            freed: Condvar::new(),
            calls_without_waiting: AtomicBool::new(true),
        };
        let mut first = driver.instantiate_bare()?;
        let info = driver.guarded(&mut first, |g, s| g.call_info(s).map(Ok))?;
        driver.info = DriverInfo {
            name: printable(&info.name, 64),
            version: printable(&info.version, 64),
            description: printable(&info.description, 512),
        };
        match driver.configure(&mut first) {
            Ok(()) => lock(&driver.pool).idle.push((first, Instant::now())),
            Err(Error::Database(m)) if tolerate => {
                log::warn!(
                    "driver {} started without its database ({m}); its calls fail until the database is back",
                    driver.name()
                );
                lock(&driver.pool).live = 0;
            }
            Err(e) => return Err(e),
        }
        Ok(Arc::new(driver))
    }

    pub fn name(&self) -> &str {
        self.component.name()
    }

    pub fn info(&self) -> &DriverInfo {
        &self.info
    }

    /// Whether its calls may be made without waiting: not when it is
    /// granted a database (every call is a round trip to a server), nor
    /// once such a call of it faulted (it ran into the short deadline).
    pub(crate) fn calls_without_waiting(&self) -> bool {
        !self.component.grants().database && self.calls_without_waiting.load(Ordering::Relaxed)
    }

    /// A call made without waiting faulted: no more of them.
    pub(crate) fn stop_calls_without_waiting(&self) {
        self.calls_without_waiting.store(false, Ordering::Relaxed);
    }

    pub fn component(&self) -> &Arc<DriverComponent> {
        &self.component
    }

    pub fn root(&self) -> &RootFs {
        &self.sandbox.root
    }

    /// Linear memory all instances of this driver hold now.
    pub fn memory_used(&self) -> usize {
        self.sandbox.memory.used()
    }

    /// Instances of this driver that exist now (idle or busy).
    pub fn live_instances(&self) -> usize {
        lock(&self.pool).live
    }

    /// A new, configured instance.
    fn instantiate(&self) -> Result<Instance> {
        let mut instance = self.instantiate_bare()?;
        self.configure(&mut instance)?;
        Ok(instance)
    }

    /// A new instance, not configured yet.
    fn instantiate_bare(&self) -> Result<Instance> {
        let mut store = self.runtime.store(&self.sandbox);
        let bindings = self
            .component
            .pre()
            .instantiate(&mut store)
            .map_err(|e| self.fault(e))?;
        self.runtime.stats.instances.fetch_add(1, Ordering::Relaxed);
        Ok(Instance { store, bindings })
    }

    fn configure(&self, instance: &mut Instance) -> Result<()> {
        let options = self.options.clone();
        self.guarded(instance, |g, s| g.call_configure(s, &options))
            .map_err(|e| match e {
                Error::BadConfiguration(m) => Error::BadConfiguration(format!(
                    "driver {} cannot use cache root {}: {m}",
                    self.name(),
                    self.root().path().display()
                )),
                other => other,
            })
    }

    /// A trap or host error during a call, as one line naming the cause.
    fn fault(&self, e: wasmtime::Error) -> Error {
        let limits = self.runtime.limits();
        let cause = e.root_cause().to_string();
        let cause = printable(cause.lines().next().unwrap_or("unknown").trim(), 512);
        let message = match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => format!(
                "it ran past its deadline of {:?} and was stopped",
                self.runtime.call_deadline()
            ),
            _ if cause.contains("growing memory") => format!(
                "it trapped: it exceeded its memory cap of {} bytes across its instances ({cause})",
                limits.memory_bytes
            ),
            _ => format!("it trapped: {cause}"),
        };
        self.broke(message)
    }

    fn broke(&self, message: String) -> Error {
        Error::DriverFault {
            driver: self.name().to_string(),
            message,
        }
    }

    /// Run one export call with a fresh deadline (for wasm code and for the
    /// host imports it calls). A trap, a host panic, or a host import that
    /// ran into the deadline is a fault.
    fn guarded<T>(
        &self,
        instance: &mut Instance,
        call: impl FnOnce(Exports<'_>, &mut Store<HostState>) -> GuestResult<T>,
    ) -> Result<T> {
        let deadline = self.runtime.call_deadline();
        instance.store.data_mut().deadline = Deadline(Instant::now() + deadline);
        instance
            .store
            .set_epoch_deadline(self.runtime.deadline_ticks());
        let guest = instance.bindings.exports();
        let store = &mut instance.store;
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call(guest, &mut *store)));
        let overran = instance.store.data().deadline.passed();
        // No byte-range lock or database transaction outlives the call.
        instance.store.data_mut().end_call();
        match outcome {
            // A call that ran into its deadline inside a host import (which
            // stopped there) is stopped, whatever the driver made of it.
            Ok(Ok(result)) if overran => Err(self.broke(format!(
                "it ran past its deadline of {deadline:?} inside a host call and was stopped{}",
                match result {
                    Ok(_) => String::new(),
                    Err(e) => format!(" ({})", printable(&Error::from(e).to_string(), 256)),
                }
            ))),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(e.into()),
            Ok(Err(e)) => Err(self.fault(e)),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown".to_string());
                log::error!(
                    "host bug: a call of driver {} panicked: {what}",
                    self.name()
                );
                Err(self.broke(format!(
                    "the host failed while serving it ({})",
                    printable(&what, 256)
                )))
            }
        }
    }

    /// An instance for one call: an idle one, a new one while fewer than
    /// the cap exist, or the next one freed within `instance_wait`.
    pub(crate) fn checkout(&self) -> Result<Instance> {
        let limits = self.runtime.limits();
        let give_up = Instant::now() + limits.instance_wait;
        let mut pool = lock(&self.pool);
        loop {
            if let Some((instance, _)) = pool.idle.pop() {
                return Ok(instance);
            }
            if pool.live < limits.instances.max(1) {
                pool.live += 1;
                drop(pool);
                return self.instantiate().inspect_err(|_| self.forget_instance());
            }
            let now = Instant::now();
            if now >= give_up {
                return Err(Error::Overloaded(format!(
                    "driver {}: all {} instances stayed busy for {:?}",
                    self.name(),
                    limits.instances,
                    limits.instance_wait
                )));
            }
            pool.waiting += 1;
            pool = self
                .freed
                .wait_timeout(pool, give_up - now)
                .map(|(guard, _)| guard)
                .unwrap_or_else(|poisoned| poisoned.into_inner().0);
            pool.waiting -= 1;
        }
    }

    /// An instance is gone (dropped after a fault, or never made).
    fn forget_instance(&self) {
        let mut pool = lock(&self.pool);
        pool.live -= 1;
        if pool.waiting > 0 {
            self.freed.notify_one();
        }
    }

    /// After a call: the instance goes back to the pool, unless the call
    /// faulted, in which case it is dropped (and counted). Instances idle
    /// for longer than the idle timeout are released.
    fn settle<T>(&self, instance: Instance, result: &Result<T>) {
        if matches!(result, Err(Error::DriverFault { .. })) {
            self.runtime
                .stats
                .instances_discarded
                .fetch_add(1, Ordering::Relaxed);
            drop(instance);
            self.forget_instance();
            return;
        }
        let idle_timeout = self.runtime.limits().idle_timeout;
        let now = Instant::now();
        let mut released = Vec::new();
        let waiting = {
            let mut pool = lock(&self.pool);
            pool.idle.push((instance, now));
            // Oldest first; keep one warm whatever its age.
            while pool.idle.len() > 1
                && (pool.idle.len() > MAX_IDLE || now - pool.idle[0].1 > idle_timeout)
            {
                released.push(pool.idle.remove(0));
                pool.live -= 1;
            }
            pool.waiting
        };
        if waiting > 0 {
            self.freed.notify_all();
        }
        drop(released); // stores are freed outside the lock
    }

    /// Run `call` on an instance from the pool; a faulted instance is dropped.
    pub(crate) fn call<T>(
        &self,
        call: impl FnOnce(Exports<'_>, &mut Store<HostState>) -> GuestResult<T>,
    ) -> Result<T> {
        self.call_checked(call, |_| Ok(()))
    }

    /// Like [`Driver::call`], and the result must pass `check`: a driver
    /// that returns garbage is treated like one that trapped.
    pub(crate) fn call_checked<T>(
        &self,
        call: impl FnOnce(Exports<'_>, &mut Store<HostState>) -> GuestResult<T>,
        check: impl FnOnce(&T) -> std::result::Result<(), String>,
    ) -> Result<T> {
        let mut instance = self.checkout()?;
        let result = self
            .guarded(&mut instance, call)
            .and_then(|value| match check(&value) {
                Ok(()) => Ok(value),
                Err(broken) => Err(self.broke(format!("it broke the driver contract: {broken}"))),
            });
        self.settle(instance, &result);
        result
    }

    pub fn get_cache_size(&self) -> Result<u64> {
        self.call(|g, s| g.call_get_cache_size(s))
    }

    pub fn get_hit_count(&self, id: &str) -> Result<u64> {
        self.call(|g, s| g.call_get_hit_count(s, id))
    }

    /// `record-reads`: ids are checked first; a driver that claims more
    /// reads than it was given broke the contract.
    pub fn record_reads(&self, reads: &[ReadRecord]) -> Result<u64> {
        for read in reads {
            validate_image_id(&read.image_id)?;
        }
        self.call_checked(
            |g, s| g.call_record_reads(s, reads),
            |&recorded| {
                if recorded > reads.len() as u64 {
                    Err(format!(
                        "record-reads recorded {recorded} reads of the {} it was given",
                        reads.len()
                    ))
                } else {
                    Ok(())
                }
            },
        )
    }

    pub fn get_cached_images(&self) -> Result<Vec<CachedImage>> {
        self.call_checked(
            |g, s| g.call_get_cached_images(s),
            |images| {
                valid_ids("get-cached-images", images.iter().map(|i| &i.image_id[..]))?;
                match images.windows(2).find(|w| w[0].image_id >= w[1].image_id) {
                    Some(w) => Err(format!(
                        "get-cached-images is not ordered by id ({:?} before {:?})",
                        w[0].image_id, w[1].image_id
                    )),
                    None => Ok(()),
                }
            },
        )
    }

    pub fn is_cached(&self, id: &str) -> Result<bool> {
        self.call(|g, s| g.call_is_cached(s, id))
    }

    pub fn is_being_cached(&self, id: &str) -> Result<bool> {
        self.call(|g, s| g.call_is_being_cached(s, id))
    }

    pub fn is_cacheable(&self, id: &str) -> Result<bool> {
        self.call(|g, s| g.call_is_cacheable(s, id))
    }

    pub fn is_queued(&self, id: &str) -> Result<bool> {
        self.call(|g, s| g.call_is_queued(s, id))
    }

    pub fn queue_image(&self, id: &str) -> Result<bool> {
        self.call(|g, s| g.call_queue_image(s, id))
    }

    pub fn get_queued_images(&self) -> Result<Vec<String>> {
        self.call_checked(
            |g, s| g.call_get_queued_images(s),
            |ids| valid_ids("get-queued-images", ids.iter().map(|i| &i[..])),
        )
    }

    pub fn delete_cached_image(&self, id: &str) -> Result<()> {
        self.call(|g, s| g.call_delete_cached_image(s, id))
    }

    pub fn delete_all_cached_images(&self) -> Result<u64> {
        self.call(|g, s| g.call_delete_all_cached_images(s))
    }

    pub fn delete_queued_image(&self, id: &str) -> Result<()> {
        self.call(|g, s| g.call_delete_queued_image(s, id))
    }

    pub fn delete_all_queued_images(&self) -> Result<u64> {
        self.call(|g, s| g.call_delete_all_queued_images(s))
    }

    pub fn get_least_recently_accessed(&self) -> Result<Option<(String, u64)>> {
        self.call_checked(
            |g, s| g.call_get_least_recently_accessed(s),
            |lru| {
                valid_ids(
                    "get-least-recently-accessed",
                    lru.iter().map(|(id, _)| &id[..]),
                )
            },
        )
    }

    pub fn get_least_recently_accessed_batch(&self, count: u32) -> Result<Vec<LruEntry>> {
        self.call_checked(
            |g, s| g.call_get_least_recently_accessed_batch(s, count),
            |batch| {
                if batch.len() > count as usize {
                    return Err(format!(
                        "asked for {count} LRU entries, got {}",
                        batch.len()
                    ));
                }
                valid_ids("the LRU batch", batch.iter().map(|e| &e.image_id[..]))
            },
        )
    }

    pub fn get_image_size(&self, id: &str) -> Result<u64> {
        self.call(|g, s| g.call_get_image_size(s, id))
    }

    pub fn get_cached_nodes(&self, id: &str) -> Result<Vec<String>> {
        self.call_checked(
            |g, s| g.call_get_cached_nodes(s, id),
            |nodes| match nodes
                .iter()
                .find(|n| n.len() > 2048 || n.chars().any(char::is_control))
            {
                Some(n) => Err(format!(
                    "get-cached-nodes returned an unusable node name {:?}",
                    printable(n, 64)
                )),
                None => Ok(()),
            },
        )
    }

    pub fn clean(&self, stall_time: Option<u64>) -> Result<CleanReport> {
        self.call_checked(
            |g, s| g.call_clean(s, stall_time),
            |report| {
                let ids = report.invalid.iter().chain(&report.incomplete);
                valid_ids("clean", ids.map(|r| &r.image_id[..]))
            },
        )
        .map(|mut report| {
            bound_messages(&mut report.failures);
            report
        })
    }

    pub fn prune(&self, max_size: u64) -> Result<PruneReport> {
        self.call_checked(
            |g, s| g.call_prune(s, max_size),
            |report| {
                valid_ids("prune", report.removed.iter().map(|r| &r.image_id[..]))?;
                let sum = report
                    .removed
                    .iter()
                    .try_fold(0u64, |total, r| total.checked_add(r.size));
                match sum {
                    Some(sum) if sum == report.bytes_removed => Ok(()),
                    _ => Err(format!(
                        "prune reported {} bytes removed, but its files add up to {sum:?}",
                        report.bytes_removed
                    )),
                }
            },
        )
        .map(|mut report| {
            bound_messages(&mut report.failures);
            report
        })
    }

    /// Open a session: `open` runs on an instance that the session then
    /// keeps until it ends, and returns the guest's session and file. The
    /// file must be the session's own (`path` in the root, same device and
    /// inode), or the driver broke the contract.
    fn open_session(
        self: &Arc<Self>,
        kind: SessionKind,
        id: &str,
        open: impl FnOnce(
            Exports<'_>,
            &mut Store<HostState>,
        ) -> GuestResult<(ResourceAny, Resource<OpenFile>)>,
    ) -> Result<Session> {
        let mut instance = self.checkout()?;
        let result = self
            .guarded(&mut instance, open)
            .and_then(|(resource, file)| {
                // The file moves to the host: image bytes never enter the guest.
                let file = instance
                    .store
                    .data_mut()
                    .table
                    .delete(file)
                    .map_err(|e| self.fault(e.into()))?;
                let identity = self.check_session_file(kind, id, &file)?;
                if kind == SessionKind::Read {
                    self.check_seal(id, &file)?;
                }
                Ok((resource, file, identity))
            });
        let (resource, file, identity) = match result {
            Ok(opened) => opened,
            Err(e) => {
                let failed = Err(e);
                self.settle(instance, &failed);
                return failed;
            }
        };
        Ok(Session {
            driver: self.clone(),
            id: id.to_string(),
            instance: Some(instance),
            resource: Some(resource),
            file: Some(file),
            identity,
        })
    }

    /// A session's file is `incomplete/<id>` created for writing, or the
    /// cached `<id>`, and not anything else of the root.
    fn check_session_file(
        &self,
        kind: SessionKind,
        id: &str,
        file: &OpenFile,
    ) -> Result<FileIdentity> {
        let path = match kind {
            SessionKind::Write => format!("incomplete/{id}"),
            SessionKind::Read => id.to_string(),
        };
        let broke = |why: String| {
            self.broke(format!(
                "it broke the driver contract: the {} session of {id:?} handed back {why}",
                kind.name()
            ))
        };
        if kind == SessionKind::Write && !file.writable {
            return Err(broke(format!("{:?}, not a file it created", file.path)));
        }
        let handed = file
            .identity()
            .map_err(|e| broke(format!("a file the host cannot stat ({e})")))?;
        match self.root().identity(&path) {
            Ok(expected) if expected == handed => Ok(handed),
            Ok(_) => Err(broke(format!("{:?}, which is not {path}", file.path))),
            Err(e) => Err(broke(format!(
                "{:?}, which is not {path} ({})",
                file.path, e.message
            ))),
        }
    }

    /// A cached image's file carries the id the host sealed it with at
    /// commit (an attribute the driver cannot reach): a driver that renamed
    /// another image's file over this one is caught here, before a byte is
    /// served. Unsealed files (release 0.2's, Glance's, or on a file system
    /// without user attributes) pass.
    fn check_seal(&self, id: &str, file: &OpenFile) -> Result<()> {
        match crate::xattr::read_seal(&file.file) {
            Ok(crate::xattr::Seal::Id(sealed)) if sealed != id.as_bytes() => {
                Err(self.broke(format!(
                    "it broke the driver contract: the read session of {id:?} handed back the \
                     file committed as {:?}",
                    printable(&String::from_utf8_lossy(&sealed), 80)
                )))
            }
            Ok(_) => Ok(()),
            Err(e) => Err(Error::io(format_args!("reading the seal of {id:?}"), &e)),
        }
    }

    pub(crate) fn open_for_write(self: &Arc<Self>, id: &str) -> Result<Session> {
        validate_image_id(id)?;
        self.open_session(SessionKind::Write, id, |g, s| g.call_open_for_write(s, id))
    }

    pub(crate) fn open_for_read(self: &Arc<Self>, id: &str) -> Result<Session> {
        validate_image_id(id)?;
        self.open_session(SessionKind::Read, id, |g, s| g.call_open_for_read(s, id))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Every id a driver returned must be a valid image id before the host
/// uses it (in a path, a URL, a log line).
fn valid_ids<'a>(
    what: &str,
    ids: impl Iterator<Item = &'a str>,
) -> std::result::Result<(), String> {
    for id in ids {
        if let Err(e) = validate_image_id(id) {
            return Err(format!("{what} returned {e}"));
        }
    }
    Ok(())
}

/// At most this many failure messages of a report are kept.
const MAX_REPORTED_FAILURES: usize = 1000;

fn bound_messages(failures: &mut Vec<String>) {
    failures.truncate(MAX_REPORTED_FAILURES);
    for f in failures.iter_mut() {
        *f = printable(f, 512);
    }
}

/// The sum of sizes a driver reported, saturating rather than overflowing
/// (a hostile driver's sizes must not panic a checked build).
pub fn saturating_total(sizes: impl IntoIterator<Item = u64>) -> u64 {
    sizes.into_iter().fold(0, u64::saturating_add)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SessionKind {
    Write,
    Read,
}

impl SessionKind {
    fn name(self) -> &'static str {
        match self {
            SessionKind::Write => "write",
            SessionKind::Read => "read",
        }
    }
}

/// A write or read session: the instance it began on, the guest's session
/// resource, and the file the host moves bytes through. Dropping it drops
/// the guest's resource (a write session then aborts as "incomplete fetch").
pub(crate) struct Session {
    driver: Arc<Driver>,
    id: String,
    instance: Option<Instance>,
    resource: Option<ResourceAny>,
    /// Taken only by `finish_read`, which lends it back to the guest.
    file: Option<OpenFile>,
    /// Which file it is (checked when it was handed over).
    identity: FileIdentity,
}

impl Session {
    fn open_file(&self) -> &OpenFile {
        self.file
            .as_ref()
            .expect("a session's file is taken only when it ends")
    }

    /// The file the host moves the bytes through.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self
            .file
            .as_mut()
            .expect("a session's file is taken only when it ends")
            .file
    }

    pub fn file_ref(&self) -> &std::fs::File {
        &self.open_file().file
    }

    /// The file's size when the driver opened it.
    pub fn file_size(&self) -> u64 {
        self.open_file().size_at_open
    }

    /// Call a method of the guest's session, then end the session.
    fn finish_with(
        &mut self,
        call: impl FnOnce(Exports<'_>, &mut Store<HostState>, ResourceAny) -> GuestResult<()>,
    ) -> Result<()> {
        let (Some(mut instance), Some(resource)) = (self.instance.take(), self.resource.take())
        else {
            return Err(Error::io_message(format!(
                "the session of image {:?} has already ended",
                self.id
            )));
        };
        let result = self
            .driver
            .guarded(&mut instance, |g, s| call(g, s, resource));
        self.release(instance, resource, result)
    }

    /// Drop the guest's resource (running its destructor) and return the
    /// instance to the pool unless something faulted.
    fn release(
        &self,
        mut instance: Instance,
        resource: ResourceAny,
        result: Result<()>,
    ) -> Result<()> {
        let dropped = self
            .driver
            .guarded(&mut instance, |_, s| resource.resource_drop(s).map(Ok));
        let result = match (result, dropped) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(e),
            (Ok(()), Ok(())) => Ok(()),
        };
        self.driver.settle(instance, &result);
        result
    }

    /// Seal the file as this image (see `check_seal`), publish it;
    /// afterwards `<id>` must be the very file written.
    pub fn commit(mut self, checksum: Option<&str>) -> Result<()> {
        crate::xattr::seal(self.file_ref(), &self.id)
            .map_err(|e| Error::io(format_args!("sealing image {:?}", self.id), &e))?;
        self.finish_with(|g, s, r| g.write_session().call_commit(s, r, checksum))?;
        match self.driver.root().identity(&self.id) {
            Ok(published) if published == self.identity => Ok(()),
            _ => Err(self.driver.broke(format!(
                "it broke the driver contract: after the commit of {:?}, {:?} is not the file that was written",
                self.id, self.id
            ))),
        }
    }

    pub fn abort(mut self, reason: &str) -> Result<()> {
        self.finish_with(|g, s, r| g.write_session().call_abort(s, r, reason))
    }

    /// The checksum the driver recorded for the image being read. The file
    /// is lent to the guest for the call, as for `finish`. A checksum that
    /// could not be sent as a header value (longer than 128 bytes, or not
    /// letters, digits and `+/=_:-`) breaks the contract; any failure ends
    /// the session uncounted.
    pub fn checksum(&mut self) -> Result<Option<String>> {
        let (Some(file), Some(mut instance), Some(resource)) =
            (self.file.take(), self.instance.take(), self.resource)
        else {
            return Err(Error::io_message(format!(
                "the session of image {:?} has already ended",
                self.id
            )));
        };
        let result = match self.lend_file(&mut instance, file, |g, s, f| {
            g.read_session().call_checksum(s, resource, f)
        }) {
            Ok((result, Ok(file))) => {
                self.file = Some(file);
                result.and_then(|c| match c {
                    Some(c) if !usable_checksum(&c) => Err(self.driver.broke(format!(
                        "it broke the driver contract: the checksum of {:?} is not a short token of letters, digits and +/=_:-",
                        self.id
                    ))),
                    c => Ok(c),
                })
            }
            Ok((_, Err(fault))) | Err(fault) => Err(fault),
        };
        match result {
            Ok(c) => {
                self.instance = Some(instance);
                Ok(c)
            }
            Err(e) => {
                self.resource = None;
                self.release(instance, resource, Err(e)).map(|()| None)
            }
        }
    }

    /// End a read: the file goes back into the guest's table for the
    /// duration of `finish`, so the driver records the access on the very
    /// file that was read.
    pub fn finish_read(mut self) -> Result<()> {
        let (Some(file), Some(mut instance), Some(resource)) =
            (self.file.take(), self.instance.take(), self.resource.take())
        else {
            return Ok(());
        };
        // The file is not needed after `finish`: whether it comes back out
        // of the guest's table does not matter.
        let result = self
            .lend_file(&mut instance, file, |g, s, f| {
                g.read_session().call_finish(s, resource, f)
            })
            .and_then(|(result, _file)| result);
        self.release(instance, resource, result)
    }

    /// Lend `file` to the guest for one call (as a borrowed resource of its
    /// table, so the driver works on the very file of the session), then
    /// take it back. `Err` if the table refused it (a fault); else the
    /// call's result, and the file or the fault that kept it in the table.
    fn lend_file<T>(
        &self,
        instance: &mut Instance,
        file: OpenFile,
        call: impl FnOnce(Exports<'_>, &mut Store<HostState>, Resource<OpenFile>) -> GuestResult<T>,
    ) -> Result<(Result<T>, Result<OpenFile>)> {
        let lent = instance
            .store
            .data_mut()
            .table
            .push(file)
            .map_err(|e| self.driver.fault(e.into()))?;
        let borrowed = Resource::<OpenFile>::new_borrow(lent.rep());
        let result = self.driver.guarded(instance, |g, s| call(g, s, borrowed));
        let back = instance
            .store
            .data_mut()
            .table
            .delete(lent)
            .map_err(|e| self.driver.fault(e.into()));
        Ok((result, back))
    }
}

/// A checksum that can go into a header value and an `ETag` as it is.
fn usable_checksum(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 128
        && c.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+/=_:-".contains(&b))
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(instance), Some(resource)) = (self.instance.take(), self.resource.take())
            && let Err(e) = self.release(instance, resource, Ok(()))
        {
            log::warn!("ending a session of driver {}: {e}", self.driver.name());
        }
    }
}
