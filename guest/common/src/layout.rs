//! The cache root's layout, as paths relative to the root:
//!
//! ```text
//! <id>              complete, cached image files
//! incomplete/<id>   being written now
//! invalid/<id>      a write that failed or was abandoned
//! queue/<id>        zero-byte marker: "please cache this image"
//! cache.db          the sqlite driver's database (name configurable)
//! ```
//!
//! Only regular files whose names are valid image ids count as entries; the
//! database and its journal files never do, whichever driver runs.

use crate::fs::{self, EntryKind, ErrorCode, Metadata};
use crate::{Error, io_error, validate_image_id};

pub const INCOMPLETE: &str = "incomplete";
pub const INVALID: &str = "invalid";
pub const QUEUE: &str = "queue";

/// Seconds since the Unix epoch, from the host's wall clock (the `clock`
/// import: the guest has no WASI).
pub fn now() -> f64 {
    crate::bindings::image_cache::driver::clock::now()
}

pub struct Layout {
    /// File names in the root that are never images: the database, the
    /// files SQLite keeps beside it, and Glance's lock file.
    reserved: Vec<String>,
}

/// The lock file Glance's sqlite driver leaves in the root (oslo lockutils).
pub const GLANCE_DB_LOCK: &str = "image_cache_db_init";

impl Layout {
    pub fn new(db_name: &str) -> Self {
        let mut reserved: Vec<String> = ["", "-journal", "-wal", "-shm"]
            .iter()
            .map(|suffix| format!("{db_name}{suffix}"))
            .collect();
        reserved.push(GLANCE_DB_LOCK.to_string());
        Layout { reserved }
    }

    pub fn image(id: &str) -> String {
        id.to_string()
    }

    pub fn incomplete(id: &str) -> String {
        format!("{INCOMPLETE}/{id}")
    }

    pub fn invalid(id: &str) -> String {
        format!("{INVALID}/{id}")
    }

    pub fn queued(id: &str) -> String {
        format!("{QUEUE}/{id}")
    }

    /// Create `incomplete/`, `invalid/` and `queue/` if missing. Something
    /// other than a directory in their place is a bad configuration.
    pub fn create_dirs(&self) -> Result<(), Error> {
        for dir in [INCOMPLETE, INVALID, QUEUE] {
            match fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.code == ErrorCode::AlreadyExists => {
                    let meta = fs::stat(dir).map_err(io_error)?;
                    if meta.kind != EntryKind::Directory {
                        return Err(Error::BadConfiguration(format!(
                            "{dir}/ in the cache root is not a directory"
                        )));
                    }
                }
                Err(e) => {
                    return Err(Error::BadConfiguration(format!(
                        "cannot create {dir}/ in the cache root: {}",
                        e.message
                    )));
                }
            }
        }
        Ok(())
    }

    /// Whether a file name in the root can be a cached image.
    pub fn is_image_name(&self, name: &str) -> bool {
        validate_image_id(name).is_ok() && !self.reserved.iter().any(|r| r == name)
    }

    /// The ids of every complete cached image file, unsorted (one listing,
    /// no stat per file).
    pub fn image_ids(&self) -> Result<Vec<String>, Error> {
        Ok(fs::list_names("")
            .map_err(io_error)?
            .into_iter()
            .filter(|e| e.kind == EntryKind::RegularFile && self.is_image_name(&e.name))
            .map(|e| e.name)
            .collect())
    }

    /// Every complete cached image file with its metadata, unsorted (one
    /// listing; the host stats each entry).
    pub fn image_files(&self) -> Result<Vec<(String, Metadata)>, Error> {
        Ok(self
            .files_in("")?
            .into_iter()
            .filter(|(name, _)| self.is_image_name(name))
            .collect())
    }

    /// The regular files of `incomplete/`, `invalid/` or `queue/`.
    pub fn files_in(&self, dir: &str) -> Result<Vec<(String, Metadata)>, Error> {
        Ok(fs::list_dir(dir)
            .map_err(io_error)?
            .into_iter()
            .filter(|e| e.metadata.kind == EntryKind::RegularFile)
            .map(|e| (e.name, e.metadata))
            .collect())
    }

    /// Metadata of a regular file at `path`, or `None` if there is none.
    pub fn regular_file(&self, path: &str) -> Result<Option<Metadata>, Error> {
        match fs::stat(path) {
            Ok(m) if m.kind == EntryKind::RegularFile => Ok(Some(m)),
            Ok(_) => Ok(None),
            Err(e) if e.code == ErrorCode::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    /// The cached image `id` if it is one (a reserved name never is).
    pub fn cached(&self, id: &str) -> Result<Option<Metadata>, Error> {
        if !self.is_image_name(id) {
            return Ok(None);
        }
        self.regular_file(&Self::image(id))
    }
}

/// Remove a file; a file that is already gone is not an error.
pub fn remove_if_present(path: &str) -> Result<bool, fs::FsError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.code == ErrorCode::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_of_the_layout() {
        assert_eq!(Layout::image("abc"), "abc");
        assert_eq!(Layout::incomplete("abc"), "incomplete/abc");
        assert_eq!(Layout::invalid("abc"), "invalid/abc");
        assert_eq!(Layout::queued("abc"), "queue/abc");
    }

    #[test]
    fn the_database_and_its_files_are_never_images() {
        let layout = Layout::new("cache.db");
        for name in [
            "cache.db",
            "cache.db-wal",
            "cache.db-shm",
            "cache.db-journal",
            GLANCE_DB_LOCK,
        ] {
            assert!(!layout.is_image_name(name), "{name}");
        }
        assert!(layout.is_image_name("cache.db2"));
        assert!(layout.is_image_name("1"));
        assert!(!layout.is_image_name("a/b"));
        let other = Layout::new("glance.db");
        assert!(other.is_image_name("cache.db"));
        assert!(!other.is_image_name("glance.db-wal"));
    }
}
