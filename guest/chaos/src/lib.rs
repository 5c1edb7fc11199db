//! The chaos driver, a test fixture: `is-cached(seed)` makes `CALLS`
//! calls of the host's imports chosen and filled in at random from the
//! seed (a decimal number): paths built from hostile pieces (`..`, `/`,
//! absolute names, NUL, very long names, the option `chaos_target` outside
//! the root), `trusted.`/`security.` attribute names, times before 1970 or
//! not finite, locks, listings, renames, removals, and SQL built from
//! dangerous fragments (ATTACH, VACUUM INTO, PRAGMAs that change the whole
//! process, runaway recursion, huge blobs, extension loading).
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
use driver_common::sqlite::{Connection, Value};
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

const SQL: &[&str] = &[
    "ATTACH DATABASE '{target}' AS t",
    "ATTACH DATABASE 'file:{target}?mode=rwc' AS t",
    "ATTACH DATABASE '../chaos-planted.db' AS t",
    "VACUUM INTO '{target}'",
    "VACUUM",
    "PRAGMA hard_heap_limit = 1",
    "PRAGMA soft_heap_limit = 1",
    "PRAGMA temp_store_directory = '/tmp'",
    "PRAGMA database_list",
    "PRAGMA mmap_size = 1000000000",
    "PRAGMA journal_mode = MEMORY",
    "PRAGMA writable_schema = ON",
    "SELECT * FROM pragma_database_list",
    "SELECT load_extension('/lib/x86_64-linux-gnu/libc.so.6')",
    "SELECT fts3_tokenizer('simple')",
    "SELECT zeroblob(2000000000)",
    "SELECT randomblob(100000000)",
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "CREATE TEMP TABLE t (x)",
    "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
    "CREATE VIEW v AS SELECT 1",
    "CREATE TABLE IF NOT EXISTS t (x)",
    "INSERT INTO t VALUES (?)",
    "SELECT x FROM t",
    "DELETE FROM sqlite_master",
    "UPDATE sqlite_master SET sql = 'x'",
    "SELECT * FROM sqlite_dbpage",
    "BEGIN IMMEDIATE",
    "COMMIT",
    "ROLLBACK",
    "DETACH t",
    "SELECT printf('%.*c', 100000000, 'x')",
    "",
    ";;;",
    "SELECT 1; ATTACH '{target}' AS t",
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

fn value(rng: &mut Rng) -> Value {
    match rng.below(5) {
        0 => Value::Null,
        1 => Value::Integer(rng.next() as i64),
        2 => Value::Real(TIMES[rng.below(TIMES.len())]),
        3 => Value::Text("t".repeat(rng.below(1000))),
        _ => Value::Blob(vec![7; rng.below(1000)]),
    }
}

/// One random import call; its result is ignored.
fn chaos_call(rng: &mut Rng, files: &mut Vec<File>, dbs: &mut Vec<Connection>) {
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
            if let Ok(c) = Connection::open(&name) {
                dbs.push(c);
            }
        }
        12 | 13 if !dbs.is_empty() => {
            let sql = rng.pick(SQL).replace("{target}", &target);
            let params: Vec<Value> = (0..rng.below(3)).map(|_| value(rng)).collect();
            let db = &dbs[rng.below(dbs.len())];
            let _ = match rng.below(3) {
                0 => db.execute(&sql, &params).map(|_| ()),
                1 => db.query(&sql, &params).map(|_| ()),
                _ => db.execute_batch(&sql),
            };
        }
        14 => {
            let _ = xattr::probe();
        }
        15 => {
            // Drop some handles, so the resource caps are crossed both ways.
            files.truncate(rng.below(files.len() + 1));
            dbs.truncate(rng.below(dbs.len() + 1));
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
        let mut dbs = Vec::new();
        for _ in 0..CALLS {
            chaos_call(&mut rng, &mut files, &mut dbs);
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
        Err(Error::Io(format!(
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
