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
//! | `exhaust-handles` | opens files until something gives |
//! | `garbage` | (via the LRU batch and listing) breaks the contract |
//! | `sql-instr` | one SQLite opcode for minutes: `instr()` on a 4M-char haystack with a 2M-char needle (SQLite inside the driver) |
//! | `sql-sort-memory` | `ORDER BY` over 16 MB values, past the memory cap |
//! | `sql-attach`, `sql-attach-relative`, `sql-vacuum-into` | SQLite inside the driver `ATTACH`es or writes a file outside the root (the option `hostile_target`, or `../`) |
//! | `hold-range-lock` | takes an exclusive byte-range lock on all of `cache.db` and keeps the file after the call returns |
//! | `open-fifo` | opens `fifo` (a FIFO the test planted), read and read-write |
//! | `open-hardlink` | opens `hardlink` (a hard link the test planted to a file outside the root), read and read-write |
//! | `write-image` | opens an image's file (`hostile-image`, then `incomplete/hostile-image`) read-write to change its bytes |
//! | `lock-forever` | waits for a lock it holds itself through another handle |
//! | `set-times-negative` | sets a time before 1970 |
//! | `error-flood` | returns a 10 MB error with terminal escapes |
//!
//! Sessions: `open-for-write("wrong-file")` hands back another file of the
//! root; `open-for-read("read-db")` hands back its database as the image;
//! `open-for-read("swapped")` renames the cached image `swap-source` over
//! `swapped` and hands that back (the host's seal catches it);
//! `open-for-read("bad-checksum")` opens the file `bad-checksum` (put there
//! by the test) and reports a checksum with a header injected into it.
//! `get-queued-images` returns an id with a path in it when `queue-image`
//! was called with `bad-ids` first.
//! `record-reads` claims one read more than it was given when one of the
//! ids is `record-reads-overcount` (and records nothing otherwise).

use std::cell::RefCell;
use std::hint::black_box;

use driver_common::bindings::exports::image_cache::driver::cache_driver::{
    Guest, GuestReadSession, GuestWriteSession, ReadSession, WriteSession,
};
use driver_common::fs::{self, ErrorCode, File};
use driver_common::{
    CachedImage, CleanReport, DriverInfo, Error, LruEntry, PruneReport, ReadRecord, xattr,
};

struct Hostile;

thread_local! {
    /// A file outside the root the test wants attacked (option
    /// `hostile_target`).
    static TARGET: RefCell<String> = const { RefCell::new(String::new()) };
    static BAD_IDS: RefCell<bool> = const { RefCell::new(false) };
}

fn target() -> String {
    TARGET.with(|t| t.borrow().clone())
}

fn io(e: fs::FsError) -> Error {
    Error::Io(driver_common::IoError {
        code: e.code,
        message: format!("{:?}: {}", e.code, e.message),
    })
}

fn io_text(message: String) -> Error {
    driver_common::io_failure(message)
}

thread_local! {
    /// What `hold-range-lock` keeps past its call.
    static HELD: RefCell<Vec<File>> = const { RefCell::new(Vec::new()) };
}

/// Run SQL on SQLite inside this driver, on `cache.db` in the root (the
/// one database name at the top of the root a driver may write).
fn sql(statement: &str) -> Result<bool, Error> {
    let db = sqlite_vfs::open("cache.db").map_err(Error::Database)?;
    let mut stmt = db
        .prepare(statement)
        .map_err(|e| Error::Database(e.to_string()))?;
    let mut rows = stmt.query([]).map_err(|e| Error::Database(e.to_string()))?;
    while rows
        .next()
        .map_err(|e| Error::Database(e.to_string()))?
        .is_some()
    {}
    Ok(true)
}

/// Open `path` read-only, then read-write: the first failure, or true.
fn open_both(path: &str) -> Result<bool, Error> {
    fs::open(path).map_err(io)?;
    fs::open_read_write(path, false).map_err(io)?;
    Ok(true)
}

fn attack(id: &str) -> Result<bool, Error> {
    match id {
        "sql-instr" => sql(
            "SELECT instr(printf('%.*c', 4000000, 'a') || 'b', printf('%.*c', 2000000, 'a') || 'b')",
        ),
        "sql-sort-memory" => sql(
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 64) \
             SELECT x, zeroblob(16000000) || randomblob(16) AS v FROM c ORDER BY v",
        ),
        "sql-attach" => sql(&format!("ATTACH DATABASE '{}' AS stolen", target())),
        "sql-attach-relative" => sql("ATTACH DATABASE '../hostile-planted.db' AS stolen"),
        "sql-vacuum-into" => sql(&format!("VACUUM INTO '{}'", target())),
        "hold-range-lock" => {
            let file = fs::open_read_write("cache.db", false).map_err(io)?;
            let got = file
                .set_range_lock(0, 0, fs::RangeLock::Exclusive)
                .map_err(io)?;
            HELD.with(|h| h.borrow_mut().push(file));
            Ok(got)
        }
        "open-fifo" => open_both("fifo"),
        "open-hardlink" => open_both("hardlink"),
        "write-image" => {
            // An image's file, then a fill in progress: the host writes
            // those bytes, never the driver.
            let _ = fs::create_new("hostile-image");
            let _ = fs::create_dir("incomplete");
            let _ = fs::create_new("incomplete/hostile-image");
            for path in ["hostile-image", "incomplete/hostile-image"] {
                let file = fs::open_read_write(path, false).map_err(io)?;
                file.write_at(0, b"forged").map_err(io)?;
            }
            Ok(true)
        }
        "lock-forever" => {
            let _ = fs::create_new("hostile-lock");
            let first = fs::open("hostile-lock").map_err(io)?;
            let second = fs::open("hostile-lock").map_err(io)?;
            first.lock().map_err(io)?;
            second.lock().map(|()| true).map_err(io)
        }
        "set-times-negative" => {
            let _ = fs::create_new("hostile-times");
            fs::set_times("hostile-times", Some(-1.0), Some(-1e300))
                .map(|()| true)
                .map_err(io)
        }
        "error-flood" => {
            let mut message = String::from("\u{1b}[2J\u{1b}[31mflood");
            message.push_str(&"A".repeat(10_000_000));
            Err(io_text(message))
        }
        "nap" => {
            // Waits as SQLite's busy handler does, until told to stop.
            while driver_common::bindings::image_cache::driver::clock::sleep(100_000) {}
            Ok(true)
        }
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
        "escape-parent" => fs::open("../../etc/passwd").map(|_| true).map_err(io),
        "escape-absolute" => fs::open("/etc/passwd").map(|_| true).map_err(io),
        "trusted-xattr" => {
            let file = match fs::create_new("hostile-scratch") {
                Ok(f) => f,
                Err(e) if e.code == ErrorCode::AlreadyExists => {
                    fs::open("hostile-scratch").map_err(io)?
                }
                Err(e) => return Err(io(e)),
            };
            let result = xattr::set(&file, "trusted.hostile", b"1");
            let _ = fs::remove_file("hostile-scratch");
            result.map(|()| true).map_err(io)
        }
        "exhaust-handles" => {
            let _ = fs::create_new("hostile-handles");
            let mut held = Vec::new();
            loop {
                match fs::open("hostile-handles") {
                    Ok(f) => held.push(f),
                    Err(e) => {
                        return Err(io_text(format!(
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
    type ReadSession = Reading;

    fn info() -> DriverInfo {
        DriverInfo {
            name: "hostile".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            description: "a test fixture that attacks its host".into(),
        }
    }

    fn configure(options: Vec<(String, String)>) -> Result<(), Error> {
        for (key, value) in options {
            if key == "hostile_target" {
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

    fn record_reads(reads: Vec<ReadRecord>) -> Result<u64, Error> {
        if reads.iter().any(|r| r.image_id == "record-reads-overcount") {
            // Garbage: more reads recorded than were given.
            return Ok(reads.len() as u64 + 1);
        }
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

    fn queue_image(image_id: String) -> Result<bool, Error> {
        if image_id == "bad-ids" {
            BAD_IDS.with(|b| *b.borrow_mut() = true);
        }
        Ok(false)
    }

    fn get_queued_images() -> Result<Vec<String>, Error> {
        match BAD_IDS.with(|b| *b.borrow()) {
            true => Ok(vec!["../../etc/passwd".to_string()]),
            false => Ok(Vec::new()),
        }
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
        if image_id == "wrong-file" {
            // Another file of the root, not incomplete/<id>.
            let _ = fs::create_dir("incomplete");
            let _ = fs::remove_file("decoy");
            let decoy = fs::create_new("decoy").map_err(io)?;
            return Ok((WriteSession::new(Nothing), decoy));
        }
        Err(io_text(format!(
            "the hostile driver does not cache {image_id:?}"
        )))
    }

    fn open_for_read(image_id: String) -> Result<(ReadSession, File), Error> {
        if image_id == "read-db" {
            // Its database handed back as the image's bytes.
            let _ = sql("SELECT 1")?;
            let file = fs::open("cache.db").map_err(io)?;
            return Ok((ReadSession::new(Reading::Plain), file));
        }
        if image_id == "swapped" {
            // Another image's file renamed over this one, then served as it.
            fs::rename("swap-source", "swapped").map_err(io)?;
            let file = fs::open("swapped").map_err(io)?;
            return Ok((ReadSession::new(Reading::Plain), file));
        }
        if image_id == "bad-checksum" {
            let file = fs::open("bad-checksum").map_err(|e| Error::NotFound(e.message))?;
            return Ok((ReadSession::new(Reading::BadChecksum), file));
        }
        Err(Error::NotFound(format!("image {image_id:?} is not cached")))
    }
}

/// Write sessions (handed out only to break the contract).
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

/// Read sessions; `BadChecksum`'s checksum would add a header to an HTTP
/// answer.
enum Reading {
    Plain,
    BadChecksum,
}

impl GuestReadSession for Reading {
    fn image_id(&self) -> String {
        String::new()
    }
    fn checksum(&self, _read: &File) -> Result<Option<String>, Error> {
        Ok(match self {
            Reading::Plain => None,
            Reading::BadChecksum => Some("0123\r\nSet-Cookie: stolen=1".to_string()),
        })
    }
    fn finish(&self, _read: &File) -> Result<(), Error> {
        Ok(())
    }
}

driver_common::bindings::export!(Hostile with_types_in driver_common::bindings);
