//! The sqlite driver: metadata in Glance's `cached_images` table.
//!
//! The database is `cache.db` in the root (option `image_cache_sqlite_db`).
//! SQLite runs inside this component ([`sqlite_vfs`]): every statement is
//! the driver's own wasm, bounded by the call's deadline and the driver's
//! memory cap, and the host sees only file reads, writes and locks. The
//! table is exactly Glance's and the journal is a rollback journal, as
//! Glance's own driver keeps it, so Glance's processes and this driver can
//! share one directory at once (their locks are native SQLite's). It keeps
//! no index beside the primary key (as Glance): LRU order comes from one
//! scan, and an index on `last_accessed` made every hit write three pages
//! instead of one. Release 0.1 created one; it is dropped.

use driver_common::{
    Backend, DriverInfo, Error, Image, Layout, MetadataStore, Options, ReadRecord, id_map,
};
use sqlite_vfs::rusqlite::{self, Connection, OptionalExtension, params};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS cached_images (
    image_id TEXT PRIMARY KEY,
    last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0,
    size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0,
    checksum TEXT
);
DROP INDEX IF EXISTS cached_images_last_accessed;
";

/// Hits stop growing here rather than overflow.
const MAX_HITS: i64 = i64::MAX - 1;

pub struct SqliteStore {
    db: Connection,
    db_name: String,
}

/// A SQLite failure as the driver's error: a full disk or quota (SQLite's
/// `SQLITE_FULL`, which the VFS reports for the host's `no-space`) stays a
/// `no-space` io error, so it reaches the CLI's exit code and the server's
/// 507 as the operator's to fix; anything else is a database error.
fn db_error(e: rusqlite::Error) -> Error {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) if f.code == rusqlite::ErrorCode::DiskFull => {
            Error::Io(driver_common::IoError {
                code: driver_common::fs::ErrorCode::NoSpace,
                message: e.to_string(),
            })
        }
        _ => Error::Database(e.to_string()),
    }
}

/// A count or size as SQLite stored it: negative or non-numeric reads as 0.
fn count(v: rusqlite::types::ValueRef<'_>) -> u64 {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Integer(i) => i.max(0) as u64,
        ValueRef::Real(r) if r > 0.0 => r as u64,
        _ => 0,
    }
}

/// A time as SQLite stored it, if it is a number.
fn time(v: rusqlite::types::ValueRef<'_>) -> Option<f64> {
    use rusqlite::types::ValueRef;
    match v {
        ValueRef::Real(r) => Some(r),
        ValueRef::Integer(i) => Some(i as f64),
        _ => None,
    }
}

impl SqliteStore {
    /// A read of `id` completed at `now`: hits + 1, last accessed `now`.
    /// False if the image has neither a row nor a file.
    fn bump(&self, id: &str, now: f64) -> Result<bool, Error> {
        // One statement: SQLite serialises it, so concurrent readers in
        // other instances never lose an increment.
        let changed = self
            .db
            .prepare_cached(
                "UPDATE cached_images SET hits = MIN(hits, ?1) + 1, last_accessed = ?2 \
                 WHERE image_id = ?3",
            )
            .and_then(|mut s| s.execute(params![MAX_HITS - 1, now, id]))
            .map_err(db_error)?;
        if changed > 0 {
            return Ok(true);
        }
        // A file with no row (written by a crashed writer, or copied in).
        let layout = Layout::new(&self.db_name);
        let Some(meta) = layout.cached(id)? else {
            return Ok(false);
        };
        self.db
            .execute(
                "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits) \
                 VALUES (?1, ?2, ?3, ?4, 1) \
                 ON CONFLICT(image_id) DO UPDATE SET hits = MIN(hits, ?5) + 1, \
                 last_accessed = excluded.last_accessed",
                params![
                    id,
                    now,
                    meta.modified,
                    meta.size.min(i64::MAX as u64) as i64,
                    MAX_HITS - 1
                ],
            )
            .map_err(db_error)?;
        Ok(true)
    }

    /// Run `body` in one write transaction, rolled back if it fails.
    fn transaction(&self, body: impl FnOnce() -> Result<(), Error>) -> Result<(), Error> {
        self.db.execute_batch("BEGIN IMMEDIATE").map_err(db_error)?;
        match body() {
            Ok(()) => self.db.execute_batch("COMMIT").map_err(|e| {
                let _ = self.db.execute_batch("ROLLBACK");
                db_error(e)
            }),
            Err(e) => {
                let _ = self.db.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

driver_common::driver_info!(
    "sqlite",
    "hits and access times in Glance's cached_images table (cache.db in the root), SQLite inside the driver"
);

impl Backend for SqliteStore {
    fn info() -> DriverInfo {
        driver_common::parse_info(DRIVER_INFO)
    }

    fn open(options: &Options) -> Result<Self, Error> {
        let name = &options.sqlite_db;
        let bad =
            |e: String| Error::BadConfiguration(format!("cannot use the database {name}: {e}"));
        let db = sqlite_vfs::open(name).map_err(bad)?;
        // What Glance's driver sets: a power cut may lose the last hit
        // counts, which a cache can afford; the journal keeps the file whole.
        db.pragma_update(None, "synchronous", "NORMAL")
            .and_then(|()| db.pragma_update(None, "journal_mode", "PERSIST"))
            .and_then(|()| db.execute_batch(SCHEMA))
            .map_err(|e| bad(e.to_string()))?;
        Ok(SqliteStore {
            db,
            db_name: name.clone(),
        })
    }
}

impl MetadataStore for SqliteStore {
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error> {
        let mut stmt = self
            .db
            .prepare_cached(
                "SELECT image_id, size, hits, last_accessed, last_modified FROM cached_images",
            )
            .map_err(db_error)?;
        let mut rows = stmt.query([]).map_err(db_error)?;
        let mut recorded = id_map(ids.len());
        while let Some(row) = rows.next().map_err(db_error)? {
            let (Ok(id), Ok(size), Ok(hits), Ok(accessed), Ok(modified)) = (
                row.get_ref(0).map(|v| v.as_str().ok()),
                row.get_ref(1),
                row.get_ref(2),
                row.get_ref(3),
                row.get_ref(4),
            ) else {
                continue;
            };
            // A row without usable times is left out: the driver then asks
            // the file.
            if let (Some(id), Some(last_accessed), Some(last_modified)) =
                (id, time(accessed), time(modified))
            {
                let image = Image {
                    size: count(size),
                    hits: count(hits),
                    last_accessed,
                    last_modified,
                };
                recorded.insert(id.to_string(), image);
            }
        }
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn records_sizes(&self) -> bool {
        true
    }

    fn sizes(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Error> {
        let mut stmt = self
            .db
            .prepare_cached("SELECT image_id, size FROM cached_images")
            .map_err(db_error)?;
        let mut rows = stmt.query([]).map_err(db_error)?;
        let mut recorded = id_map(ids.len());
        while let Some(row) = rows.next().map_err(db_error)? {
            if let (Ok(Some(id)), Ok(size)) =
                (row.get_ref(0).map(|v| v.as_str().ok()), row.get_ref(1))
            {
                recorded.insert(id.to_string(), count(size));
            }
        }
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn hits(&self, id: &str) -> Result<u64, Error> {
        let hits = self
            .db
            .prepare_cached("SELECT hits FROM cached_images WHERE image_id = ?1")
            .and_then(|mut s| s.query_row([id], |r| Ok(count(r.get_ref(0)?))).optional())
            .map_err(db_error)?;
        Ok(hits.unwrap_or(0))
    }

    fn checksum(&self, id: &str, _file: &driver_common::fs::File) -> Result<Option<String>, Error> {
        let checksum: Option<Option<String>> = self
            .db
            .prepare_cached("SELECT checksum FROM cached_images WHERE image_id = ?1")
            .and_then(|mut s| {
                s.query_row([id], |r| {
                    Ok(r.get_ref(0)?.as_str().ok().map(str::to_string))
                })
                .optional()
            })
            .map_err(db_error)?;
        Ok(checksum.flatten().filter(|c| !c.is_empty()))
    }

    fn record_commit(
        &self,
        id: &str,
        _path: &str,
        size: u64,
        checksum: Option<&str>,
        now: f64,
    ) -> Result<(), Error> {
        self.db
            .execute(
                "INSERT OR REPLACE INTO cached_images \
                 (image_id, last_accessed, last_modified, size, hits, checksum) \
                 VALUES (?1, ?2, ?2, ?3, 0, ?4)",
                params![id, now, size.min(i64::MAX as u64) as i64, checksum],
            )
            .map_err(db_error)?;
        Ok(())
    }

    fn record_read(
        &self,
        id: &str,
        _file: &driver_common::fs::File,
        now: f64,
    ) -> Result<(), Error> {
        self.bump(id, now).map(|_| ())
    }

    fn record_reads(&self, layout: &Layout, reads: &[ReadRecord]) -> Result<u64, Error> {
        // One transaction for the batch: one journal commit for many hits.
        let mut recorded = 0;
        self.transaction(|| {
            for read in reads {
                if layout.is_image_name(&read.image_id)
                    && self.bump(&read.image_id, read.accessed)?
                {
                    recorded += 1;
                }
            }
            Ok(())
        })?;
        Ok(recorded)
    }

    fn record_abort(&self, id: &str, _reason: &str) -> Result<(), Error> {
        self.forget(&[id.to_string()])
    }

    fn forget(&self, ids: &[String]) -> Result<(), Error> {
        let delete = |id: &String| {
            self.db
                .prepare_cached("DELETE FROM cached_images WHERE image_id = ?1")
                .and_then(|mut s| s.execute([id]))
                .map(|_| ())
                .map_err(db_error)
        };
        match ids {
            [] => Ok(()),
            [id] => delete(id),
            _ => self.transaction(|| ids.iter().try_for_each(delete)),
        }
    }
}

type SqliteDriver = driver_common::Driver<SqliteStore>;
driver_common::bindings::export!(SqliteDriver with_types_in driver_common::bindings);
