//! Where a driver keeps what the file system does not: hits, access times.

use crate::fs::Metadata;
use crate::{DriverInfo, Error};

/// The driver's options (Glance's names).
pub struct Options {
    /// `image_cache_sqlite_db`: the database file name in the root.
    pub sqlite_db: String,
    /// Every option as the host passed it, for what one driver alone reads
    /// (e.g. the centralized driver's `worker_self_reference_url`).
    pub all: Vec<(String, String)>,
}

pub const DEFAULT_SQLITE_DB: &str = "cache.db";

impl Options {
    pub fn parse(options: &[(String, String)]) -> Result<Options, Error> {
        let mut parsed = Options {
            sqlite_db: DEFAULT_SQLITE_DB.to_string(),
            all: options.to_vec(),
        };
        for (key, value) in options {
            if key == "image_cache_sqlite_db" {
                let plain = !value.is_empty()
                    && value != "."
                    && value != ".."
                    && !value.contains(['/', '\\', '\0']);
                if !plain {
                    return Err(Error::BadConfiguration(format!(
                        "image_cache_sqlite_db must be a file name inside the cache root, not {value:?}"
                    )));
                }
                parsed.sqlite_db = value.clone();
            }
        }
        Ok(parsed)
    }

    /// The last value given for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.all
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// What a driver knows of one cached image.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Image {
    pub size: u64,
    pub hits: u64,
    pub last_accessed: f64,
    pub last_modified: f64,
}

impl Image {
    /// An image with no recorded metadata: no hits, last accessed when the
    /// file system says (so LRU order kept by the xattr driver survives a
    /// switch to sqlite).
    pub fn unrecorded(file: &Metadata) -> Image {
        Image {
            size: file.size,
            hits: 0,
            last_accessed: file.accessed.max(file.modified),
            last_modified: file.modified,
        }
    }
}

/// The part of a driver that differs: where metadata lives.
pub trait MetadataStore {
    /// What the store knows of the named images (their files are listed in
    /// the root), one per id, in order; `None` where it has no record, and
    /// the driver then asks the file system.
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error>;
    /// Sizes the store has recorded for the named images, one per id;
    /// `None` where the driver should stat the file. Stores that record
    /// sizes answer without touching the files.
    fn sizes(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Error> {
        Ok(vec![None; ids.len()])
    }
    /// Whether [`MetadataStore::sizes`] answers from records. A store that
    /// does not is asked nothing: the cache size comes from one listing of
    /// the root with each file's metadata (one host call, not one per
    /// image).
    fn records_sizes(&self) -> bool {
        false
    }
    /// Hits of the cached image `id` (its file exists).
    fn hits(&self, id: &str) -> Result<u64, Error>;
    /// A write finished at `path` (still `incomplete/<id>`) and is about to
    /// be published: hits 0, accessed and modified `now`.
    fn record_commit(
        &self,
        id: &str,
        path: &str,
        size: u64,
        checksum: Option<&str>,
        now: f64,
    ) -> Result<(), Error>;
    /// A read of the cached image finished: hits + 1, accessed `now`.
    /// `file` is the file that was read. Must not lose increments when
    /// several instances read at once.
    fn record_read(&self, id: &str, file: &crate::fs::File, now: f64) -> Result<(), Error>;
    /// `record-reads`: reads completed without `finish`, each at its own
    /// time; only ids that `layout` says are cached images count. How many
    /// were recorded. Stores that can record many in one transaction
    /// should; this default opens each image and records it as `finish`.
    fn record_reads(
        &self,
        layout: &crate::Layout,
        reads: &[crate::ReadRecord],
    ) -> Result<u64, Error> {
        let mut recorded = 0;
        for read in reads {
            if !layout.is_image_name(&read.image_id) {
                continue;
            }
            let Ok(file) = crate::fs::open(&crate::Layout::image(&read.image_id)) else {
                continue; // not cached (any more)
            };
            match file.metadata() {
                Ok(m) if m.kind == crate::fs::EntryKind::RegularFile => {}
                _ => continue,
            }
            self.record_read(&read.image_id, &file, read.accessed)?;
            recorded += 1;
        }
        Ok(recorded)
    }
    /// The checksum recorded by `record_commit` for the cached image `id`,
    /// whose open file is `file`; `None` when none was recorded.
    fn checksum(&self, _id: &str, _file: &crate::fs::File) -> Result<Option<String>, Error> {
        Ok(None)
    }
    /// A write was abandoned; its file is now `invalid/<id>`.
    fn record_abort(&self, id: &str, reason: &str) -> Result<(), Error>;
    /// Drop the metadata of images whose files were removed.
    fn forget(&self, ids: &[String]) -> Result<(), Error>;
    /// `clean`: drop records of images whose files are not among `present`
    /// (a wiped or edited root), except records younger than
    /// [`FORGET_MISSING_AFTER`] seconds (a commit records before it
    /// renames); how many were dropped. Stores whose stale records do no
    /// harm need not.
    fn forget_missing(&self, _present: &[String]) -> Result<u64, Error> {
        Ok(0)
    }
    /// The nodes whose caches hold `id`, for stores shared by several
    /// nodes; a store local to one root does not know of others.
    /// `here` says whether this node's root holds the image's file now (the
    /// files are the truth for this node; the store for the others).
    fn cached_nodes(&self, _id: &str, _here: bool) -> Result<Vec<String>, Error> {
        Err(Error::Unsupported(
            "this driver keeps metadata for one node only; get-cached-nodes needs the centralized driver".to_string(),
        ))
    }
}

/// Stores that can drop records whose files are gone do it when `clean`
/// asks (see [`MetadataStore::forget_missing`]).
pub const FORGET_MISSING_AFTER: f64 = 60.0;

/// A driver's metadata store, as the driver opens it at configure time.
pub trait Backend: MetadataStore + Sized + 'static {
    fn info() -> DriverInfo;
    /// Open (creating if needed) the store in the configured root.
    fn open(options: &Options) -> Result<Self, Error>;
}
