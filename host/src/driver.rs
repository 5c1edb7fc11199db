//! A loaded driver on one cache root: a pool of configured instances, and
//! the typed calls and sessions on top of them.
//!
//! An instance is checked out of the pool for one call (or for a whole
//! session) and checked back in afterwards. A trap or a missed deadline
//! poisons only that instance: it is dropped and the next call makes a fresh
//! one; the caller gets [`Error::DriverFault`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use wasmtime::Store;
use wasmtime::component::{Resource, ResourceAny};

use crate::bindings::Driver as Bindings;
use crate::bindings::cache_driver::Guest;
use crate::bindings::types::{CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport};
use crate::error::{Error, Result};
use crate::fs::{OpenFile, RootFs};
use crate::runtime::{DriverComponent, HostState, Runtime};
use crate::sqlite::SqliteRoot;
use crate::xattr::XattrSupport;

/// Most idle instances kept per driver.
const MAX_IDLE: usize = 32;

/// A driver component bound to one cache root.
pub struct Driver {
    runtime: Arc<Runtime>,
    component: Arc<DriverComponent>,
    root: Arc<RootFs>,
    sqlite: Arc<SqliteRoot>,
    xattr: XattrSupport,
    options: Vec<(String, String)>,
    info: DriverInfo,
    idle: Mutex<Vec<Instance>>,
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
}

impl Driver {
    /// Instantiate and configure the driver on the root. A driver that
    /// cannot configure itself is an error here, before anyone uses it.
    pub fn start(
        runtime: Arc<Runtime>,
        component: Arc<DriverComponent>,
        placement: Placement,
    ) -> Result<Arc<Driver>> {
        let sqlite = Arc::new(
            SqliteRoot::new(&placement.root)
                .with_max_result_bytes(runtime.limits().max_query_bytes),
        );
        let mut driver = Driver {
            runtime,
            component,
            root: placement.root,
            sqlite,
            xattr: placement.xattr,
            options: placement.options,
            info: DriverInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
            },
            idle: Mutex::new(Vec::new()),
        };
        let mut first = driver.instantiate()?;
        driver.info = driver.guarded(&mut first, |g, s| g.call_info(s).map(Ok))?;
        driver.idle.get_mut().unwrap().push(first);
        Ok(Arc::new(driver))
    }

    pub fn name(&self) -> &str {
        self.component.name()
    }

    pub fn info(&self) -> &DriverInfo {
        &self.info
    }

    pub fn component(&self) -> &Arc<DriverComponent> {
        &self.component
    }

    pub fn root(&self) -> &RootFs {
        &self.root
    }

    /// A new, configured instance.
    fn instantiate(&self) -> Result<Instance> {
        let mut store = self.runtime.store(&self.root, &self.sqlite, self.xattr);
        let bindings = self
            .component
            .pre()
            .instantiate(&mut store)
            .map_err(|e| self.fault(e))?;
        self.runtime.stats.instances.fetch_add(1, Ordering::Relaxed);
        let mut instance = Instance { store, bindings };
        let options = self.options.clone();
        self.guarded(&mut instance, |g, s| g.call_configure(s, &options))
            .map_err(|e| match e {
                Error::BadConfiguration(m) => Error::BadConfiguration(format!(
                    "driver {} cannot use cache root {}: {m}",
                    self.name(),
                    self.root.path().display()
                )),
                other => other,
            })?;
        Ok(instance)
    }

    /// A trap or host error during a call, as one line naming the cause.
    fn fault(&self, e: wasmtime::Error) -> Error {
        let limits = self.runtime.limits();
        let cause = e.root_cause().to_string();
        let cause = cause.lines().next().unwrap_or("unknown").trim().to_string();
        let message = match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => format!(
                "it ran past its deadline of {:?} and was stopped",
                limits.call_deadline
            ),
            _ if cause.contains("growing memory") => format!(
                "it trapped: it exceeded its memory cap of {} bytes ({cause})",
                limits.memory_bytes
            ),
            _ => format!("it trapped: {cause}"),
        };
        Error::DriverFault {
            driver: self.name().to_string(),
            message,
        }
    }

    /// Run one export call with a fresh deadline; a trap is a fault.
    fn guarded<T>(
        &self,
        instance: &mut Instance,
        call: impl FnOnce(
            &Guest,
            &mut Store<HostState>,
        )
            -> wasmtime::Result<std::result::Result<T, crate::bindings::types::Error>>,
    ) -> Result<T> {
        instance
            .store
            .set_epoch_deadline(self.runtime.deadline_ticks());
        let guest = instance.bindings.image_cache_driver_cache_driver();
        match call(guest, &mut instance.store) {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(self.fault(e)),
        }
    }

    pub(crate) fn checkout(&self) -> Result<Instance> {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(instance) => Ok(instance),
            None => self.instantiate(),
        }
    }

    /// After a call: the instance goes back to the pool, unless the call
    /// faulted, in which case it is dropped (and counted).
    fn settle<T>(&self, instance: Instance, result: &Result<T>) {
        if matches!(result, Err(Error::DriverFault { .. })) {
            self.runtime
                .stats
                .instances_discarded
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < MAX_IDLE {
            idle.push(instance);
        }
    }

    /// Run `call` on an instance from the pool; a faulted instance is dropped.
    pub(crate) fn call<T>(
        &self,
        call: impl FnOnce(
            &Guest,
            &mut Store<HostState>,
        )
            -> wasmtime::Result<std::result::Result<T, crate::bindings::types::Error>>,
    ) -> Result<T> {
        self.call_checked(call, |_| Ok(()))
    }

    /// Like [`Driver::call`], and the result must pass `check`: a driver
    /// that returns garbage is treated like one that trapped.
    pub(crate) fn call_checked<T>(
        &self,
        call: impl FnOnce(
            &Guest,
            &mut Store<HostState>,
        )
            -> wasmtime::Result<std::result::Result<T, crate::bindings::types::Error>>,
        check: impl FnOnce(&T) -> std::result::Result<(), String>,
    ) -> Result<T> {
        let mut instance = self.checkout()?;
        let result = self
            .guarded(&mut instance, call)
            .and_then(|value| match check(&value) {
                Ok(()) => Ok(value),
                Err(broken) => Err(Error::DriverFault {
                    driver: self.name().to_string(),
                    message: format!("it broke the driver contract: {broken}"),
                }),
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

    pub fn get_cached_images(&self) -> Result<Vec<CachedImage>> {
        self.call_checked(
            |g, s| g.call_get_cached_images(s),
            |images| match images.windows(2).find(|w| w[0].image_id >= w[1].image_id) {
                Some(w) => Err(format!(
                    "get-cached-images is not ordered by id ({:?} before {:?})",
                    w[0].image_id, w[1].image_id
                )),
                None => Ok(()),
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
        self.call(|g, s| g.call_get_queued_images(s))
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
        self.call(|g, s| g.call_get_least_recently_accessed(s))
    }

    pub fn get_least_recently_accessed_batch(&self, count: u32) -> Result<Vec<LruEntry>> {
        self.call_checked(
            |g, s| g.call_get_least_recently_accessed_batch(s, count),
            |batch| match batch.len() > count as usize {
                true => Err(format!(
                    "asked for {count} LRU entries, got {}",
                    batch.len()
                )),
                false => Ok(()),
            },
        )
    }

    pub fn get_image_size(&self, id: &str) -> Result<u64> {
        self.call(|g, s| g.call_get_image_size(s, id))
    }

    pub fn clean(&self, stall_time: Option<u64>) -> Result<CleanReport> {
        self.call(|g, s| g.call_clean(s, stall_time))
    }

    pub fn prune(&self, max_size: u64) -> Result<PruneReport> {
        self.call(|g, s| g.call_prune(s, max_size))
    }

    /// Open a session: `open` runs on an instance that the session then
    /// keeps until it ends, and returns the guest's session and file.
    fn open_session(
        self: &Arc<Self>,
        open: impl FnOnce(
            &Guest,
            &mut Store<HostState>,
        ) -> wasmtime::Result<
            std::result::Result<(ResourceAny, Resource<OpenFile>), crate::bindings::types::Error>,
        >,
    ) -> Result<Session> {
        let mut instance = self.checkout()?;
        let result = self.guarded(&mut instance, open);
        let (resource, file) = match result {
            Ok(opened) => opened,
            Err(e) => {
                let failed = Err(e);
                self.settle(instance, &failed);
                return failed;
            }
        };
        // The file moves to the host: image bytes never enter the guest.
        let file = match instance.store.data_mut().table.delete(file) {
            Ok(open_file) => open_file,
            Err(e) => {
                let failed = Err(self.fault(e.into()));
                self.settle(instance, &failed);
                return failed;
            }
        };
        Ok(Session {
            driver: self.clone(),
            instance: Some(instance),
            resource: Some(resource),
            file: Some(file),
        })
    }

    pub(crate) fn open_for_write(self: &Arc<Self>, id: &str) -> Result<Session> {
        self.open_session(|g, s| g.call_open_for_write(s, id))
    }

    pub(crate) fn open_for_read(self: &Arc<Self>, id: &str) -> Result<Session> {
        self.open_session(|g, s| g.call_open_for_read(s, id))
    }
}

/// A write or read session: the instance it began on, the guest's session
/// resource, and the file the host moves bytes through. Dropping it drops
/// the guest's resource (a write session then aborts as "incomplete fetch").
pub(crate) struct Session {
    driver: Arc<Driver>,
    instance: Option<Instance>,
    resource: Option<ResourceAny>,
    /// Taken only by `finish_read`, which lends it back to the guest.
    file: Option<OpenFile>,
}

impl Session {
    /// The file the host moves the bytes through.
    pub fn file(&mut self) -> &mut std::fs::File {
        &mut self.file.as_mut().expect("session file").file
    }

    pub fn file_ref(&self) -> &std::fs::File {
        &self.file.as_ref().expect("session file").file
    }

    /// The file's size when the driver opened it.
    pub fn file_size(&self) -> u64 {
        self.file.as_ref().expect("session file").size_at_open
    }

    /// Call a method of the guest's session, then end the session.
    pub fn finish_with(
        mut self,
        call: impl FnOnce(
            &Guest,
            &mut Store<HostState>,
            ResourceAny,
        )
            -> wasmtime::Result<std::result::Result<(), crate::bindings::types::Error>>,
    ) -> Result<()> {
        let mut instance = self.instance.take().expect("session has its instance");
        let resource = self.resource.take().expect("session has its resource");
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
        let dropped = {
            instance
                .store
                .set_epoch_deadline(self.driver.runtime.deadline_ticks());
            resource.resource_drop(&mut instance.store)
        };
        let result = match (result, dropped) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(e)) => Err(self.driver.fault(e)),
            (Ok(()), Ok(())) => Ok(()),
        };
        self.driver.settle(instance, &result);
        result
    }

    pub fn commit(self, checksum: Option<&str>) -> Result<()> {
        self.finish_with(|g, s, r| g.write_session().call_commit(s, r, checksum))
    }

    pub fn abort(self, reason: &str) -> Result<()> {
        self.finish_with(|g, s, r| g.write_session().call_abort(s, r, reason))
    }

    /// End a read: the file goes back into the guest's table for the
    /// duration of `finish`, so the driver records the access on the very
    /// file that was read.
    pub fn finish_read(mut self) -> Result<()> {
        let file = self.file.take().expect("session file");
        let mut instance = self.instance.take().expect("session has its instance");
        let resource = self.resource.take().expect("session has its resource");
        let lent = match instance.store.data_mut().table.push(file) {
            Ok(lent) => lent,
            Err(e) => {
                let fault = self.driver.fault(e.into());
                return self.release(instance, resource, Err(fault));
            }
        };
        let borrowed = Resource::<OpenFile>::new_borrow(lent.rep());
        let result = self.driver.guarded(&mut instance, |g, s| {
            g.read_session().call_finish(s, resource, borrowed)
        });
        let _ = instance.store.data_mut().table.delete(lent);
        self.release(instance, resource, result)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let (Some(instance), Some(resource)) = (self.instance.take(), self.resource.take()) {
            if let Err(e) = self.release(instance, resource, Ok(())) {
                log::warn!("ending a session of driver {}: {e}", self.driver.name());
            }
        }
    }
}
