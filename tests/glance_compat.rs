//! An existing Glance cache directory works unchanged, and what we write
//! stays readable by Glance: same layout, same `cached_images` table.

use image_cache::DriverSource;
use image_cache_tests::{files_in, image_bytes, open};
use rusqlite::Connection;

/// Glance's schema, as its sqlite driver creates it.
const GLANCE_SCHEMA: &str = "CREATE TABLE IF NOT EXISTS cached_images (
    image_id TEXT PRIMARY KEY,
    last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0,
    size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0,
    checksum TEXT
);";

/// A cache directory as Glance leaves it: three images with rows, its lock
/// file, staging directories.
fn glance_directory() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for sub in ["incomplete", "invalid", "queue"] {
        std::fs::create_dir(dir.path().join(sub)).unwrap();
    }
    std::fs::write(dir.path().join("image_cache_db_init"), b"").unwrap();
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    db.execute_batch(GLANCE_SCHEMA).unwrap();
    // (id, last_accessed, hits, size): "new" was read most recently,
    // "old" longest ago.
    for (id, accessed, hits, size) in [
        ("11111111-aaaa", 1_700_000_300.5, 7, 3000),
        ("22222222-bbbb", 1_700_000_100.25, 2, 2000),
        ("33333333-cccc", 1_700_000_200.0, 0, 1000),
    ] {
        std::fs::write(dir.path().join(id), image_bytes(hits as u8, size)).unwrap();
        db.execute(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits) VALUES (?, ?, ?, ?, ?)",
            rusqlite::params![id, accessed, 1_699_999_999.0, size as i64, hits],
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("queue").join("44444444-dddd"), b"").unwrap();
    dir
}

#[test]
fn glance_directory_lists_with_its_hits_and_times() {
    let dir = glance_directory();
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    let images = cache.get_cached_images().unwrap();
    let seen: Vec<_> = images
        .iter()
        .map(|i| (i.image_id.as_str(), i.hits, i.size, i.last_accessed))
        .collect();
    assert_eq!(
        seen,
        [
            ("11111111-aaaa", 7, 3000, 1_700_000_300.5),
            ("22222222-bbbb", 2, 2000, 1_700_000_100.25),
            ("33333333-cccc", 0, 1000, 1_700_000_200.0),
        ],
        "Glance's lock file and database are not images"
    );
    assert_eq!(images[0].last_modified, 1_699_999_999.0);
    assert_eq!(cache.get_cache_size().unwrap(), 6000);
    assert_eq!(cache.get_hit_count("11111111-aaaa").unwrap(), 7);
    assert_eq!(cache.get_queued_images().unwrap(), ["44444444-dddd"]);
}

#[test]
fn glance_directory_prunes_in_its_lru_order() {
    let dir = glance_directory();
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    let (lru, size) = cache.get_least_recently_accessed().unwrap().unwrap();
    assert_eq!((lru.as_str(), size), ("22222222-bbbb", 2000));
    let report = cache.prune(3000).unwrap();
    let removed: Vec<_> = report.removed.iter().map(|r| r.image_id.as_str()).collect();
    assert_eq!(removed, ["22222222-bbbb", "33333333-cccc"]);
    assert!(cache.is_cached("11111111-aaaa").unwrap());
    // The rows of evicted images are gone too.
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    let ids: Vec<String> = db
        .prepare("SELECT image_id FROM cached_images ORDER BY image_id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(ids, ["11111111-aaaa"]);
}

#[test]
fn what_we_write_glance_can_read() {
    let dir = glance_directory();
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    let sha: image_cache::Checksum = format!("md5:{}", md5_of(b"new image")).parse().unwrap();
    cache
        .cache_reader("55555555-eeee", Some(&sha), &b"new image"[..])
        .unwrap();
    let mut out = Vec::new();
    cache.read_image("11111111-aaaa", &mut out).unwrap();

    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    // The table is exactly Glance's: same columns, same order, same types.
    let columns: Vec<(String, String)> = db
        .prepare("PRAGMA table_info(cached_images)")
        .unwrap()
        .query_map([], |r| Ok((r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let expected = [
        ("image_id", "TEXT"),
        ("last_accessed", "REAL"),
        ("last_modified", "REAL"),
        ("size", "INTEGER"),
        ("hits", "INTEGER"),
        ("checksum", "TEXT"),
    ];
    assert_eq!(
        columns,
        expected.map(|(a, b)| (a.to_string(), b.to_string()))
    );

    let (hits, size, checksum, accessed, modified): (i64, i64, Option<String>, f64, f64) = db
        .query_row(
            "SELECT hits, size, checksum, last_accessed, last_modified FROM cached_images WHERE image_id = ?",
            ["55555555-eeee"],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
        )
        .unwrap();
    assert_eq!((hits, size), (0, 9));
    assert_eq!(checksum.as_deref(), Some(sha.to_string().as_str()));
    assert!(
        accessed > 1.7e9 && accessed == modified,
        "Unix seconds as float"
    );
    let hits: i64 = db
        .query_row(
            "SELECT hits FROM cached_images WHERE image_id = '11111111-aaaa'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 8);
    assert!(files_in(&dir.path().join("incomplete")).is_empty());
}

#[test]
fn files_without_rows_are_still_images() {
    // A crash between Glance's rename and its INSERT leaves a file with no row.
    let dir = glance_directory();
    std::fs::write(dir.path().join("66666666-ffff"), b"orphan").unwrap();
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    assert!(cache.is_cached("66666666-ffff").unwrap());
    assert_eq!(cache.get_hit_count("66666666-ffff").unwrap(), 0);
    let mut out = Vec::new();
    cache.read_image("66666666-ffff", &mut out).unwrap();
    assert_eq!(out, b"orphan");
    assert_eq!(
        cache.get_hit_count("66666666-ffff").unwrap(),
        1,
        "the read created its row"
    );
}

fn md5_of(data: &[u8]) -> String {
    let mut h = image_cache::checksum::Hasher::new(image_cache::checksum::Algorithm::Md5);
    h.update(data);
    h.finish()
}

/// Release 0.1's driver added an index on `last_accessed` that no query
/// used and every hit paid for: the driver drops it, keeps Glance's table
/// as it is, and still counts hits.
#[test]
fn the_index_of_release_0_1_is_dropped() {
    let dir = glance_directory();
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    db.execute_batch(
        "CREATE INDEX cached_images_last_accessed ON cached_images (last_accessed, image_id)",
    )
    .unwrap();
    let indexes = |db: &Connection| -> Vec<String> {
        let mut q = db
            .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(indexes(&db), ["cached_images_last_accessed"]);
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    cache.read_image("22222222-bbbb", std::io::sink()).unwrap();
    assert_eq!(indexes(&db), Vec::<String>::new());
    assert_eq!(cache.get_hit_count("22222222-bbbb").unwrap(), 3);
}

/// A database that release 0.2 of the driver switched to WAL: the driver
/// (SQLite inside it has no shared memory between processes) leaves WAL for
/// Glance's rollback journal on first open, losing no row.
#[test]
fn a_wal_database_of_release_0_2_is_left_for_a_rollback_journal() {
    let dir = glance_directory();
    {
        let db = Connection::open(dir.path().join("cache.db")).unwrap();
        let mode: String = db
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // A row only in the WAL, not checkpointed into the database, even
        // when the connection closes (as a crashed 0.2 host leaves it).
        db.execute_batch("PRAGMA wal_autocheckpoint=0").unwrap();
        db.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        db.execute(
            "UPDATE cached_images SET hits = 40 WHERE image_id = '22222222-bbbb'",
            [],
        )
        .unwrap();
    }
    assert!(dir.path().join("cache.db-wal").exists());
    let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
    assert_eq!(cache.get_hit_count("22222222-bbbb").unwrap(), 40);
    cache.read_image("22222222-bbbb", std::io::sink()).unwrap();
    assert_eq!(cache.get_hit_count("22222222-bbbb").unwrap(), 41);
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    let mode: String = db
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    assert!(!dir.path().join("cache.db-wal").exists());
}

/// What Glance's sqlite driver does to `cache.db`, in another process (a
/// native SQLite with POSIX locks): create the table, then commit images
/// and count hits of one shared image, each in its own transaction.
const GLANCE_WRITER: &str = r#"
import os, sqlite3, sys, time
root, n = sys.argv[1], int(sys.argv[2])
db = sqlite3.connect(os.path.join(root, "cache.db"), timeout=60, isolation_level=None)
db.execute("PRAGMA synchronous = NORMAL")
db.execute("PRAGMA temp_store = MEMORY")
db.executescript("""CREATE TABLE IF NOT EXISTS cached_images (
    image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0,
    last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0,
    hits INTEGER DEFAULT 0, checksum TEXT);""")
for i in range(n):
    now = time.time()
    db.execute("INSERT OR REPLACE INTO cached_images (image_id, last_accessed, last_modified, size, hits) VALUES (?, ?, ?, 1, 0)", ("glance-%d" % i, now, now))
    db.execute("INSERT OR IGNORE INTO cached_images (image_id, last_accessed, last_modified, size, hits) VALUES ('shared', ?, ?, 6, 0)", (now, now))
    db.execute("UPDATE cached_images SET hits = hits + 1, last_accessed = ? WHERE image_id = 'shared'", (now,))
print(db.execute("PRAGMA integrity_check").fetchone()[0])
"#;

/// Glance's processes and this driver write one new cache directory at the
/// same time, from its first open on: no start fails, no row or hit is
/// lost, and the database stays whole. (SQLite runs inside the driver; its
/// locks are native SQLite's byte ranges, taken as open-file-description
/// locks, which conflict with Glance's POSIX locks.)
#[test]
fn glance_and_this_driver_write_one_new_directory_at_once() {
    const N: usize = 60;
    for round in 0..4 {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("shared"), b"shared").unwrap();
        let glance = std::process::Command::new("python3")
            .args(["-c", GLANCE_WRITER])
            .arg(dir.path())
            .arg(N.to_string())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3 runs Glance's side");
        let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
        for i in 0..N {
            cache
                .cache_reader(&format!("ours-{i}"), None, &b"x"[..])
                .unwrap();
            cache.read_image("shared", std::io::sink()).unwrap();
        }
        let out = glance.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "round {round}: Glance's side failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
        let ids: Vec<String> = cache
            .get_cached_images()
            .unwrap()
            .into_iter()
            .map(|i| i.image_id)
            .collect();
        assert_eq!(
            ids.iter().filter(|i| i.starts_with("ours-")).count(),
            N,
            "round {round}"
        );
        assert_eq!(
            cache.get_hit_count("shared").unwrap(),
            2 * N as u64,
            "round {round}: every hit of both writers counted"
        );
        let db = Connection::open(dir.path().join("cache.db")).unwrap();
        let glance_rows: i64 = db
            .query_row(
                "SELECT count(*) FROM cached_images WHERE image_id LIKE 'glance-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(glance_rows, N as i64, "round {round}");
        let check: String = db
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(check, "ok");
    }
}

/// Something planted where SQLite inside the driver opens its journal (a
/// FIFO at `cache.db-journal`) fails the write at once; it never blocks the
/// host, and the database is not harmed.
#[test]
fn a_fifo_planted_as_the_journal_fails_at_once_and_harms_nothing() {
    let dir = glance_directory();
    let journal = std::ffi::CString::new(
        dir.path()
            .join("cache.db-journal")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(journal.as_ptr(), 0o600) }, 0);
    let started = std::time::Instant::now();
    let outcome = std::panic::catch_unwind(|| {
        let cache = open(dir.path(), &DriverSource::Builtin("sqlite"));
        cache.read_image("22222222-bbbb", std::io::sink())
    });
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "never blocked: {:?}",
        started.elapsed()
    );
    match outcome {
        Ok(Err(e)) => assert!(e.to_string().contains("database"), "{e}"),
        Ok(Ok(_)) => panic!("a write through a FIFO journal succeeded"),
        Err(_) => {} // opening the cache itself failed, promptly
    }
    std::fs::remove_file(dir.path().join("cache.db-journal")).unwrap();
    let db = Connection::open(dir.path().join("cache.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let hits: i64 = db
        .query_row(
            "SELECT hits FROM cached_images WHERE image_id = '22222222-bbbb'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(hits, 2, "the failed hit left the row as it was");
}
