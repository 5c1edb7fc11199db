//! Drivers of earlier contract versions, linked through adapters.
//!
//! One implementation serves every version: each module here has the
//! bindings of one earlier contract (its WIT kept in `host/wit-<version>/`),
//! implements that version's imports by calling the current ones, and
//! converts its exports' values to the current types. A driver is called
//! through [`Exports`], whatever its version, so nothing above the runtime
//! knows which contract it speaks.
//!
//! | contract | linked | how |
//! | --- | --- | --- |
//! | 0.3.x | as is | the current bindings (`crate::bindings`) |
//! | 0.2.0 | through [`v0_2`] | without the `sqlite` import (0.3.0 retired it: a 0.2.0 driver that imports it is refused by name); `io` errors arrive without their fs code; `database` only on PostgreSQL (0.2.0 drivers write PostgreSQL's SQL) |
//! | 0.1.x | refused | 0.1 drivers imported WASI |

pub(crate) mod v0_2;

use wasmtime::Store;
use wasmtime::component::{InstancePre, Resource, ResourceAny};

use crate::bindings::cache_driver::Guest;
use crate::bindings::{Driver, DriverPre, types};
use crate::contract::Version;
use crate::fs::OpenFile;
use crate::runtime::HostState;

/// A driver component linked and ready to instantiate, by contract.
#[derive(Clone)]
pub(crate) enum Pre {
    Current(DriverPre<HostState>),
    V0_2(v0_2::DriverPre<HostState>),
}

impl Pre {
    /// The bindings of the contract `version` (which the manifest check
    /// accepted) over a linked component.
    pub(crate) fn new(version: Version, pre: InstancePre<HostState>) -> wasmtime::Result<Pre> {
        Ok(match (version.major, version.minor) {
            (0, 2) => Pre::V0_2(v0_2::DriverPre::new(pre)?),
            _ => Pre::Current(DriverPre::new(pre)?),
        })
    }

    pub(crate) fn instantiate(&self, store: &mut Store<HostState>) -> wasmtime::Result<Bindings> {
        Ok(match self {
            Pre::Current(p) => Bindings::Current(p.instantiate(store)?),
            Pre::V0_2(p) => Bindings::V0_2(p.instantiate(store)?),
        })
    }
}

/// One instance's exports, by contract.
pub(crate) enum Bindings {
    Current(Driver),
    V0_2(v0_2::Driver),
}

impl Bindings {
    pub(crate) fn exports(&self) -> Exports<'_> {
        match self {
            Bindings::Current(d) => Exports::Current(d.image_cache_driver_cache_driver()),
            Bindings::V0_2(d) => Exports::V0_2(d.image_cache_driver_cache_driver()),
        }
    }
}

/// What a driver call returns: a trap, or the driver's own answer.
pub(crate) type GuestResult<T> = wasmtime::Result<Result<T, types::Error>>;

/// A driver's `cache-driver` export, whatever contract it speaks; every
/// call takes and returns the current contract's types.
#[derive(Clone, Copy)]
pub(crate) enum Exports<'a> {
    Current(&'a Guest),
    V0_2(&'a v0_2::Guest),
}

/// Calls of the current signature, each dispatched to the driver's
/// version (a macro: the same shape for every call).
macro_rules! calls {
    ($( $name:ident ( $($arg:ident : $ty:ty),* ) -> $ret:ty ;)*) => {
        impl Exports<'_> {
            $(
                pub(crate) fn $name(
                    &self,
                    store: &mut Store<HostState>,
                    $($arg: $ty),*
                ) -> GuestResult<$ret> {
                    match self {
                        Exports::Current(g) => g.$name(store, $($arg),*),
                        Exports::V0_2(g) => v0_2::$name(g, store, $($arg),*),
                    }
                }
            )*
        }
    };
}

calls! {
    call_configure(options: &[(String, String)]) -> ();
    call_get_cache_size() -> u64;
    call_get_hit_count(id: &str) -> u64;
    call_record_reads(reads: &[types::ReadRecord]) -> u64;
    call_get_cached_images() -> Vec<types::CachedImage>;
    call_is_cached(id: &str) -> bool;
    call_is_being_cached(id: &str) -> bool;
    call_is_cacheable(id: &str) -> bool;
    call_is_queued(id: &str) -> bool;
    call_queue_image(id: &str) -> bool;
    call_get_queued_images() -> Vec<String>;
    call_delete_cached_image(id: &str) -> ();
    call_delete_all_cached_images() -> u64;
    call_delete_queued_image(id: &str) -> ();
    call_delete_all_queued_images() -> u64;
    call_get_least_recently_accessed() -> Option<(String, u64)>;
    call_get_least_recently_accessed_batch(count: u32) -> Vec<types::LruEntry>;
    call_get_image_size(id: &str) -> u64;
    call_get_cached_nodes(id: &str) -> Vec<String>;
    call_clean(stall_time: Option<u64>) -> types::CleanReport;
    call_prune(max_size: u64) -> types::PruneReport;
    call_open_for_write(id: &str) -> (ResourceAny, Resource<OpenFile>);
    call_open_for_read(id: &str) -> (ResourceAny, Resource<OpenFile>);
}

impl Exports<'_> {
    /// `info` cannot fail (no error in its result).
    pub(crate) fn call_info(
        &self,
        store: &mut Store<HostState>,
    ) -> wasmtime::Result<types::DriverInfo> {
        match self {
            Exports::Current(g) => g.call_info(store),
            Exports::V0_2(g) => g.call_info(store).map(v0_2::driver_info),
        }
    }

    pub(crate) fn write_session(&self) -> WriteSession<'_> {
        WriteSession(*self)
    }

    pub(crate) fn read_session(&self) -> ReadSession<'_> {
        ReadSession(*self)
    }
}

/// A driver's `write-session` resource, whatever its version.
pub(crate) struct WriteSession<'a>(Exports<'a>);

impl WriteSession<'_> {
    pub(crate) fn call_commit(
        &self,
        store: &mut Store<HostState>,
        session: ResourceAny,
        checksum: Option<&str>,
    ) -> GuestResult<()> {
        match self.0 {
            Exports::Current(g) => g.write_session().call_commit(store, session, checksum),
            Exports::V0_2(g) => {
                v0_2::errors(g.write_session().call_commit(store, session, checksum))
            }
        }
    }

    pub(crate) fn call_abort(
        &self,
        store: &mut Store<HostState>,
        session: ResourceAny,
        reason: &str,
    ) -> GuestResult<()> {
        match self.0 {
            Exports::Current(g) => g.write_session().call_abort(store, session, reason),
            Exports::V0_2(g) => v0_2::errors(g.write_session().call_abort(store, session, reason)),
        }
    }
}

/// A driver's `read-session` resource, whatever its version.
pub(crate) struct ReadSession<'a>(Exports<'a>);

impl ReadSession<'_> {
    pub(crate) fn call_checksum(
        &self,
        store: &mut Store<HostState>,
        session: ResourceAny,
        read: Resource<OpenFile>,
    ) -> GuestResult<Option<String>> {
        match self.0 {
            Exports::Current(g) => g.read_session().call_checksum(store, session, read),
            Exports::V0_2(g) => v0_2::errors(g.read_session().call_checksum(store, session, read)),
        }
    }

    pub(crate) fn call_finish(
        &self,
        store: &mut Store<HostState>,
        session: ResourceAny,
        read: Resource<OpenFile>,
    ) -> GuestResult<()> {
        match self.0 {
            Exports::Current(g) => g.read_session().call_finish(store, session, read),
            Exports::V0_2(g) => v0_2::errors(g.read_session().call_finish(store, session, read)),
        }
    }
}
