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
