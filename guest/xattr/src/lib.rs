//! The xattr driver: metadata in extended attributes of the image files.
//!
//! Like Glance's xattr driver: `user.hits` holds the hit count as decimal
//! text, `user.error` the reason a write was abandoned, and the file's
//! access time is the last access. Unlike it, the driver sets the access time
//! itself when a read finishes (so LRU order holds on `relatime` and
//! `noatime` mounts), and takes a file lock around the hit increment (so
//! concurrent readers never lose one).

use driver_common::fs::{self, File};
use driver_common::{
    Backend, DriverInfo, Error, Image, Layout, MetadataStore, Options, io_error, xattr,
};

const HITS: &str = "user.hits";
const ERROR: &str = "user.error";
const CHECKSUM: &str = "user.checksum";

pub struct XattrStore;

fn read_hits(file: &File) -> Result<u64, Error> {
    let value = match xattr::get(file, HITS) {
        Ok(value) => value,
        Err(e) if e.code == fs::ErrorCode::NotFound => return Ok(0),
        Err(e) => return Err(io_error(e)),
    };
    Ok(String::from_utf8(value)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0))
}

fn write_hits(file: &File, hits: u64) -> Result<(), Error> {
    xattr::set(file, HITS, hits.to_string().as_bytes()).map_err(io_error)
}

driver_common::driver_info!(
    "xattr",
    "hits in the user.hits extended attribute, last access in the file's atime"
);

impl Backend for XattrStore {
    fn info() -> DriverInfo {
        driver_common::parse_info(DRIVER_INFO)
    }

    fn open(_options: &Options) -> Result<Self, Error> {
        xattr::probe().map_err(|e| {
            Error::BadConfiguration(format!(
                "the xattr driver needs user extended attributes: {}",
                e.message
            ))
        })?;
        Ok(XattrStore)
    }
}

impl MetadataStore for XattrStore {
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error> {
        ids.iter()
            .map(|id| {
                // One open per image: its metadata and its hits come from the
                // same file, whatever happens to the name meanwhile.
                let Ok(file) = fs::open(&Layout::image(id)) else {
                    return Ok(None); // removed since it was listed
                };
                let meta = file.metadata().map_err(io_error)?;
                Ok(Some(Image {
                    size: meta.size,
                    hits: read_hits(&file)?,
                    last_accessed: meta.accessed,
                    last_modified: meta.modified,
                }))
            })
            .collect()
    }

    fn hits(&self, id: &str) -> Result<u64, Error> {
        match fs::open(&Layout::image(id)) {
            Ok(file) => read_hits(&file),
            Err(_) => Ok(0),
        }
    }

    fn record_commit(
        &self,
        _id: &str,
        path: &str,
        _size: u64,
        checksum: Option<&str>,
        now: f64,
    ) -> Result<(), Error> {
        let file = fs::open(path).map_err(io_error)?;
        write_hits(&file, 0)?;
        if let Some(checksum) = checksum {
            xattr::set(&file, CHECKSUM, checksum.as_bytes()).map_err(io_error)?;
        }
        file.set_times(Some(now), Some(now)).map_err(io_error)
    }

    fn checksum(&self, _id: &str, file: &File) -> Result<Option<String>, Error> {
        match xattr::get(file, CHECKSUM) {
            Ok(value) => Ok(String::from_utf8(value).ok().filter(|c| !c.is_empty())),
            Err(e) if e.code == fs::ErrorCode::NotFound => Ok(None),
            Err(e) => Err(io_error(e)),
        }
    }

    fn record_read(&self, _id: &str, file: &File, now: f64) -> Result<(), Error> {
        // The file that was read, even if the image was deleted meanwhile.
        file.lock().map_err(io_error)?;
        let result = read_hits(file)
            .and_then(|hits| write_hits(file, hits.saturating_add(1)))
            .and_then(|()| file.set_times(Some(now), None).map_err(io_error));
        let _ = file.unlock();
        result
    }

    fn record_abort(&self, id: &str, reason: &str) -> Result<(), Error> {
        let file = match fs::open(&Layout::invalid(id)) {
            Ok(file) => file,
            Err(_) => return Ok(()),
        };
        xattr::remove(&file, HITS).map_err(io_error)?;
        xattr::set(&file, ERROR, reason.as_bytes()).map_err(io_error)
    }

    fn forget(&self, _ids: &[String]) -> Result<(), Error> {
        // The attributes went with the files.
        Ok(())
    }
}

type XattrDriver = driver_common::Driver<XattrStore>;
driver_common::bindings::export!(XattrDriver with_types_in driver_common::bindings);
