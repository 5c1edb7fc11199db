//! The chaos driver, a test fixture: `is-cached(seed)` makes `CALLS`
//! calls of the host's imports chosen and filled in at random from the
//! seed (a decimal number): paths built from hostile pieces (`..`, `/`,
//! absolute names, NUL, very long names, the option `chaos_target` outside
//! the root), `trusted.`/`security.` attribute names, times before 1970 or
//! not finite, locks, listings, renames, removals, read-write opens of
//! image files, reads and writes at huge offsets and lengths, truncations,
//! and byte-range locks of every kind over every range.
//!
//! Whatever the host answers is fine; what the test checks is the host:
//! nothing outside the root changes, nothing panics, the next call works.
//! It returns Ok(true) when every call was made, so a deadline or a trap is
//! visible as a fault. Every other operation behaves like an empty cache.

use std::cell::RefCell;

use driver_common::bindings::exports::image_cache::driver::cache_driver::{
    Guest, GuestReadSession, GuestWriteSession, ReadSession, WriteSession,
};
use driver_common::fs::{self, File};
use driver_common::{
    CachedImage, CleanReport, DriverInfo, Error, LruEntry, PruneReport, ReadRecord, xattr,
};

/// Import calls per `is-cached`.
const CALLS: u32 = 200;

thread_local! {
    static TARGET: RefCell<String> = const { RefCell::new(String::new()) };
}

/// xorshift64*: small, deterministic, no imports.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const PIECES: &[&str] = &[
    "",
    ".",
    "..",
    "../..",
    "/",
    "//",
    "a",
    "b",
    "incomplete",
    "invalid",
    "queue",
    "cache.db",
    "chaos.db",
    "link",
    "x\0y",
    "x\\y",
    "\u{1b}[31m",
    "\u{202e}",
    "🙂",
    "-wal",
];

const TIMES: &[f64] = &[
    0.0,
    -1.0,
    -1e300,
    1e300,
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    1.7e9,
    1e12,
    1e12 + 1.0,
    4e9,
];

const XATTRS: &[&str] = &[
    "user.hits",
    "user.",
    "trusted.x",
    "security.selinux",
    "system.posix_acl_access",
    "",
    "user.\0",
    "USER.x",
    "user.a/b",
];

/// Offsets and lengths for reads, writes, truncations and range locks.
const OFFSETS: &[u64] = &[
    0,
    1,
    511,
    4096,
    1 << 20,
    (1 << 20) + 1,
    0x4000_0000,
    0x4000_0002,
    u32::MAX as u64,
    1 << 40,
    i64::MAX as u64,
    u64::MAX - 1,
    u64::MAX,
];

fn path(rng: &mut Rng) -> String {
    let target = TARGET.with(|t| t.borrow().clone());
    match rng.below(10) {
        0 => target,
        1 => "x".repeat(rng.below(5000)),
        _ => {
            let parts = 1 + rng.below(4);
            (0..parts)
                .map(|_| rng.pick(PIECES))
                .collect::<Vec<_>>()
                .join("/")
        }
    }
}

fn time(rng: &mut Rng) -> Option<f64> {
    match rng.below(4) {
        0 => None,
        _ => Some(TIMES[rng.below(TIMES.len())]),
    }
}

fn offset(rng: &mut Rng) -> u64 {
    OFFSETS[rng.below(OFFSETS.len())]
}

fn range_lock(rng: &mut Rng) -> fs::RangeLock {
    match rng.below(3) {
        0 => fs::RangeLock::Unlocked,
        1 => fs::RangeLock::Shared,
        _ => fs::RangeLock::Exclusive,
    }
}

/// One random import call; its result is ignored.
fn chaos_call(rng: &mut Rng, files: &mut Vec<File>) {
    let target = TARGET.with(|t| t.borrow().clone());
    match rng.below(16) {
        0 => {
            if let Ok(f) = fs::create_new(&path(rng)) {
                files.push(f);
            }
        }
        1 => {
            if let Ok(f) = fs::open(&path(rng)) {
                files.push(f);
            }
        }
        2 => {
            let _ = fs::stat(&path(rng));
        }
        3 => {
            let _ = fs::create_dir(&path(rng));
        }
        4 => {
            let _ = fs::list_dir(&path(rng));
        }
        5 => {
            let _ = fs::list_names(&path(rng));
        }
        6 => {
            let _ = fs::rename(&path(rng), &path(rng));
        }
        7 => {
            let paths: Vec<String> = (0..rng.below(5)).map(|_| path(rng)).collect();
            let _ = fs::remove_files(&paths);
        }
        8 => {
            let _ = fs::set_times(&path(rng), time(rng), time(rng));
        }
        9 if !files.is_empty() => {
            let f = &files[rng.below(files.len())];
            match rng.below(6) {
                0 => {
                    let _ = f.set_times(time(rng), time(rng));
                }
                1 => {
                    let _ = f.try_lock();
                }
                2 => {
                    let _ = f.unlock();
                }
                3 => {
                    let _ = f.sync();
                }
                4 => {
                    let _ = f.metadata();
                }
                _ => {
                    let _ = xattr::list_names(f);
                }
            }
        }
        10 if !files.is_empty() => {
            let f = &files[rng.below(files.len())];
            let name = rng.pick(XATTRS);
            match rng.below(3) {
                0 => {
                    let _ = xattr::get(f, name);
                }
                1 => {
                    let _ = xattr::set(f, name, &vec![1; rng.below(70_000)]);
                }
                _ => {
                    let _ = xattr::remove(f, name);
                }
            }
        }
        11 => {
            let name = match rng.below(4) {
                0 => "chaos.db".to_string(),
                1 => target,
                _ => path(rng),
            };
            if let Ok(f) = fs::open_read_write(&name, rng.below(2) == 0) {
                files.push(f);
            }
        }
        12 | 13 if !files.is_empty() => {
            let f = &files[rng.below(files.len())];
            match rng.below(7) {
                0 => {
                    let length = match rng.below(3) {
                        0 => u32::MAX,
                        _ => rng.below(1 << 21) as u32,
                    };
                    let _ = f.read_at(offset(rng), length);
                }
                1 => {
                    let _ = f.write_at(offset(rng), &vec![9; rng.below(1 << 21)]);
                }
                2 => {
                    let _ = f.set_len(offset(rng));
                }
                3 => {
                    let _ = f.size();
                }
                4 => {
                    let _ = f.sync_data();
                }
                5 => {
                    let _ = f.set_range_lock(offset(rng), offset(rng), range_lock(rng));
                }
                _ => {
                    let _ = f.range_locked_elsewhere(offset(rng), offset(rng));
                }
            }
        }
        14 => {
            let _ = xattr::probe();
        }
        15 => {
            // Drop some handles, so the resource caps are crossed both ways.
            files.truncate(rng.below(files.len() + 1));
        }
        _ => {}
    }
}

struct Chaos;

impl Guest for Chaos {
    type WriteSession = Nothing;
    type ReadSession = Nothing;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "chaos".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "a test fixture that calls every import at random".into(),
        }
    }

    fn configure(options: Vec<(String, String)>) -> Result<(), Error> {
        for (key, value) in options {
            if key == "chaos_target" {
                TARGET.with(|t| *t.borrow_mut() = value);
            }
        }
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
        let Ok(seed) = image_id.parse::<u64>() else {
            return Ok(false);
        };
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mut files = Vec::new();
        for _ in 0..CALLS {
            chaos_call(&mut rng, &mut files);
        }
        Ok(true)
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
        Err(Error::NotFound(format!("image {image_id:?} is not cached")))
    }

    fn get_cached_nodes(_image_id: String) -> Result<Vec<String>, Error> {
        Ok(Vec::new())
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
        Err(driver_common::io_failure(format!(
            "the chaos driver does not cache {image_id:?}"
        )))
    }

    fn open_for_read(image_id: String) -> Result<(ReadSession, File), Error> {
        Err(Error::NotFound(format!("image {image_id:?} is not cached")))
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
        String::new()
    }
    fn checksum(&self, _read: &File) -> Result<Option<String>, Error> {
        Ok(None)
    }
    fn finish(&self, _read: &File) -> Result<(), Error> {
        Ok(())
    }
}

driver_common::bindings::export!(Chaos with_types_in driver_common::bindings);
