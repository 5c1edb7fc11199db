//! A hostile driver, for the host's tests. `is-cached(id)` runs the attack
//! named by `id`; every other id, and every other operation, behaves like an
//! empty cache so the host can check that the next call still works.
//!
//! | id | attack |
//! | --- | --- |
//! | `spin` | loops forever |
//! | `alloc` | allocates without end |
//! | `panic` | panics |
//! | `escape-parent`, `escape-absolute` | opens a file outside the root |
//! | `trusted-xattr` | sets a `trusted.` attribute |
//! | `escape-db` | opens a database outside the root |
//! | `exhaust-handles` | opens files until something gives |
//! | `garbage` | (via the LRU batch and listing) breaks the contract |

use std::hint::black_box;

use driver_common::bindings::exports::image_cache::driver::cache_driver::{
    Guest, GuestReadSession, GuestWriteSession, ReadSession, WriteSession,
};
use driver_common::fs::{self, ErrorCode, File};
use driver_common::sqlite::Connection;
use driver_common::{CachedImage, CleanReport, DriverInfo, Error, LruEntry, PruneReport, xattr};

struct Hostile;

fn attack(id: &str) -> Result<bool, Error> {
    match id {
        "spin" => {
            let mut n = 0u64;
            loop {
                n = black_box(n.wrapping_add(1));
            }
        }
        "alloc" => {
            let mut hoard = Vec::new();
            loop {
                hoard.push(black_box(vec![7u8; 1 << 20]));
            }
        }
        "panic" => panic!("the hostile driver panics on purpose"),
        "escape-parent" => fs::open("../../etc/passwd")
            .map(|_| true)
            .map_err(|e| Error::Io(e.message)),
        "escape-absolute" => fs::open("/etc/passwd")
            .map(|_| true)
            .map_err(|e| Error::Io(e.message)),
        "trusted-xattr" => {
            let file = match fs::create_new("hostile-scratch") {
                Ok(f) => f,
                Err(e) if e.code == ErrorCode::AlreadyExists => {
                    fs::open("hostile-scratch").map_err(|e| Error::Io(e.message))?
                }
                Err(e) => return Err(Error::Io(e.message)),
            };
            let result = xattr::set(&file, "trusted.hostile", b"1");
            let _ = fs::remove_file("hostile-scratch");
            result.map(|()| true).map_err(|e| Error::Io(e.message))
        }
        "escape-db" => Connection::open("../outside.db")
            .map(|_| true)
            .map_err(|e| Error::Database(e.message)),
        "exhaust-handles" => {
            let _ = fs::create_new("hostile-handles");
            let mut held = Vec::new();
            loop {
                match fs::open("hostile-handles") {
                    Ok(f) => held.push(f),
                    Err(e) => {
                        return Err(Error::Io(format!(
                            "after {} handles: {}",
                            held.len(),
                            e.message
                        )));
                    }
                }
            }
        }
        _ => Ok(false),
    }
}

impl Guest for Hostile {
    type WriteSession = Nothing;
    type ReadSession = Nothing;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "a test fixture that attacks its host".into(),
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

    fn get_cached_images() -> Result<Vec<CachedImage>, Error> {
        // Garbage: out of order.
        let image = |id: &str| CachedImage {
            image_id: id.into(),
            hits: 0,
            last_modified: 0.0,
            last_accessed: 0.0,
            size: 1,
        };
        Ok(vec![image("b"), image("a")])
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

    fn get_least_recently_accessed_batch(count: u32) -> Result<Vec<LruEntry>, Error> {
        // Garbage: more entries than asked for.
        Ok((0..count as u64 + 5)
            .map(|i| LruEntry {
                image_id: i.to_string(),
                size: 1,
                last_accessed: 0.0,
            })
            .collect())
    }

    fn get_image_size(image_id: String) -> Result<u64, Error> {
        Err(Error::NotFound(format!("image {image_id:?} is not cached")))
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
        Err(Error::Io(format!(
            "the hostile driver does not cache {image_id:?}"
        )))
    }

    fn open_for_read(image_id: String) -> Result<(ReadSession, File), Error> {
        Err(Error::NotFound(format!("image {image_id:?} is not cached")))
    }
}

/// Sessions are never handed out.
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
        String::new()
    }
    fn finish(&self, _read: &File) -> Result<(), Error> {
        Ok(())
    }
}

driver_common::bindings::export!(Hostile with_types_in driver_common::bindings);
