//! Contract 0.2.0 through the current implementation.
//!
//! 0.3.0 kept 0.2.0's imports (less `sqlite`) and added to them, so each
//! 0.2.0 import is served by the current import of the same name, its
//! values converted between the two sets of generated types (the same
//! shapes). The export's `io` error carried a message only: it arrives as an
//! `io` error of code `io`. The `database` import is served on PostgreSQL
//! only: a 0.2.0 driver writes PostgreSQL's SQL, and 0.2.0 had no way to
//! tell it the dialect.

use wasmtime::Store;
use wasmtime::component::{HasData, Linker, Resource, ResourceAny};

use crate::bindings::{database as new_db, fs as new_fs, types as new_types, xattr as new_xattr};
use crate::database::{Connection, DatabaseView, Dialect};
use crate::fs::{FsView, OpenFile};
use crate::runtime::HostState;
use crate::xattr::XattrView;

use super::GuestResult;

mod bindings {
    wasmtime::component::bindgen!({
        path: "wit-0.2.0",
        world: "driver",
        imports: { default: trappable },
        with: {
            "image-cache:driver/fs.file": crate::fs::OpenFile,
            "image-cache:driver/database.connection": crate::database::Connection,
        },
    });
}

pub(crate) use bindings::Driver;
pub(crate) use bindings::DriverPre;
pub(crate) use bindings::exports::image_cache::driver::cache_driver::Guest;
use bindings::image_cache::driver::{
    clock as old_clock, database as old_db, fs as old_fs, types as old_types, xattr as old_xattr,
};

/// Values of the same shape in both contracts: an enum's cases one to one.
macro_rules! same_enum {
    ($old:ident :: $ty:ident <=> $new:ident { $($case:ident),* $(,)? }) => {
        impl From<$old::$ty> for $new::$ty {
            fn from(x: $old::$ty) -> Self {
                match x { $($old::$ty::$case => $new::$ty::$case),* }
            }
        }
        impl From<$new::$ty> for $old::$ty {
            fn from(x: $new::$ty) -> Self {
                match x { $($new::$ty::$case => $old::$ty::$case),* }
            }
        }
    };
}

/// A record's fields one to one, each converted with `From`.
macro_rules! same_record {
    ($from:ident :: $ty:ident => $to:ident { $($field:ident),* $(,)? }) => {
        impl From<$from::$ty> for $to::$ty {
            fn from(x: $from::$ty) -> Self {
                $to::$ty { $($field: x.$field.into()),* }
            }
        }
    };
}

/// A list converted element by element (which `From` does not cover).
fn list<A, B: From<A>>(items: Vec<A>) -> Vec<B> {
    items.into_iter().map(B::from).collect()
}

same_enum!(old_fs::ErrorCode <=> new_fs {
    NotFound, AlreadyExists, AccessDenied, InvalidPath, NotADirectory, IsADirectory,
    NoSpace, Unsupported, LimitExceeded, TimedOut, InvalidArgument, Io,
});
same_enum!(old_fs::EntryKind <=> new_fs { RegularFile, Directory, Symlink, Other });
same_record!(new_fs::FsError => old_fs { code, message });
same_record!(new_fs::Metadata => old_fs { kind, size, accessed, modified });
same_record!(new_fs::DirName => old_fs { name, kind });

impl From<new_fs::DirEntry> for old_fs::DirEntry {
    fn from(x: new_fs::DirEntry) -> Self {
        old_fs::DirEntry {
            name: x.name,
            metadata: x.metadata.into(),
        }
    }
}

same_enum!(old_db::ErrorCode <=> new_db {
    AccessDenied, Unavailable, Constraint, LimitExceeded, TimedOut, Other,
});
same_record!(new_db::DatabaseError => old_db { code, message });

impl From<old_db::Value> for new_db::Value {
    fn from(v: old_db::Value) -> Self {
        match v {
            old_db::Value::Null => new_db::Value::Null,
            old_db::Value::Boolean(b) => new_db::Value::Boolean(b),
            old_db::Value::Integer(i) => new_db::Value::Integer(i),
            old_db::Value::Real(r) => new_db::Value::Real(r),
            old_db::Value::Text(t) => new_db::Value::Text(t),
            old_db::Value::Blob(b) => new_db::Value::Blob(b),
        }
    }
}

impl From<new_db::Value> for old_db::Value {
    fn from(v: new_db::Value) -> Self {
        match v {
            new_db::Value::Null => old_db::Value::Null,
            new_db::Value::Boolean(b) => old_db::Value::Boolean(b),
            new_db::Value::Integer(i) => old_db::Value::Integer(i),
            new_db::Value::Real(r) => old_db::Value::Real(r),
            new_db::Value::Text(t) => old_db::Value::Text(t),
            new_db::Value::Blob(b) => old_db::Value::Blob(b),
        }
    }
}

impl From<old_types::Error> for new_types::Error {
    /// 0.2.0's `io` error had no fs code: it is an `io` of code `io`.
    fn from(e: old_types::Error) -> Self {
        use new_types::Error as N;
        use old_types::Error as O;
        match e {
            O::BadConfiguration(m) => N::BadConfiguration(m),
            O::InvalidImageId(m) => N::InvalidImageId(m),
            O::NotFound(m) => N::NotFound(m),
            O::AlreadyCached(m) => N::AlreadyCached(m),
            O::BeingCached(m) => N::BeingCached(m),
            O::Io(message) => N::Io(new_types::IoError {
                code: new_fs::ErrorCode::Io,
                message,
            }),
            O::Database(m) => N::Database(m),
            O::NotConfigured(m) => N::NotConfigured(m),
            O::Unsupported(m) => N::Unsupported(m),
        }
    }
}

same_record!(old_types::CachedImage => new_types {
    image_id, hits, last_modified, last_accessed, size,
});
same_record!(old_types::LruEntry => new_types { image_id, size, last_accessed });
same_record!(new_types::ReadRecord => old_types { image_id, accessed });
same_record!(old_types::RemovedFile => new_types { image_id, size });
same_record!(old_types::DriverInfo => new_types { name, version, description });

impl From<old_types::CleanReport> for new_types::CleanReport {
    fn from(r: old_types::CleanReport) -> Self {
        new_types::CleanReport {
            invalid: list(r.invalid),
            incomplete: list(r.incomplete),
            failures: r.failures,
        }
    }
}

impl From<old_types::PruneReport> for new_types::PruneReport {
    fn from(r: old_types::PruneReport) -> Self {
        new_types::PruneReport {
            removed: list(r.removed),
            bytes_removed: r.bytes_removed,
            size_after: r.size_after,
            failures: r.failures,
        }
    }
}

pub(super) fn driver_info(i: old_types::DriverInfo) -> new_types::DriverInfo {
    i.into()
}

/// A 0.2.0 call's answer in the current types.
pub(super) fn errors<T>(r: wasmtime::Result<Result<T, old_types::Error>>) -> GuestResult<T> {
    r.map(|r| r.map_err(new_types::Error::from))
}

fn answer<A, B: From<A>>(r: wasmtime::Result<Result<A, old_types::Error>>) -> GuestResult<B> {
    r.map(|r| r.map(B::from).map_err(new_types::Error::from))
}

fn answers<A, B: From<A>>(
    r: wasmtime::Result<Result<Vec<A>, old_types::Error>>,
) -> GuestResult<Vec<B>> {
    r.map(|r| r.map(list).map_err(new_types::Error::from))
}

type S<'a> = &'a mut Store<HostState>;

/// An id the current rule refuses (a 0.2.0 driver checks an older one:
/// it let invisible formatting characters through), refused here before
/// the driver sees it, as a current driver would refuse it.
fn refused(id: &str) -> Option<new_types::Error> {
    match crate::error::validate_image_id(id) {
        Ok(()) => None,
        Err(crate::Error::InvalidImageId(m)) => Some(new_types::Error::InvalidImageId(m)),
        Err(e) => Some(new_types::Error::InvalidImageId(e.to_string())),
    }
}

/// Refuse the call before the driver runs if `id` breaks the current rule.
macro_rules! check_id {
    ($id:expr) => {
        if let Some(e) = refused($id) {
            return Ok(Err(e));
        }
    };
}

pub(super) fn call_configure(g: &Guest, s: S, options: &[(String, String)]) -> GuestResult<()> {
    errors(g.call_configure(s, options))
}
pub(super) fn call_get_cache_size(g: &Guest, s: S) -> GuestResult<u64> {
    errors(g.call_get_cache_size(s))
}
pub(super) fn call_get_hit_count(g: &Guest, s: S, id: &str) -> GuestResult<u64> {
    check_id!(id);
    errors(g.call_get_hit_count(s, id))
}
pub(super) fn call_record_reads(
    g: &Guest,
    s: S,
    reads: &[new_types::ReadRecord],
) -> GuestResult<u64> {
    for r in reads {
        check_id!(&r.image_id);
    }
    let reads: Vec<old_types::ReadRecord> = reads.iter().cloned().map(Into::into).collect();
    errors(g.call_record_reads(s, &reads))
}
pub(super) fn call_get_cached_images(g: &Guest, s: S) -> GuestResult<Vec<new_types::CachedImage>> {
    answers(g.call_get_cached_images(s))
}
pub(super) fn call_is_cached(g: &Guest, s: S, id: &str) -> GuestResult<bool> {
    check_id!(id);
    errors(g.call_is_cached(s, id))
}
pub(super) fn call_is_being_cached(g: &Guest, s: S, id: &str) -> GuestResult<bool> {
    check_id!(id);
    errors(g.call_is_being_cached(s, id))
}
pub(super) fn call_is_cacheable(g: &Guest, s: S, id: &str) -> GuestResult<bool> {
    check_id!(id);
    errors(g.call_is_cacheable(s, id))
}
pub(super) fn call_is_queued(g: &Guest, s: S, id: &str) -> GuestResult<bool> {
    check_id!(id);
    errors(g.call_is_queued(s, id))
}
pub(super) fn call_queue_image(g: &Guest, s: S, id: &str) -> GuestResult<bool> {
    check_id!(id);
    errors(g.call_queue_image(s, id))
}
pub(super) fn call_get_queued_images(g: &Guest, s: S) -> GuestResult<Vec<String>> {
    errors(g.call_get_queued_images(s))
}
pub(super) fn call_delete_cached_image(g: &Guest, s: S, id: &str) -> GuestResult<()> {
    check_id!(id);
    errors(g.call_delete_cached_image(s, id))
}
pub(super) fn call_delete_all_cached_images(g: &Guest, s: S) -> GuestResult<u64> {
    errors(g.call_delete_all_cached_images(s))
}
pub(super) fn call_delete_queued_image(g: &Guest, s: S, id: &str) -> GuestResult<()> {
    check_id!(id);
    errors(g.call_delete_queued_image(s, id))
}
pub(super) fn call_delete_all_queued_images(g: &Guest, s: S) -> GuestResult<u64> {
    errors(g.call_delete_all_queued_images(s))
}
pub(super) fn call_get_least_recently_accessed(
    g: &Guest,
    s: S,
) -> GuestResult<Option<(String, u64)>> {
    errors(g.call_get_least_recently_accessed(s))
}
pub(super) fn call_get_least_recently_accessed_batch(
    g: &Guest,
    s: S,
    count: u32,
) -> GuestResult<Vec<new_types::LruEntry>> {
    answers(g.call_get_least_recently_accessed_batch(s, count))
}
pub(super) fn call_get_image_size(g: &Guest, s: S, id: &str) -> GuestResult<u64> {
    check_id!(id);
    errors(g.call_get_image_size(s, id))
}
pub(super) fn call_get_cached_nodes(g: &Guest, s: S, id: &str) -> GuestResult<Vec<String>> {
    check_id!(id);
    errors(g.call_get_cached_nodes(s, id))
}
pub(super) fn call_clean(
    g: &Guest,
    s: S,
    stall_time: Option<u64>,
) -> GuestResult<new_types::CleanReport> {
    answer(g.call_clean(s, stall_time))
}
pub(super) fn call_prune(g: &Guest, s: S, max_size: u64) -> GuestResult<new_types::PruneReport> {
    answer(g.call_prune(s, max_size))
}
pub(super) fn call_open_for_write(
    g: &Guest,
    s: S,
    id: &str,
) -> GuestResult<(ResourceAny, Resource<OpenFile>)> {
    check_id!(id);
    errors(g.call_open_for_write(s, id))
}
pub(super) fn call_open_for_read(
    g: &Guest,
    s: S,
    id: &str,
) -> GuestResult<(ResourceAny, Resource<OpenFile>)> {
    check_id!(id);
    errors(g.call_open_for_read(s, id))
}

// ---- imports: each 0.2.0 function served by the current one ----

type FsResult<T> = wasmtime::Result<Result<T, old_fs::FsError>>;

fn fs<A, B: From<A>>(r: wasmtime::Result<Result<A, new_fs::FsError>>) -> FsResult<B> {
    r.map(|r| r.map(B::from).map_err(Into::into))
}

fn fs_list<A, B: From<A>>(
    r: wasmtime::Result<Result<Vec<A>, new_fs::FsError>>,
) -> FsResult<Vec<B>> {
    r.map(|r| r.map(list).map_err(Into::into))
}

impl old_fs::Host for FsView<'_> {
    fn create_new(&mut self, path: String) -> FsResult<Resource<OpenFile>> {
        fs(new_fs::Host::create_new(self, path))
    }
    fn open(&mut self, path: String) -> FsResult<Resource<OpenFile>> {
        fs(new_fs::Host::open(self, path))
    }
    fn stat(&mut self, path: String) -> FsResult<old_fs::Metadata> {
        fs(new_fs::Host::stat(self, path))
    }
    fn create_dir(&mut self, path: String) -> FsResult<()> {
        fs(new_fs::Host::create_dir(self, path))
    }
    fn list_dir(&mut self, path: String) -> FsResult<Vec<old_fs::DirEntry>> {
        fs_list(new_fs::Host::list_dir(self, path))
    }
    fn list_names(&mut self, path: String) -> FsResult<Vec<old_fs::DirName>> {
        fs_list(new_fs::Host::list_names(self, path))
    }
    fn rename(&mut self, src: String, dst: String) -> FsResult<()> {
        fs(new_fs::Host::rename(self, src, dst))
    }
    fn remove_file(&mut self, path: String) -> FsResult<()> {
        fs(new_fs::Host::remove_file(self, path))
    }
    fn remove_files(
        &mut self,
        paths: Vec<String>,
    ) -> wasmtime::Result<Vec<Result<(), old_fs::FsError>>> {
        new_fs::Host::remove_files(self, paths)
            .map(|results| results.into_iter().map(|r| r.map_err(Into::into)).collect())
    }
    fn set_times(
        &mut self,
        path: String,
        accessed: Option<f64>,
        modified: Option<f64>,
    ) -> FsResult<()> {
        fs(new_fs::Host::set_times(self, path, accessed, modified))
    }
}

impl old_fs::HostFile for FsView<'_> {
    fn metadata(&mut self, f: Resource<OpenFile>) -> FsResult<old_fs::Metadata> {
        fs(new_fs::HostFile::metadata(self, f))
    }
    fn sync(&mut self, f: Resource<OpenFile>) -> FsResult<()> {
        fs(new_fs::HostFile::sync(self, f))
    }
    fn set_times(
        &mut self,
        f: Resource<OpenFile>,
        accessed: Option<f64>,
        modified: Option<f64>,
    ) -> FsResult<()> {
        fs(new_fs::HostFile::set_times(self, f, accessed, modified))
    }
    fn lock(&mut self, f: Resource<OpenFile>) -> FsResult<()> {
        fs(new_fs::HostFile::lock(self, f))
    }
    fn try_lock(&mut self, f: Resource<OpenFile>) -> FsResult<bool> {
        fs(new_fs::HostFile::try_lock(self, f))
    }
    fn unlock(&mut self, f: Resource<OpenFile>) -> FsResult<()> {
        fs(new_fs::HostFile::unlock(self, f))
    }
    fn drop(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<()> {
        new_fs::HostFile::drop(self, f)
    }
}

impl old_xattr::Host for XattrView<'_> {
    fn get(&mut self, f: Resource<OpenFile>, name: String) -> FsResult<Vec<u8>> {
        fs(new_xattr::Host::get(self, f, name))
    }
    fn set(&mut self, f: Resource<OpenFile>, name: String, value: Vec<u8>) -> FsResult<()> {
        fs(new_xattr::Host::set(self, f, name, value))
    }
    fn remove(&mut self, f: Resource<OpenFile>, name: String) -> FsResult<()> {
        fs(new_xattr::Host::remove(self, f, name))
    }
    fn list_names(&mut self, f: Resource<OpenFile>) -> FsResult<Vec<String>> {
        fs(new_xattr::Host::list_names(self, f))
    }
    fn probe(&mut self) -> FsResult<()> {
        fs(new_xattr::Host::probe(self))
    }
}

type DbResult<T> = wasmtime::Result<Result<T, old_db::DatabaseError>>;

impl old_db::Host for DatabaseView<'_> {}

impl old_db::HostConnection for DatabaseView<'_> {
    fn open(&mut self, name: String) -> DbResult<Resource<Connection>> {
        let c = match new_db::HostConnection::open(self, name)? {
            Ok(c) => c,
            Err(e) => return Ok(Err(e.into())),
        };
        if new_db::HostConnection::dialect(self, Resource::new_borrow(c.rep()))?
            != Dialect::Postgresql
        {
            new_db::HostConnection::drop(self, c)?;
            return Ok(Err(old_db::DatabaseError {
                code: old_db::ErrorCode::Unavailable,
                message: "a contract 0.2.0 driver writes PostgreSQL's SQL and this database is \
                          MySQL or MariaDB: run a driver of contract 0.3.0 on it"
                    .into(),
            }));
        }
        Ok(Ok(c))
    }
    fn execute(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<old_db::Value>,
    ) -> DbResult<u64> {
        let params = list(params);
        new_db::HostConnection::execute(self, c, sql, params).map(|r| r.map_err(Into::into))
    }
    fn query(
        &mut self,
        c: Resource<Connection>,
        sql: String,
        params: Vec<old_db::Value>,
    ) -> DbResult<Vec<Vec<old_db::Value>>> {
        let params = list(params);
        new_db::HostConnection::query(self, c, sql, params).map(|r| {
            r.map(|rows| rows.into_iter().map(list).collect())
                .map_err(Into::into)
        })
    }
    fn drop(&mut self, c: Resource<Connection>) -> wasmtime::Result<()> {
        new_db::HostConnection::drop(self, c)
    }
}

impl old_types::Host for &mut HostState {}

impl old_clock::Host for &mut HostState {
    fn now(&mut self) -> wasmtime::Result<f64> {
        crate::bindings::clock::Host::now(self)
    }
}

// ---- linking: 0.2.0's names beside the current ones ----

struct State;
impl HasData for State {
    type Data<'a> = &'a mut HostState;
}
struct Fs;
impl HasData for Fs {
    type Data<'a> = FsView<'a>;
}
struct Xattr;
impl HasData for Xattr {
    type Data<'a> = XattrView<'a>;
}
struct Database;
impl HasData for Database {
    type Data<'a> = DatabaseView<'a>;
}

/// 0.2.0's `types` and `clock`.
pub(crate) fn link_types_and_clock(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    old_types::add_to_linker::<HostState, State>(linker, |s| s)?;
    old_clock::add_to_linker::<HostState, State>(linker, |s| s)
}

/// 0.2.0's `fs`, on the same view as the current one.
pub(crate) fn link_fs<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> FsView<'_>,
) -> wasmtime::Result<()> {
    old_fs::add_to_linker::<T, Fs>(linker, view)
}

/// 0.2.0's `xattr`, on the same view as the current one.
pub(crate) fn link_xattr<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> XattrView<'_>,
) -> wasmtime::Result<()> {
    old_xattr::add_to_linker::<T, Xattr>(linker, view)
}

/// 0.2.0's `database`, on the same view as the current one.
pub(crate) fn link_database<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> DatabaseView<'_>,
) -> wasmtime::Result<()> {
    old_db::add_to_linker::<T, Database>(linker, view)
}
