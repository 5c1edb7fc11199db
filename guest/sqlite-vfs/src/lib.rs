//! SQLite inside a driver component.
//!
//! The amalgamation is compiled for the driver's wasm target
//! (`sqlite-wasm-rs`) and used through rusqlite; its files are the cache
//! root's, through the host's `fs` import ([`vfs`]). Every statement is
//! wasm: its time falls under the call's epoch deadline and its memory
//! under the driver's memory cap, and no SQL text ever reaches the host.
//!
//! The database keeps a rollback journal (`<name>-journal`), as Glance's
//! own sqlite driver does: a WAL needs shared memory between processes,
//! which a sandboxed driver does not have. A database that release 0.2 of
//! this driver switched to WAL is switched back on first open.

mod host_hooks;
pub mod vfs;

pub use rusqlite;
use rusqlite::{Connection, OpenFlags};

/// SQLite's own heap ceiling inside the instance: an allocation past it is
/// SQLite's out-of-memory error (a clean failure of the statement), well
/// before the host's memory cap would stop the instance.
pub const HEAP_LIMIT: i64 = 96 << 20;
/// Page cache per connection, in KiB (the build's default is 16 MiB, too
/// much for one of many instances).
pub const CACHE_KIB: i64 = 2048;

/// Wait for another connection's lock: short pauses growing to 20 ms,
/// until the host says the call's deadline has passed (then SQLite reports
/// the database as locked).
fn busy(count: i32) -> bool {
    let pause = 50u32 << count.clamp(0, 9);
    driver_common::clock::sleep(pause.min(20_000))
}

/// Whether the database file `name` in the root is in WAL mode (its header's
/// read and write versions are 2).
fn is_wal(name: &str) -> bool {
    let Ok(file) = driver_common::fs::open(name) else {
        return false;
    };
    matches!(file.read_at(18, 2).as_deref(), Ok([2, 2]))
}

/// Open (creating if needed) the database `name` of the root, ready for
/// use with a rollback journal and a busy wait bounded by the deadline.
pub fn open(name: &str) -> Result<Connection, String> {
    vfs::register()?;
    // SAFETY: a plain setter of SQLite's (instance-wide) heap limit.
    unsafe { rusqlite::ffi::sqlite3_hard_heap_limit64(HEAP_LIMIT) };
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let mut db =
        Connection::open_with_flags_and_vfs(name, flags, vfs::NAME).map_err(|e| e.to_string())?;
    db.busy_handler(Some(busy)).map_err(|e| e.to_string())?;
    // Before anything reads the schema: without shared memory a WAL
    // database can be read only in exclusive locking mode.
    if is_wal(name) {
        // Without shared memory SQLite reads a WAL only in exclusive
        // locking mode; leave WAL for the rollback journal there.
        db.pragma_update(None, "locking_mode", "EXCLUSIVE")
            .and_then(|()| db.pragma_update(None, "journal_mode", "DELETE"))
            .and_then(|()| db.pragma_update(None, "locking_mode", "NORMAL"))
            // The first statement in normal mode releases the lock.
            .and_then(|()| db.query_row("SELECT count(*) FROM sqlite_master", [], |_| Ok(())))
            .map_err(|e| format!("cannot leave WAL mode: {e}"))?;
    }
    db.pragma_update(None, "cache_size", -CACHE_KIB)
        .map_err(|e| e.to_string())?;
    Ok(db)
}
