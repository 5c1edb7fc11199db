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
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::bindings::types::{CachedImage, CleanReport, LruEntry, PruneReport};
use crate::checksum::{Checksum, Hasher};
use crate::driver::{Driver, Placement, Session};
use crate::error::{Error, Result};
use crate::fs::RootFs;
use crate::runtime::{DriverSource, Limits, Runtime, default_artifact_dir};
use crate::xattr::XattrSupport;

/// Glance's default `image_cache_max_size`: 10 GiB.
pub const DEFAULT_MAX_SIZE: u64 = 10 * 1024 * 1024 * 1024;
/// Glance's default `image_cache_stall_time`: one day.
pub const DEFAULT_STALL_TIME: Duration = Duration::from_secs(86_400);
/// Glance's default `image_cache_sqlite_db`.
pub const DEFAULT_SQLITE_DB: &str = "cache.db";
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
    /// Fall back to sqlite, with a warning, if the driver cannot configure.
    pub fallback_to_sqlite: bool,
    /// Whether the xattr import reaches the file system.
    pub xattr: XattrSupport,
    /// Limits for each driver instance.
    pub limits: Limits,
    /// Where compiled components are kept (none: compile every start).
    pub artifacts: Option<PathBuf>,
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
        }
    }

    pub fn driver(mut self, driver: DriverSource) -> Self {
        self.driver = driver;
        self
    }

    pub fn fallback_to_sqlite(mut self, fallback: bool) -> Self {
        self.fallback_to_sqlite = fallback;
        self
    }

    fn driver_options(&self) -> Vec<(String, String)> {
        vec![("image_cache_sqlite_db".to_string(), self.sqlite_db.clone())]
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

/// An image cache on one root.
pub struct ImageCache {
    runtime: Arc<Runtime>,
    root: Arc<RootFs>,
    config: CacheConfig,
    driver: RwLock<Arc<Driver>>,
}

/// Make sure the root exists, is a directory and is writable.
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
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let probe = format!(
        ".image-cache-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    root.create_new(&probe)
        .map_err(|e| bad(format!("not writable ({})", e.message)))?;
    let _ = root.remove_file(&probe);
    Ok(root)
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
        let driver = match start_driver(&runtime, &root, &config, &config.driver) {
            Ok(driver) => driver,
            Err(e) if config.fallback_to_sqlite && !is_sqlite(&config.driver) => {
                log::warn!(
                    "driver {} cannot be used ({e}); falling back to the sqlite driver",
                    config.driver.name()
                );
                start_driver(&runtime, &root, &config, &DriverSource::Builtin("sqlite"))?
            }
            Err(e) => return Err(e),
        };
        Ok(ImageCache {
            runtime,
            root,
            config,
            driver: RwLock::new(driver),
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
        self.driver.read().unwrap().clone()
    }

    /// Replace the driver: the new one is loaded and configured first; if
    /// that fails the old one stays and the error is returned. Calls and
    /// sessions already running finish on the old driver.
    pub fn swap_driver(&self, source: &DriverSource) -> Result<()> {
        let new = start_driver(&self.runtime, &self.root, &self.config, source)?;
        *self.driver.write().unwrap() = new;
        Ok(())
    }

    pub fn get_cache_size(&self) -> Result<u64> {
        self.driver().get_cache_size()
    }

    pub fn get_hit_count(&self, id: &str) -> Result<u64> {
        self.driver().get_hit_count(id)
    }

    pub fn get_cached_images(&self) -> Result<Vec<CachedImage>> {
        self.driver().get_cached_images()
    }

    pub fn is_cached(&self, id: &str) -> Result<bool> {
        self.driver().is_cached(id)
    }

    pub fn is_being_cached(&self, id: &str) -> Result<bool> {
        self.driver().is_being_cached(id)
    }

    pub fn is_cacheable(&self, id: &str) -> Result<bool> {
        self.driver().is_cacheable(id)
    }

    pub fn is_queued(&self, id: &str) -> Result<bool> {
        self.driver().is_queued(id)
    }

    pub fn queue_image(&self, id: &str) -> Result<bool> {
        self.driver().queue_image(id)
    }

    pub fn get_queued_images(&self) -> Result<Vec<String>> {
        self.driver().get_queued_images()
    }

    pub fn delete_cached_image(&self, id: &str) -> Result<()> {
        self.driver().delete_cached_image(id)
    }

    pub fn delete_all_cached_images(&self) -> Result<u64> {
        self.driver().delete_all_cached_images()
    }

    pub fn delete_queued_image(&self, id: &str) -> Result<()> {
        self.driver().delete_queued_image(id)
    }

    pub fn delete_all_queued_images(&self) -> Result<u64> {
        self.driver().delete_all_queued_images()
    }

    pub fn get_least_recently_accessed(&self) -> Result<Option<(String, u64)>> {
        self.driver().get_least_recently_accessed()
    }

    pub fn get_least_recently_accessed_batch(&self, count: u32) -> Result<Vec<LruEntry>> {
        self.driver().get_least_recently_accessed_batch(count)
    }

    pub fn get_image_size(&self, id: &str) -> Result<u64> {
        self.driver().get_image_size(id)
    }

    /// Evict least recently accessed images until the cache is at or under
    /// `max_size` bytes (0 empties it), in one driver call.
    pub fn prune(&self, max_size: u64) -> Result<PruneReport> {
        self.driver().prune(max_size)
    }

    /// Remove invalid files, and incomplete files older than `stall_time`.
    pub fn clean(&self, stall_time: Duration) -> Result<CleanReport> {
        self.driver().clean(Some(stall_time.as_secs()))
    }

    /// Start writing an image; see [`ImageWriter`].
    pub fn open_for_write(&self, id: &str) -> Result<ImageWriter> {
        let session = self.driver().open_for_write(id)?;
        Ok(ImageWriter {
            session,
            id: id.to_string(),
            written: 0,
        })
    }

    /// Start reading a cached image; see [`ImageReader`].
    pub fn open_for_read(&self, id: &str) -> Result<ImageReader> {
        let session = self.driver().open_for_read(id)?;
        Ok(ImageReader {
            session: Some(session),
            id: id.to_string(),
        })
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
                    Err(e) => return Err(Error::Io(format!("reading image {id:?}: {e}"))),
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
            Some(e) => Err(Error::Io(e)),
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
            if let Some(w) = writer.take() {
                if let Err(e) = w.abort(reason) {
                    log::warn!("aborting the write of image {id:?}: {e}");
                }
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
            if let Some(w) = writer.as_mut() {
                if let Err(e) = w.write_all(chunk) {
                    let message = format!("writing image {id:?} into the cache failed: {e}");
                    log::warn!("{message}; passing the rest through");
                    abort(&mut writer, &message);
                    cache_error = Some(message);
                }
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

fn is_sqlite(source: &DriverSource) -> bool {
    matches!(source, DriverSource::Builtin("sqlite"))
}

fn classify_copy_error(e: io::Error, source: &Path) -> Error {
    // io::copy cannot say which side failed; ask the source.
    match std::fs::metadata(source) {
        Ok(_) if e.kind() != io::ErrorKind::InvalidData => {
            Error::Io(format!("writing into the cache: {e}"))
        }
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
) -> Result<Arc<Driver>> {
    let component = runtime.component(source)?;
    Driver::start(
        runtime.clone(),
        component,
        Placement {
            root: root.clone(),
            options: config.driver_options(),
            xattr: config.xattr,
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
            let message = format!("flushing image {:?}: {e}", self.id);
            let _ = self.abort(&message);
            return Err(Error::Io(message));
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
