//! The centralized driver: every node's cache metadata in one shared
//! PostgreSQL database, in Glance's own tables (its `centralized_db`
//! driver).
//!
//! The files are this node's root, handled by `driver_common` as for every
//! driver; hits and times live in Glance's `cached_images`, one row per
//! image and node, the node being the row of `node_reference` named by
//! this node's `worker_self_reference_url`. The database is opened by the
//! name `glance` through the host's `database` import: the host maps it to
//! the configured URL, and this driver never sees where it is or how to
//! log in.
//!
//! Listing, LRU, pruning and deleting act on this node's rows only, as
//! Glance does; `get-cached-nodes` reads every node's. Files and rows are
//! reconciled as the sqlite driver does: a file without a row is an image
//! with no hits (its row is made on its first read), a row without a file
//! is not listed (and `clean` drops it), and for this node the files decide
//! what `get-cached-nodes` says.
//!
//! Glance's `image_id` column is `VARCHAR(36)` (UUIDs). An id longer than
//! that is cached and served like any other, but gets no row: its hits are
//! not counted and other nodes do not see it.

use std::cell::Cell;
use std::collections::HashSet;

use driver_common::database::{Connection, DatabaseError, ErrorCode, Value};
use driver_common::values::{as_u64, first_text, image_rows, size_rows, text};
use driver_common::{
    Backend, DriverInfo, Error, FORGET_MISSING_AFTER, IdMap, Image, Layout, MetadataStore, Options,
    now,
};

/// The name the host maps to the configured database.
pub const DATABASE: &str = "glance";
/// Glance's option naming this node.
pub const NODE_OPTION: &str = "worker_self_reference_url";
/// Glance's `image_id VARCHAR(36)` and `node_reference_url VARCHAR(255)`.
const MAX_ID_CHARS: usize = 36;
const MAX_URL_CHARS: usize = 255;
/// Ids per `IN (...)` list when many rows go at once.
const BATCH: usize = 1000;

/// Glance's tables, which its migrations own: the driver never creates
/// them (its role may not), it checks they are there.
const TABLES: [&str; 2] = ["node_reference", "cached_images"];

pub struct CentralizedStore {
    /// The sqlite driver's database name, never an image (see `Layout`).
    sqlite_db: String,
    node_id: Cell<i64>,
}

fn db_error(e: DatabaseError) -> Error {
    Error::Database(e.message)
}

/// Whether Glance's schema can hold a row for `id`.
fn recordable(id: &str) -> bool {
    id.chars().count() <= MAX_ID_CHARS
}

/// Glance's `checksum` column holds an MD5 hex digest; other digests are
/// not kept.
fn md5_hex(checksum: Option<&str>) -> Value {
    let hex = match checksum {
        Some(c) => c.strip_prefix("md5:").unwrap_or(c),
        None => return Value::Null,
    };
    if hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        text(&hex.to_ascii_lowercase())
    } else {
        Value::Null
    }
}

/// `$from, $from+1, ...` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl CentralizedStore {
    fn db(&self) -> Result<Connection, Error> {
        Connection::open(DATABASE).map_err(db_error)
    }

    fn node(&self) -> Value {
        Value::Integer(self.node_id.get())
    }

    /// This node's row in `node_reference`, made if missing (Glance's
    /// `node_reference_create` on start).
    fn register(db: &Connection, url: &str) -> Result<i64, DatabaseError> {
        db.execute(
            "INSERT INTO node_reference (node_reference_url) VALUES ($1) \
             ON CONFLICT (node_reference_url) DO NOTHING",
            &[text(url)],
        )?;
        let rows = db.query(
            "SELECT node_reference_id FROM node_reference WHERE node_reference_url = $1",
            &[text(url)],
        )?;
        match rows.first().and_then(|r| r.first()) {
            Some(Value::Integer(id)) => Ok(*id),
            _ => Err(DatabaseError {
                code: ErrorCode::Other,
                message: "this node's row in node_reference vanished while it was made".into(),
            }),
        }
    }

    /// Glance's tables are there (its `glance-manage db sync` made them,
    /// or `image-cache db init` for a database of the cache's own).
    fn check_schema(db: &Connection) -> Result<(), Error> {
        for table in TABLES {
            if let Err(e) = db.query(&format!("SELECT 1 FROM {table} LIMIT 0"), &[]) {
                if e.code == ErrorCode::Unavailable {
                    return Err(Error::Database(format!(
                        "the database {DATABASE:?} cannot be reached: {}",
                        e.message
                    )));
                }
                let missing = e.message.contains("42P01");
                return Err(Error::BadConfiguration(if missing {
                    format!(
                        "Glance's table {table} is missing from the database {DATABASE:?}: run \
                         `glance-manage db sync` (or, for a database of the cache's own, \
                         `image-cache db init`); the driver never creates Glance's tables"
                    )
                } else {
                    format!("cannot use the database {DATABASE:?}: {}", e.message)
                }));
            }
        }
        Ok(())
    }

    /// Every row of this node: id -> (size, hits, accessed, modified).
    fn rows(&self) -> Result<IdMap<Image>, Error> {
        let rows = self
            .db()?
            .query(
                "SELECT image_id, size, hits, last_accessed, last_modified \
                 FROM cached_images WHERE node_reference_id = $1",
                &[self.node()],
            )
            .map_err(db_error)?;
        Ok(image_rows(rows))
    }

    /// Delete this node's rows of `ids`, in batches, in one transaction.
    fn delete_rows(&self, ids: &[&str]) -> Result<u64, Error> {
        let ids: Vec<&str> = ids.iter().copied().filter(|id| recordable(id)).collect();
        if ids.is_empty() {
            return Ok(0);
        }
        let db = self.db()?;
        let delete = |chunk: &[&str]| -> Result<u64, Error> {
            let sql = format!(
                "DELETE FROM cached_images WHERE node_reference_id = $1 AND image_id IN ({})",
                placeholders(2, chunk.len())
            );
            let mut params = vec![self.node()];
            params.extend(chunk.iter().map(|id| text(id)));
            db.execute(&sql, &params).map_err(db_error)
        };
        if ids.len() <= BATCH {
            return delete(&ids);
        }
        db.execute("BEGIN", &[]).map_err(db_error)?;
        let mut deleted = 0;
        for chunk in ids.chunks(BATCH) {
            match delete(chunk) {
                Ok(n) => deleted += n,
                Err(e) => {
                    let _ = db.execute("ROLLBACK", &[]);
                    return Err(e);
                }
            }
        }
        db.execute("COMMIT", &[]).map_err(db_error)?;
        Ok(deleted)
    }
}

driver_common::driver_info!(
    "centralized",
    "every node's hits and access times in Glance's cached_images and node_reference tables, in a shared PostgreSQL database"
);

impl Backend for CentralizedStore {
    fn info() -> DriverInfo {
        driver_common::parse_info(DRIVER_INFO)
    }

    fn open(options: &Options) -> Result<Self, Error> {
        let node_url = options.get(NODE_OPTION).unwrap_or("").trim().to_string();
        if node_url.is_empty() {
            return Err(Error::BadConfiguration(format!(
                "{NODE_OPTION} is not set: the centralized driver names this node by it in the \
                 shared database (Glance's option, e.g. http://glance-api-1:9292)"
            )));
        }
        if node_url.chars().count() > MAX_URL_CHARS || node_url.chars().any(char::is_control) {
            return Err(Error::BadConfiguration(format!(
                "{NODE_OPTION} must be at most {MAX_URL_CHARS} characters without control characters"
            )));
        }
        // Down or unreachable now is not a configuration to fix: a
        // `database` error, which a server may start with and retry.
        let bad = |e: DatabaseError| match e.code {
            ErrorCode::Unavailable => Error::Database(format!(
                "the database {DATABASE:?} cannot be reached: {}",
                e.message
            )),
            _ => Error::BadConfiguration(format!(
                "cannot use the database {DATABASE:?}: {}",
                e.message
            )),
        };
        let db = Connection::open(DATABASE).map_err(bad)?;
        Self::check_schema(&db)?;
        let node_id = Self::register(&db, &node_url).map_err(bad)?;
        Ok(CentralizedStore {
            sqlite_db: options.sqlite_db.clone(),
            node_id: Cell::new(node_id),
        })
    }
}

impl MetadataStore for CentralizedStore {
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error> {
        let recorded = self.rows()?;
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn sizes(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Error> {
        let rows = self
            .db()?
            .query(
                "SELECT image_id, size FROM cached_images WHERE node_reference_id = $1",
                &[self.node()],
            )
            .map_err(db_error)?;
        let recorded = size_rows(rows);
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn hits(&self, id: &str) -> Result<u64, Error> {
        if !recordable(id) {
            return Ok(0);
        }
        let rows = self
            .db()?
            .query(
                "SELECT hits FROM cached_images WHERE image_id = $1 AND node_reference_id = $2",
                &[text(id), self.node()],
            )
            .map_err(db_error)?;
        Ok(rows
            .first()
            .and_then(|r| r.first())
            .map(as_u64)
            .unwrap_or(0))
    }

    fn checksum(&self, id: &str, _file: &driver_common::fs::File) -> Result<Option<String>, Error> {
        if !recordable(id) {
            return Ok(None);
        }
        let rows = self
            .db()?
            .query(
                "SELECT checksum FROM cached_images WHERE image_id = $1 AND node_reference_id = $2",
                &[text(id), self.node()],
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
        if !recordable(id) {
            return Ok(());
        }
        // Glance's insert_cache_details. Glance ignores a duplicate; a row
        // left by an earlier copy of the image (its file since removed by
        // hand) keeps its hits and last access here too, and takes the new
        // copy's size, checksum and time, so it describes the file.
        self.db()?
            .execute(
                "INSERT INTO cached_images \
                 (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) \
                 VALUES ($1, $2, $2, $3, 0, $4, $5) \
                 ON CONFLICT (image_id, node_reference_id) DO UPDATE SET \
                 last_modified = EXCLUDED.last_modified, \
                 size = EXCLUDED.size, checksum = EXCLUDED.checksum",
                &[
                    text(id),
                    Value::Real(now),
                    Value::Integer(size as i64),
                    md5_hex(checksum),
                    self.node(),
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
        if !recordable(id) {
            return Ok(());
        }
        let db = self.db()?;
        // One statement: the server serialises concurrent increments.
        let changed = db
            .execute(
                "UPDATE cached_images SET hits = hits + 1, last_accessed = $1 \
                 WHERE image_id = $2 AND node_reference_id = $3",
                &[Value::Real(now), text(id), self.node()],
            )
            .map_err(db_error)?;
        if changed == 0 {
            // A file with no row (copied in, or cached by another driver).
            let (size, modified) = match Layout::new(&self.sqlite_db).cached(id)? {
                Some(m) => (m.size, m.modified),
                None => return Ok(()),
            };
            db.execute(
                "INSERT INTO cached_images \
                 (image_id, last_accessed, last_modified, size, hits, node_reference_id) \
                 VALUES ($1, $2, $3, $4, 1, $5) \
                 ON CONFLICT (image_id, node_reference_id) DO UPDATE SET \
                 hits = cached_images.hits + 1, last_accessed = EXCLUDED.last_accessed",
                &[
                    text(id),
                    Value::Real(now),
                    Value::Real(modified),
                    Value::Integer(size as i64),
                    self.node(),
                ],
            )
            .map_err(db_error)?;
        }
        Ok(())
    }

    fn record_abort(&self, id: &str, _reason: &str) -> Result<(), Error> {
        self.forget(&[id.to_string()])
    }

    fn forget(&self, ids: &[String]) -> Result<(), Error> {
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        self.delete_rows(&ids).map(|_| ())
    }

    fn forget_missing(&self, present: &[String]) -> Result<u64, Error> {
        let present: HashSet<&str> = present.iter().map(String::as_str).collect();
        let settled = now() - FORGET_MISSING_AFTER;
        let recorded = self.rows()?;
        let gone: Vec<&str> = recorded
            .iter()
            .filter(|(id, image)| !present.contains(id.as_str()) && image.last_modified < settled)
            .map(|(id, _)| id.as_str())
            .collect();
        self.delete_rows(&gone)
    }

    /// Glance's answer: the nodes with a row, whichever node is asked (a
    /// file of this node without a row gets one on its first read).
    fn cached_nodes(&self, id: &str, _here: bool) -> Result<Vec<String>, Error> {
        let nodes: Vec<String> = if recordable(id) {
            self.db()?
                .query(
                    "SELECT n.node_reference_url FROM cached_images c \
                     JOIN node_reference n ON n.node_reference_id = c.node_reference_id \
                     WHERE c.image_id = $1 ORDER BY n.node_reference_url",
                    &[text(id)],
                )
                .map_err(db_error)?
                .into_iter()
                .filter_map(|row| match row.into_iter().next() {
                    Some(Value::Text(url)) => Some(url),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(nodes)
    }
}

type CentralizedDriver = driver_common::Driver<CentralizedStore>;
driver_common::bindings::export!(CentralizedDriver with_types_in driver_common::bindings);
