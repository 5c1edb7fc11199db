//! The centralized driver: every node's cache metadata in one shared
//! PostgreSQL, MySQL or MariaDB database, in Glance's own tables (its
//! `centralized_db` driver).
//!
//! The files are this node's root, handled by `driver_common` as for every
//! driver; hits and times live in Glance's `cached_images`, one row per
//! image and node, the node being the row of `node_reference` named by
//! this node's `worker_self_reference_url`. The database is opened by the
//! name `glance` through the host's `database` import: the host maps it to
//! the configured URL, and this driver never sees where it is or how to
//! log in. The connection says which SQL the server speaks; the statements
//! below are written once, with [`Sql`] filling in what differs
//! (parameters, upserts, times).
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

use driver_common::database::{Connection, DatabaseError, Dialect, ErrorCode, Value};
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
    /// The SQL the database speaks.
    sql: Sql,
}

fn db_error(e: DatabaseError) -> Error {
    Error::Database(e.message)
}

/// Why the database cannot be used at configure. Down or unreachable now
/// is not a configuration to fix: a `database` error, which a server may
/// start with and retry; a role without its grants says which to give.
fn unusable(e: DatabaseError) -> Error {
    match e.code {
        ErrorCode::Unavailable => Error::Database(format!(
            "the database {DATABASE:?} cannot be reached: {}",
            e.message
        )),
        ErrorCode::AccessDenied if !e.message.contains("image-cache db grants") => {
            Error::BadConfiguration(format!(
                "cannot use the database {DATABASE:?}: {} (the driver's role needs SELECT, INSERT, \
             UPDATE, DELETE on Glance's cache tables, as `image-cache db grants` prints them)",
                e.message
            ))
        }
        _ => Error::BadConfiguration(format!(
            "cannot use the database {DATABASE:?}: {}",
            e.message
        )),
    }
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

/// What differs between the two SQL dialects, for statements written once.
#[derive(Clone, Copy)]
struct Sql(Dialect);

impl Sql {
    /// Parameter `n` (1-based): `$n`, or `?` (MySQL numbers by position,
    /// so each statement below uses its parameters in order, once each).
    fn p(self, n: usize) -> String {
        match self.0 {
            Dialect::Postgresql => format!("${n}"),
            Dialect::Mysql => "?".to_string(),
        }
    }

    /// Parameter `n` as a time given in Unix seconds. Glance's `DATETIME`
    /// columns keep whole seconds on MySQL: the fraction is dropped here,
    /// as MariaDB does (MySQL would round it).
    fn time(self, n: usize) -> String {
        match self.0 {
            Dialect::Postgresql => format!("${n}"),
            Dialect::Mysql => "FROM_UNIXTIME(FLOOR(?))".to_string(),
        }
    }

    /// `n` parameters from `from` on, comma-separated.
    fn list(self, from: usize, n: usize) -> String {
        (from..from + n)
            .map(|i| self.p(i))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// An insert's ending that, on a duplicate of the unique `key`, sets
    /// each column to the value the insert would have written
    /// (`hits_plus_one` also adds one to the row's hits).
    fn on_duplicate(self, key: &str, columns: &[&str], hits_plus_one: bool) -> String {
        let mut sets: Vec<String> = match self.0 {
            Dialect::Postgresql => columns
                .iter()
                .map(|c| format!("{c} = EXCLUDED.{c}"))
                .collect(),
            Dialect::Mysql => columns
                .iter()
                .map(|c| format!("{c} = VALUES({c})"))
                .collect(),
        };
        if hits_plus_one {
            sets.push(match self.0 {
                Dialect::Postgresql => "hits = cached_images.hits + 1".to_string(),
                Dialect::Mysql => "hits = hits + 1".to_string(),
            });
        }
        match self.0 {
            Dialect::Postgresql => {
                format!(" ON CONFLICT ({key}) DO UPDATE SET {}", sets.join(", "))
            }
            Dialect::Mysql => format!(" ON DUPLICATE KEY UPDATE {}", sets.join(", ")),
        }
    }

    /// Whether an error says a table does not exist (PostgreSQL's 42P01,
    /// MySQL's 42S02).
    fn missing_table(self, e: &DatabaseError) -> bool {
        e.message.contains("42P01") || e.message.contains("42S02")
    }
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
    fn register(db: &Connection, sql: Sql, url: &str) -> Result<i64, DatabaseError> {
        let ignore_duplicate = match sql.0 {
            Dialect::Postgresql => " ON CONFLICT (node_reference_url) DO NOTHING",
            Dialect::Mysql => " ON DUPLICATE KEY UPDATE node_reference_id = node_reference_id",
        };
        db.execute(
            &format!(
                "INSERT INTO node_reference (node_reference_url) VALUES ({}){ignore_duplicate}",
                sql.p(1)
            ),
            &[text(url)],
        )?;
        let rows = db.query(
            &format!(
                "SELECT node_reference_id FROM node_reference WHERE node_reference_url = {}",
                sql.p(1)
            ),
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
    fn check_schema(db: &Connection, sql: Sql) -> Result<(), Error> {
        for table in TABLES {
            if let Err(e) = db.query(&format!("SELECT 1 FROM {table} LIMIT 0"), &[]) {
                if sql.missing_table(&e) {
                    return Err(Error::BadConfiguration(format!(
                        "Glance's table {table} is missing from the database {DATABASE:?}: run \
                         `glance-manage db sync` (or, for a database of the cache's own, \
                         `image-cache db init`); the driver never creates Glance's tables"
                    )));
                }
                return Err(unusable(e));
            }
        }
        Ok(())
    }

    /// Every row of this node: id -> (size, hits, accessed, modified).
    fn rows(&self) -> Result<IdMap<Image>, Error> {
        let rows = self
            .db()?
            .query(
                &format!(
                    "SELECT image_id, size, hits, last_accessed, last_modified \
                     FROM cached_images WHERE node_reference_id = {}",
                    self.sql.p(1)
                ),
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
            // On MySQL, by Glance's unique index: InnoDB locks every row a
            // DELETE scans, and on a small table the optimizer would scan
            // them all, waiting on rows another session holds that this
            // delete does not touch.
            let from = match self.sql.0 {
                Dialect::Postgresql => "DELETE FROM cached_images",
                Dialect::Mysql => {
                    "DELETE c FROM cached_images c \
                     FORCE INDEX (ix_cached_images_image_id_node_reference_id)"
                }
            };
            let sql = format!(
                "{from} WHERE node_reference_id = {} AND image_id IN ({})",
                self.sql.p(1),
                self.sql.list(2, chunk.len())
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
    "every node's hits and access times in Glance's cached_images and node_reference tables, in a shared PostgreSQL, MySQL or MariaDB database"
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
        let db = Connection::open(DATABASE).map_err(unusable)?;
        let sql = Sql(db.dialect());
        Self::check_schema(&db, sql)?;
        let node_id = Self::register(&db, sql, &node_url).map_err(unusable)?;
        Ok(CentralizedStore {
            sqlite_db: options.sqlite_db.clone(),
            node_id: Cell::new(node_id),
            sql,
        })
    }
}

impl MetadataStore for CentralizedStore {
    fn images(&self, ids: &[String]) -> Result<Vec<Option<Image>>, Error> {
        let recorded = self.rows()?;
        Ok(ids.iter().map(|id| recorded.get(id).copied()).collect())
    }

    fn records_sizes(&self) -> bool {
        true
    }

    fn sizes(&self, ids: &[String]) -> Result<Vec<Option<u64>>, Error> {
        let rows = self
            .db()?
            .query(
                &format!(
                    "SELECT image_id, size FROM cached_images WHERE node_reference_id = {}",
                    self.sql.p(1)
                ),
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
                &format!(
                    "SELECT hits FROM cached_images WHERE image_id = {} AND node_reference_id = {}",
                    self.sql.p(1),
                    self.sql.p(2)
                ),
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
                &format!(
                    "SELECT checksum FROM cached_images WHERE image_id = {} \
                     AND node_reference_id = {}",
                    self.sql.p(1),
                    self.sql.p(2)
                ),
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
        let q = self.sql;
        self.db()?
            .execute(
                &format!(
                    "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, \
                     hits, checksum, node_reference_id) VALUES ({}, {}, {}, {}, 0, {}, {}){}",
                    q.p(1),
                    q.time(2),
                    q.time(3),
                    q.p(4),
                    q.p(5),
                    q.p(6),
                    q.on_duplicate(
                        "image_id, node_reference_id",
                        &["last_modified", "size", "checksum"],
                        false
                    )
                ),
                &[
                    text(id),
                    Value::Real(now),
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
        let q = self.sql;
        // One statement: the server serialises concurrent increments.
        let changed = db
            .execute(
                &format!(
                    "UPDATE cached_images SET hits = hits + 1, last_accessed = {} \
                     WHERE image_id = {} AND node_reference_id = {}",
                    q.time(1),
                    q.p(2),
                    q.p(3)
                ),
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
                &format!(
                    "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, \
                     hits, node_reference_id) VALUES ({}, {}, {}, {}, 1, {}){}",
                    q.p(1),
                    q.time(2),
                    q.time(3),
                    q.p(4),
                    q.p(5),
                    q.on_duplicate("image_id, node_reference_id", &["last_accessed"], true)
                ),
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
                    &format!(
                        "SELECT n.node_reference_url FROM cached_images c \
                         JOIN node_reference n ON n.node_reference_id = c.node_reference_id \
                         WHERE c.image_id = {} ORDER BY n.node_reference_url",
                        self.sql.p(1)
                    ),
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
