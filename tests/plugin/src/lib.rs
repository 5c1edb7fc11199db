//! A third party's driver, written against `wit/` alone, that attacks its
//! host. `is-cached(id)` runs the attack named by `id`; everything else
//! behaves like an empty cache, except `open-for-read("victim")`, which
//! renames the cached image `source` over `victim` and hands that file back
//! as `victim`'s.
//!
//! | id | attack |
//! | --- | --- |
//! | `escape` | opens `../outside` |
//! | `fifo` | opens `fifo`, a FIFO the test planted in the root |
//! | `hold-lock` | locks all of `cache.db` and keeps the file after the call |
//! | `write-image` | opens the cached image `source` read-write |
//! | `spin` | loops forever |

use std::cell::RefCell;

wit_bindgen::generate!({
    path: "../../wit",
    world: "driver",
    generate_all,
});

use exports::image_cache::driver::cache_driver::{
    Guest, GuestReadSession, GuestWriteSession, ReadSession, WriteSession,
};
use image_cache::driver::fs::{self, File, FsError, RangeLock};
use image_cache::driver::types::{
    CachedImage, CleanReport, DriverInfo, Error, IoError, LruEntry, PruneReport, ReadRecord,
};

thread_local! {
    static KEPT: RefCell<Vec<File>> = const { RefCell::new(Vec::new()) };
}

fn io(e: FsError) -> Error {
    Error::Io(IoError {
        code: e.code,
        message: e.message,
    })
}

fn attack(id: &str) -> Result<bool, Error> {
    match id {
        "escape" => fs::open("../outside").map(|_| true).map_err(io),
        "fifo" => fs::open("fifo").map(|_| true).map_err(io),
        "hold-lock" => {
            let file = fs::open_read_write("cache.db", true).map_err(io)?;
            let got = file
                .set_range_lock(0, 0, RangeLock::Exclusive)
                .map_err(io)?;
            KEPT.with(|k| k.borrow_mut().push(file));
            Ok(got)
        }
        "write-image" => {
            let file = fs::open_read_write("source", false).map_err(io)?;
            file.write_at(0, b"forged").map_err(io)?;
            Ok(true)
        }
        "spin" => {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n.wrapping_add(1));
            }
        }
        _ => Ok(false),
    }
}

struct Plugin;

impl Guest for Plugin {
    type WriteSession = Nothing;
    type ReadSession = Nothing;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "third-party".into(),
            version: "0.1.0".into(),
            description: "an outsider's driver that attacks its host".into(),
        }
    }
    fn configure(_options: Vec<(String, String)>) -> Result<(), Error> {
        Ok(())
    }
    fn get_cache_size() -> Result<u64, Error> {
        Ok(0)
    }
    fn get_hit_count(_image_id: String) -> Result<u64, Error> {
        Ok(0)
    }
    fn record_reads(_reads: Vec<ReadRecord>) -> Result<u64, Error> {
        Ok(0)
    }
    fn get_cached_images() -> Result<Vec<CachedImage>, Error> {
        Ok(Vec::new())
    }
    fn is_cached(image_id: String) -> Result<bool, Error> {
        attack(&image_id)
    }
    fn is_being_cached(_image_id: String) -> Result<bool, Error> {
        Ok(false)
    }
    fn is_cacheable(_image_id: String) -> Result<bool, Error> {
        Ok(true)
    }
    fn is_queued(_image_id: String) -> Result<bool, Error> {
        Ok(false)
    }
    fn queue_image(_image_id: String) -> Result<bool, Error> {
        Ok(false)
    }
    fn get_queued_images() -> Result<Vec<String>, Error> {
        Ok(Vec::new())
    }
    fn delete_cached_image(_image_id: String) -> Result<(), Error> {
        Ok(())
    }
    fn delete_all_cached_images() -> Result<u64, Error> {
        Ok(0)
    }
    fn delete_queued_image(_image_id: String) -> Result<(), Error> {
        Ok(())
    }
    fn delete_all_queued_images() -> Result<u64, Error> {
        Ok(0)
    }
    fn get_least_recently_accessed() -> Result<Option<(String, u64)>, Error> {
        Ok(None)
    }
    fn get_least_recently_accessed_batch(_count: u32) -> Result<Vec<LruEntry>, Error> {
        Ok(Vec::new())
    }
    fn get_image_size(image_id: String) -> Result<u64, Error> {
        Err(Error::NotFound(format!("{image_id} is not cached")))
    }
    fn get_cached_nodes(_image_id: String) -> Result<Vec<String>, Error> {
        Err(Error::Unsupported("one node".into()))
    }
    fn clean(_stall_time: Option<u64>) -> Result<CleanReport, Error> {
        Ok(CleanReport {
            invalid: Vec::new(),
            incomplete: Vec::new(),
            failures: Vec::new(),
        })
    }
    fn prune(_max_size: u64) -> Result<PruneReport, Error> {
        Ok(PruneReport {
            removed: Vec::new(),
            bytes_removed: 0,
            size_after: 0,
            failures: Vec::new(),
        })
    }
    fn open_for_write(image_id: String) -> Result<(WriteSession, File), Error> {
        Err(Error::Unsupported(format!(
            "{image_id}: this plugin writes nothing"
        )))
    }
    fn open_for_read(image_id: String) -> Result<(ReadSession, File), Error> {
        if image_id == "victim" {
            fs::rename("source", "victim").map_err(io)?;
            let file = fs::open("victim").map_err(io)?;
            return Ok((ReadSession::new(Nothing), file));
        }
        Err(Error::NotFound(format!("{image_id} is not cached")))
    }
}

struct Nothing;

impl GuestWriteSession for Nothing {
    fn image_id(&self) -> String {
        String::new()
    }
    fn commit(&self, _checksum: Option<String>) -> Result<(), Error> {
        Ok(())
    }
    fn abort(&self, _reason: String) -> Result<(), Error> {
        Ok(())
    }
}

impl GuestReadSession for Nothing {
    fn image_id(&self) -> String {
        "victim".into()
    }
    fn checksum(&self, _read: &File) -> Result<Option<String>, Error> {
        Ok(None)
    }
    fn finish(&self, _read: &File) -> Result<(), Error> {
        Ok(())
    }
}

export!(Plugin);
