//! The sqlite driver: metadata in Glance's `cached_images` table.
//!
//! The database is `cache.db` in the root (option `image_cache_sqlite_db`),
//! opened through the host's `sqlite` import. The table is exactly Glance's,
//! so an existing Glance cache directory works unchanged and Glance can read
//! what this driver writes; the driver only switches the database to WAL.
//! It keeps no index beside the primary key (as Glance): LRU order comes
//! from one scan, and an index on `last_accessed` made every hit write
//! three pages instead of one. Release 0.1 created one; it is dropped.

use driver_common::sqlite::{Connection, SqliteError, Value};
use driver_common::values::{as_u64, first_text, image_rows, size_rows, text};
use driver_common::{
    Backend, DriverInfo, Error, Image, Layout, MetadataStore, Options, ReadRecord,
};

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

pub struct SqliteStore {
    db: Connection,
    db_name: String,
}

fn db_error(e: SqliteError) -> Error {
    Error::Database(e.message)
}

impl SqliteStore {
    /// A read of `id` completed at `now`: hits + 1, last accessed `now`.
    /// False if the image has neither a row nor a file.
    fn bump(&self, id: &str, now: f64) -> Result<bool, Error> {
        // One statement: SQLite serialises it, so concurrent readers in
        // other instances never lose an increment.
        let changed = self
            .db
            .execute(
                "UPDATE cached_images SET hits = MIN(hits, 9223372036854775806) + 1, last_accessed = ? \
                 WHERE image_id = ?",
                &[Value::Real(now), text(id)],
            )
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
                 VALUES (?, ?, ?, ?, 1) \
                 ON CONFLICT(image_id) DO UPDATE SET hits = MIN(hits, 9223372036854775806) + 1, \
                 last_accessed = excluded.last_accessed",
                &[
                    text(id),
                    Value::Real(now),
                    Value::Real(meta.modified),
                    Value::Integer(meta.size as i64),
                ],
            )
            .map_err(db_error)?;
        Ok(true)
    }

    /// Run `body` in one write transaction, rolled back if it fails.
    fn transaction(&self, body: impl FnOnce() -> Result<(), Error>) -> Result<(), Error> {
        self.db.execute("BEGIN IMMEDIATE", &[]).map_err(db_error)?;
        match body() {
            Ok(()) => {
                self.db.execute("COMMIT", &[]).map_err(db_error)?;
                Ok(())
            }
            Err(e) => {
                let _ = self.db.execute("ROLLBACK", &[]);
                Err(e)
            }
        }
    }
}

impl Backend for SqliteStore {
    fn info() -> DriverInfo {
        DriverInfo {
            name: "sqlite".to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            description:
                "hits and access times in Glance's cached_images table (cache.db in the root)"
                    .to_string(),
        }
    }

    fn open(options: &Options) -> Result<Self, Error> {
        let name = &options.sqlite_db;
        let bad = |e: SqliteError| {
            Error::BadConfiguration(format!("cannot use the database {name}: {}", e.message))
        };
        let db = Connection::open(name).map_err(bad)?;
        // WAL lets readers go on while one instance writes; it is a property
        // of the file, which Glance's sqlite3 module reads as well.
        db.query("PRAGMA journal_mode=WAL", &[]).map_err(bad)?;
        // In WAL mode NORMAL never corrupts the database; a power cut may
        // lose the last hit counts, which a cache can afford.
        db.execute("PRAGMA synchronous=NORMAL", &[]).map_err(bad)?;
        db.execute_batch(SCHEMA).map_err(bad)?;
        Ok(SqliteStore {
            db,
            db_name: name.clone(),
        })
    }
}

impl MetadataStore for SqliteStore {
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error> {
        let rows = self
            .db
            .query(
                "SELECT image_id, size, hits, last_accessed, last_modified FROM cached_images",
                &[],
            )
            .map_err(db_error)?;
        let recorded = image_rows(rows);
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn sizes(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Error> {
        let rows = self
            .db
            .query("SELECT image_id, size FROM cached_images", &[])
            .map_err(db_error)?;
        let recorded = size_rows(rows);
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn hits(&self, id: &str) -> Result<u64, Error> {
        let rows = self
            .db
            .query(
                "SELECT hits FROM cached_images WHERE image_id = ?",
                &[text(id)],
            )
            .map_err(db_error)?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .map(as_u64)
            .unwrap_or(0))
    }

    fn checksum(&self, id: &str, _file: &driver_common::fs::File) -> Result<Option<String>, Error> {
        let rows = self
            .db
            .query(
                "SELECT checksum FROM cached_images WHERE image_id = ?",
                &[text(id)],
            )
            .map_err(db_error)?;
        Ok(first_text(&rows))
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
                 VALUES (?, ?, ?, ?, 0, ?)",
                &[
                    text(id),
                    Value::Real(now),
                    Value::Real(now),
                    Value::Integer(size as i64),
                    checksum.map(text).unwrap_or(Value::Null),
                ],
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
        // One transaction for the batch: one WAL commit for many hits.
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
                .execute("DELETE FROM cached_images WHERE image_id = ?", &[text(id)])
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
