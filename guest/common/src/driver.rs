//! The driver operations of the specification (docs/src/spec.md), once for every driver.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;
use std::rc::Rc;

use crate::bindings::exports::image_cache::driver::cache_driver::{
    Guest, GuestReadSession, GuestWriteSession, ReadSession, WriteSession,
};
use crate::fs::{self, ErrorCode, File};
use crate::layout::{INCOMPLETE, INVALID, QUEUE, remove_if_present};
use crate::store::{Backend, Image, MetadataStore, Options};
use crate::{
    CachedImage, CleanReport, DriverInfo, Error, Layout, LruEntry, PruneReport, ReadRecord,
    RemovedFile, cmp_ids, io_error, io_failure, now, validate_image_id,
};

/// Glance's default `image_cache_stall_time`: one day.
pub const DEFAULT_STALL_TIME: u64 = 86_400;

/// Images evicted in the first step of a prune or delete-all: their rows,
/// then their files. Each next step takes twice as many, up to
/// [`MAX_EVICT_BATCH`]: a small prune commits little at a time, a large
/// one does not pay a commit (two syncs) per hundred images.
pub const EVICT_BATCH: usize = 100;
/// The most images one eviction step takes.
pub const MAX_EVICT_BATCH: usize = 1600;
/// Seconds an eviction works before it stops starting new steps and
/// returns what it removed, well inside the host's call deadline (30 s by
/// default): the host calls again for the rest. The driver option
/// `image_cache_evict_seconds` sets it (for a shorter call deadline).
pub const EVICT_BUDGET_SECONDS: f64 = 10.0;

/// A configured driver instance.
struct State {
    layout: Layout,
    store: Box<dyn MetadataStore>,
    /// Seconds one eviction works (see [`EVICT_BUDGET_SECONDS`]).
    evict_budget: f64,
}

thread_local! {
    static STATE: RefCell<Option<Rc<State>>> = const { RefCell::new(None) };
}

fn state() -> Result<Rc<State>, Error> {
    STATE.with(|s| s.borrow().clone()).ok_or_else(|| {
        Error::NotConfigured("the driver was used before configure succeeded".to_string())
    })
}

/// A cached image with everything the driver knows of it.
struct CachedFile {
    id: String,
    image: Image,
}

impl State {
    fn images(&self) -> Result<Vec<CachedFile>, Error> {
        let ids = self.layout.image_ids()?;
        let known = self.store.images(&ids)?;
        let mut images = Vec::with_capacity(ids.len());
        for (id, known) in ids.into_iter().zip(known) {
            let image = match known {
                Some(image) => image,
                None => match self.layout.regular_file(&id)? {
                    Some(meta) => Image::unrecorded(&meta),
                    None => continue, // removed since it was listed
                },
            };
            images.push(CachedFile { id, image });
        }
        Ok(images)
    }

    fn cache_size(&self) -> Result<u64, Error> {
        if !self.store.records_sizes() {
            let files = self.layout.image_files()?;
            return Ok(saturating_sum(files.into_iter().map(|(_, m)| m.size)));
        }
        let ids = self.layout.image_ids()?;
        let sizes = self.store.sizes(&ids)?;
        let mut total: u64 = 0;
        for (id, size) in ids.iter().zip(sizes) {
            let size = match size {
                Some(size) => size,
                None => self.layout.regular_file(id)?.map_or(0, |m| m.size),
            };
            total = total.saturating_add(size);
        }
        Ok(total)
    }

    /// Every cached image, least recently accessed first, ties by id.
    fn images_by_lru(&self) -> Result<Vec<CachedFile>, Error> {
        let mut images = self.images()?;
        images.sort_by(|a, b| {
            a.image
                .last_accessed
                .total_cmp(&b.image.last_accessed)
                .then_with(|| cmp_ids(&a.id, &b.id))
        });
        Ok(images)
    }

    fn is_cached(&self, id: &str) -> Result<bool, Error> {
        Ok(self.layout.cached(id)?.is_some())
    }

    fn is_being_cached(&self, id: &str) -> Result<bool, Error> {
        Ok(self.layout.regular_file(&Layout::incomplete(id))?.is_some())
    }

    fn is_queued(&self, id: &str) -> Result<bool, Error> {
        Ok(self.layout.regular_file(&Layout::queued(id))?.is_some())
    }

    /// Remove files by path; the ones removed (or already gone) and the
    /// failures, each with its reason.
    fn remove_all(&self, paths: Vec<String>) -> (Vec<usize>, Vec<String>) {
        let results = fs::remove_files(&paths);
        let mut removed = Vec::new();
        let mut failures = Vec::new();
        for (i, result) in results.into_iter().enumerate() {
            match result {
                Ok(()) => removed.push(i),
                Err(e) if e.code == ErrorCode::NotFound => removed.push(i),
                Err(e) => failures.push(e.message),
            }
        }
        (removed, failures)
    }

    /// Evict cached images a batch at a time, rows first, then files: a
    /// batch whose rows cannot be forgotten (a locked row, the database
    /// gone) stops the eviction there with its files and every later one
    /// untouched, so bookkeeping and files never part by more than the
    /// files of one batch that could not be removed (images without a
    /// row, which a read or a clean reconciles). The indexes of `ids`
    /// removed, and the failures.
    ///
    /// Past the eviction budget no new batch starts: the images not
    /// reached stay cached, and neither removed nor failed.
    fn evict(&self, ids: &[String]) -> (Vec<usize>, Vec<String>) {
        let mut removed = Vec::new();
        let mut failures = Vec::new();
        let started = now();
        let mut first = 0;
        let mut size = EVICT_BATCH;
        while first < ids.len() {
            if first > 0 && now() - started > self.evict_budget {
                break;
            }
            let batch = &ids[first..(first + size).min(ids.len())];
            if let Err(e) = self.store.forget(batch) {
                failures.push(format!(
                    "forgetting {} images failed, so they and the {} after them stay cached: {}",
                    batch.len(),
                    ids.len() - first - batch.len(),
                    describe(&e)
                ));
                break;
            }
            let (gone, failed) =
                self.remove_all(batch.iter().map(|id| Layout::image(id)).collect());
            removed.extend(gone.into_iter().map(|i| first + i));
            failures.extend(failed);
            first += batch.len();
            size = (size * 2).min(MAX_EVICT_BATCH);
        }
        (removed, failures)
    }
}

/// A driver error as one line.
fn describe(e: &Error) -> String {
    match e {
        Error::BadConfiguration(m)
        | Error::InvalidImageId(m)
        | Error::NotFound(m)
        | Error::AlreadyCached(m)
        | Error::BeingCached(m)
        | Error::Database(m)
        | Error::NotConfigured(m)
        | Error::Unsupported(m) => m.clone(),
        Error::Io(e) => e.message.clone(),
    }
}

/// A driver: the shared operations over the metadata store `B`.
pub struct Driver<B>(PhantomData<B>);

/// Validate the id, then run `op` on the configured state.
fn with_image<T>(id: &str, op: impl FnOnce(&State) -> Result<T, Error>) -> Result<T, Error> {
    validate_image_id(id)?;
    op(&*state()?)
}

impl<B: Backend> Guest for Driver<B> {
    type WriteSession = Writer;
    type ReadSession = Reader;

    fn info() -> DriverInfo {
        B::info()
    }

    fn configure(options: Vec<(String, String)>) -> Result<(), Error> {
        let options = Options::parse(&options)?;
        let layout = Layout::new(&options.sqlite_db);
        layout.create_dirs()?;
        let evict_budget = match options.get("image_cache_evict_seconds") {
            None => EVICT_BUDGET_SECONDS,
            Some(v) => v
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)
                .ok_or_else(|| {
                    Error::BadConfiguration(format!(
                        "image_cache_evict_seconds must be a number of seconds, not {v:?}"
                    ))
                })?,
        };
        let store = B::open(&options)?;
        let state = Rc::new(State {
            layout,
            store: Box::new(store),
            evict_budget,
        });
        STATE.with(|s| *s.borrow_mut() = Some(state));
        Ok(())
    }

    fn get_cache_size() -> Result<u64, Error> {
        state()?.cache_size()
    }

    fn get_hit_count(image_id: String) -> Result<u64, Error> {
        with_image(&image_id, |s| {
            if s.is_cached(&image_id)? {
                s.store.hits(&image_id)
            } else {
                Ok(0)
            }
        })
    }

    fn record_reads(reads: Vec<ReadRecord>) -> Result<u64, Error> {
        for read in &reads {
            validate_image_id(&read.image_id)?;
        }
        let state = state()?;
        state.store.record_reads(&state.layout, &reads)
    }

    fn get_cached_images() -> Result<Vec<CachedImage>, Error> {
        let mut images = state()?.images()?;
        images.sort_unstable_by(|a, b| cmp_ids(&a.id, &b.id));
        Ok(images
            .into_iter()
            .map(|i| CachedImage {
                image_id: i.id,
                hits: i.image.hits,
                last_modified: i.image.last_modified,
                last_accessed: i.image.last_accessed,
                size: i.image.size,
            })
            .collect())
    }

    fn is_cached(image_id: String) -> Result<bool, Error> {
        with_image(&image_id, |s| s.is_cached(&image_id))
    }

    fn is_being_cached(image_id: String) -> Result<bool, Error> {
        with_image(&image_id, |s| s.is_being_cached(&image_id))
    }

    fn is_cacheable(image_id: String) -> Result<bool, Error> {
        with_image(&image_id, |s| {
            Ok(!s.is_cached(&image_id)? && !s.is_being_cached(&image_id)?)
        })
    }

    fn is_queued(image_id: String) -> Result<bool, Error> {
        with_image(&image_id, |s| s.is_queued(&image_id))
    }

    fn queue_image(image_id: String) -> Result<bool, Error> {
        with_image(&image_id, |s| {
            if s.is_cached(&image_id)? || s.is_being_cached(&image_id)? {
                return Ok(false);
            }
            match fs::create_new(&Layout::queued(&image_id)) {
                Ok(marker) => {
                    // File times are coarse (a clock tick); a precise time
                    // keeps markers made in quick succession in order.
                    let t = now();
                    marker.set_times(Some(t), Some(t)).map_err(io_error)?;
                    Ok(true)
                }
                Err(e) if e.code == ErrorCode::AlreadyExists => Ok(false),
                Err(e) => Err(io_error(e)),
            }
        })
    }

    fn get_queued_images() -> Result<Vec<String>, Error> {
        let state = state()?;
        let mut markers: Vec<_> = state
            .layout
            .files_in(QUEUE)?
            .into_iter()
            .filter(|(name, _)| validate_image_id(name).is_ok())
            .collect();
        markers.sort_by(|(a, ma), (b, mb)| {
            ma.modified
                .total_cmp(&mb.modified)
                .then_with(|| cmp_ids(a, b))
        });
        Ok(markers.into_iter().map(|(name, _)| name).collect())
    }

    fn delete_cached_image(image_id: String) -> Result<(), Error> {
        with_image(&image_id, |s| {
            if s.layout.is_image_name(&image_id) {
                remove_if_present(&Layout::image(&image_id)).map_err(io_error)?;
            }
            s.store.forget(std::slice::from_ref(&image_id))
        })
    }

    fn delete_all_cached_images() -> Result<u64, Error> {
        let state = state()?;
        let ids = state.layout.image_ids()?;
        let (removed, failures) = state.evict(&ids);
        let removed_ids: Vec<String> = removed.iter().map(|&i| ids[i].clone()).collect();
        if let Some(first) = failures.first() {
            return Err(io_failure(format!(
                "removed {} cached images; {} could not be removed, first: {first}",
                removed_ids.len(),
                failures.len()
            )));
        }
        Ok(removed_ids.len() as u64)
    }

    fn delete_queued_image(image_id: String) -> Result<(), Error> {
        with_image(&image_id, |_| {
            remove_if_present(&Layout::queued(&image_id)).map_err(io_error)?;
            Ok(())
        })
    }

    fn delete_all_queued_images() -> Result<u64, Error> {
        let state = state()?;
        let paths = state
            .layout
            .files_in(QUEUE)?
            .into_iter()
            .map(|(name, _)| Layout::queued(&name))
            .collect();
        let (removed, failures) = state.remove_all(paths);
        if let Some(first) = failures.first() {
            return Err(io_failure(format!(
                "removed {} queue markers; {} could not be removed, first: {first}",
                removed.len(),
                failures.len()
            )));
        }
        Ok(removed.len() as u64)
    }

    fn get_least_recently_accessed() -> Result<Option<(String, u64)>, Error> {
        let images = state()?.images_by_lru()?;
        Ok(images.into_iter().next().map(|i| (i.id, i.image.size)))
    }

    fn get_least_recently_accessed_batch(count: u32) -> Result<Vec<LruEntry>, Error> {
        let images = state()?.images_by_lru()?;
        Ok(images
            .into_iter()
            .take(count as usize)
            .map(|i| LruEntry {
                image_id: i.id,
                size: i.image.size,
                last_accessed: i.image.last_accessed,
            })
            .collect())
    }

    fn get_image_size(image_id: String) -> Result<u64, Error> {
        with_image(&image_id, |s| match s.layout.cached(&image_id)? {
            Some(meta) => Ok(meta.size),
            None => Err(Error::NotFound(format!("image {image_id:?} is not cached"))),
        })
    }

    fn get_cached_nodes(image_id: String) -> Result<Vec<String>, Error> {
        with_image(&image_id, |s| {
            let here = s.is_cached(&image_id)?;
            s.store.cached_nodes(&image_id, here)
        })
    }

    fn clean(stall_time: Option<u64>) -> Result<CleanReport, Error> {
        let state = state()?;
        let older_than = now() - stall_time.unwrap_or(DEFAULT_STALL_TIME) as f64;
        let mut failures = Vec::new();
        let mut clean_dir =
            |dir: &str, keep: &dyn Fn(f64) -> bool| -> Result<Vec<RemovedFile>, Error> {
                let files: Vec<_> = state
                    .layout
                    .files_in(dir)?
                    .into_iter()
                    .filter(|(_, m)| !keep(m.modified))
                    .collect();
                let paths = files
                    .iter()
                    .map(|(name, _)| format!("{dir}/{name}"))
                    .collect();
                let (removed, failed) = state.remove_all(paths);
                failures.extend(failed);
                Ok(removed
                    .into_iter()
                    .map(|i| RemovedFile {
                        image_id: files[i].0.clone(),
                        size: files[i].1.size,
                    })
                    .collect())
            };
        let invalid = clean_dir(INVALID, &|_| false)?;
        // Glance: files written to on or before `older_than` are stalled.
        let incomplete = clean_dir(INCOMPLETE, &|modified| modified > older_than)?;
        // Records of images whose files are gone (a wiped root).
        let present = state.layout.image_ids()?;
        if let Err(e) = state.store.forget_missing(&present) {
            failures.push(format!("dropping records of vanished images: {e:?}"));
        }
        Ok(CleanReport {
            invalid,
            incomplete,
            failures,
        })
    }

    fn prune(max_size: u64) -> Result<PruneReport, Error> {
        let state = state()?;
        let images = state.images_by_lru()?;
        let sizes: Vec<u64> = images.iter().map(|i| i.image.size).collect();
        let (evict, size) = select_victims(&sizes, max_size);
        let victims: Vec<CachedFile> = images.into_iter().take(evict).collect();
        let victim_ids: Vec<String> = victims.iter().map(|v| v.id.clone()).collect();
        let (removed, failures) = state.evict(&victim_ids);
        let removed: Vec<RemovedFile> = removed
            .into_iter()
            .map(|i| RemovedFile {
                image_id: victims[i].id.clone(),
                size: victims[i].image.size,
            })
            .collect();
        let bytes_removed = saturating_sum(removed.iter().map(|r| r.size));
        let failed_bytes =
            saturating_sum(victims.iter().map(|v| v.image.size)).saturating_sub(bytes_removed);
        Ok(PruneReport {
            removed,
            bytes_removed,
            size_after: size.saturating_add(failed_bytes),
            failures,
        })
    }

    fn open_for_write(image_id: String) -> Result<(WriteSession, File), Error> {
        with_image(&image_id, |s| {
            let already_cached =
                || Error::AlreadyCached(format!("image {image_id:?} is already cached"));
            if s.is_cached(&image_id)? {
                return Err(already_cached());
            }
            let path = Layout::incomplete(&image_id);
            let file = match create_locked(&path)? {
                Some(file) => file,
                None if take_over_abandoned(&image_id)? => match create_locked(&path)? {
                    Some(file) => file,
                    None => return Err(being_cached(&image_id)),
                },
                None => return Err(being_cached(&image_id)),
            };
            // A writer that committed between the check and the create.
            if s.is_cached(&image_id)? {
                drop(file);
                let _ = remove_if_present(&path);
                return Err(already_cached());
            }
            let session = Writer {
                id: image_id.clone(),
                done: Cell::new(false),
            };
            Ok((WriteSession::new(session), file))
        })
    }

    fn open_for_read(image_id: String) -> Result<(ReadSession, File), Error> {
        with_image(&image_id, |s| {
            if !s.layout.is_image_name(&image_id) {
                return Err(Error::NotFound(format!("image {image_id:?} is not cached")));
            }
            match fs::open(&Layout::image(&image_id)) {
                Ok(file) => {
                    let session = Reader {
                        id: image_id.clone(),
                        done: Cell::new(false),
                    };
                    Ok((ReadSession::new(session), file))
                }
                Err(e) if e.code == ErrorCode::NotFound => {
                    Err(Error::NotFound(format!("image {image_id:?} is not cached")))
                }
                Err(e) => Err(io_error(e)),
            }
        })
    }
}

/// Sizes add up without wrapping: a file system (or a store) that reports
/// absurd sizes gives a saturated total, never a small one.
pub fn saturating_sum(sizes: impl IntoIterator<Item = u64>) -> u64 {
    sizes.into_iter().fold(0, u64::saturating_add)
}

/// Prune's choice: with images in least-recently-accessed order, how many
/// of the first must go for the rest to fit in `max_size`, and the size
/// left after they do.
pub fn select_victims(sizes_lru_first: &[u64], max_size: u64) -> (usize, u64) {
    // Counted in u128: no sum of u64 sizes we can list overflows it.
    let mut size: u128 = sizes_lru_first.iter().map(|&s| s as u128).sum();
    let mut evict = 0;
    for &s in sizes_lru_first {
        if size <= max_size as u128 {
            break;
        }
        size -= s as u128;
        evict += 1;
    }
    (evict, u64::try_from(size).unwrap_or(u64::MAX))
}

fn being_cached(id: &str) -> Error {
    Error::BeingCached(format!("image {id:?} is being cached by another writer"))
}

/// Create `incomplete/<id>` exclusively and lock it for the life of the
/// write (the lock goes with the file to the host, and dies with its
/// process); `None` if the file exists.
fn create_locked(path: &str) -> Result<Option<File>, Error> {
    match fs::create_new(path) {
        Ok(file) => {
            file.lock().map_err(io_error)?;
            Ok(Some(file))
        }
        Err(e) if e.code == ErrorCode::AlreadyExists => Ok(None),
        Err(e) => Err(io_error(e)),
    }
}

/// How long an unlocked `incomplete/<id>` must have been left alone before
/// a new writer takes it over: covers the moment between a writer's create
/// and its lock, and writers that do not lock (Glance itself).
pub const ABANDONED_AFTER: f64 = 10.0;

/// `incomplete/<id>` exists: if no live writer holds its lock and it has
/// not changed for a while, the writer died (a killed process, a crashed
/// host); move its file to `invalid/`. Glance waits for the stall time
/// (a day by default) before the image can be cached again; we need not.
fn take_over_abandoned(id: &str) -> Result<bool, Error> {
    let path = Layout::incomplete(id);
    let stale = match fs::open(&path) {
        Ok(file) => file,
        Err(e) if e.code == ErrorCode::NotFound => return Ok(true), // just went
        Err(e) => return Err(io_error(e)),
    };
    let modified = stale.metadata().map_err(io_error)?.modified;
    if modified > now() - ABANDONED_AFTER || !stale.try_lock().map_err(io_error)? {
        return Ok(false); // a live (or very recent) writer
    }
    match fs::rename(&path, &Layout::invalid(id)) {
        Ok(()) => {}
        Err(e) if e.code == ErrorCode::NotFound => {}
        Err(e) => return Err(io_error(e)),
    }
    let _ = stale.unlock();
    Ok(true)
}

/// A write session: `incomplete/<id>` exists and belongs to this session.
pub struct Writer {
    id: String,
    done: Cell<bool>,
}

impl Writer {
    fn finished_error(&self) -> Error {
        io_failure(format!(
            "the write session of {:?} has already ended",
            self.id
        ))
    }

    fn abort_with(&self, reason: &str) -> Result<(), Error> {
        if self.done.replace(true) {
            return Ok(());
        }
        let state = state()?;
        match fs::rename(&Layout::incomplete(&self.id), &Layout::invalid(&self.id)) {
            Ok(()) => {}
            Err(e) if e.code == ErrorCode::NotFound => {}
            Err(e) => return Err(io_error(e)),
        }
        state.store.record_abort(&self.id, reason)
    }
}

impl GuestWriteSession for Writer {
    fn image_id(&self) -> String {
        self.id.clone()
    }

    fn commit(&self, checksum: Option<String>) -> Result<(), Error> {
        if self.done.get() {
            return Err(self.finished_error());
        }
        let state = state()?;
        let path = Layout::incomplete(&self.id);
        let Some(meta) = state.layout.regular_file(&path)? else {
            return Err(io_failure(format!("{path} vanished before the commit")));
        };
        // Metadata first, then the atomic rename: a reader never sees the
        // image without its metadata, and a crash in between leaves only a
        // stale record that nothing lists.
        state
            .store
            .record_commit(&self.id, &path, meta.size, checksum.as_deref(), now())?;
        if let Err(e) = fs::rename(&path, &Layout::image(&self.id)) {
            let _ = state.store.forget(std::slice::from_ref(&self.id));
            return Err(io_error(e));
        }
        self.done.set(true);
        remove_if_present(&Layout::queued(&self.id)).map_err(io_error)?;
        Ok(())
    }

    fn abort(&self, reason: String) -> Result<(), Error> {
        self.abort_with(&reason)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Glance's `finally`: a write that was neither committed nor aborted.
        let _ = self.abort_with("incomplete fetch");
    }
}

/// A read session of a cached image.
pub struct Reader {
    id: String,
    done: Cell<bool>,
}

impl GuestReadSession for Reader {
    fn image_id(&self) -> String {
        self.id.clone()
    }

    fn checksum(&self, read: &File) -> Result<Option<String>, Error> {
        state()?.store.checksum(&self.id, read)
    }

    fn finish(&self, read: &File) -> Result<(), Error> {
        if self.done.replace(true) {
            return Ok(());
        }
        state()?.store.record_read(&self.id, read, now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_evicts_least_recently_accessed_until_it_fits() {
        assert_eq!(select_victims(&[10, 20, 30], 60), (0, 60));
        assert_eq!(select_victims(&[10, 20, 30], 59), (1, 50));
        assert_eq!(select_victims(&[10, 20, 30], 30), (2, 30));
        assert_eq!(select_victims(&[10, 20, 30], 0), (3, 0));
        assert_eq!(select_victims(&[], 0), (0, 0));
        // Zero-byte images before a large one go too: LRU order decides.
        assert_eq!(select_victims(&[0, 0, 100], 50), (3, 0));
    }

    #[test]
    fn sizes_saturate_instead_of_wrapping() {
        assert_eq!(saturating_sum([u64::MAX, 1]), u64::MAX);
        assert_eq!(select_victims(&[u64::MAX, u64::MAX, 5], 10), (2, 5));
        assert_eq!(
            select_victims(&[1, u64::MAX, u64::MAX], u64::MAX),
            (2, u64::MAX)
        );
    }
}
