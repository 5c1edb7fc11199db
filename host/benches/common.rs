//! What the benchmarks share: the caches they open and how they are filled.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use image_cache::{CacheConfig, DriverSource, ImageCache, Runtime};

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An empty scratch directory: `BENCH_DIR`, or `target/<name>` (what a
/// run before left there is removed first).
pub fn fresh_scratch(name: &str) -> PathBuf {
    let dir = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("target")
                .join(name)
        });
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The id of the `i`th populated image.
pub fn id(i: usize) -> String {
    format!("{i:08}-0000-4000-8000-000000000000")
}

pub fn open(runtime: &Arc<Runtime>, root: &Path, driver: &str) -> ImageCache {
    let config = CacheConfig::new(root)
        .driver(DriverSource::Builtin(if driver == "sqlite" {
            "sqlite"
        } else {
            "xattr"
        }))
        .fallback_to_sqlite(false);
    ImageCache::with_runtime(runtime.clone(), config).unwrap()
}

/// `n` small cached images written straight to disk with their metadata,
/// as an existing cache would have them (distinct access times, oldest
/// first by index).
pub fn populate(root: &Path, driver: &str, n: usize, size: usize) {
    for sub in ["incomplete", "invalid", "queue"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    let data = vec![7u8; size];
    let base = 1_700_000_000.0;
    for i in 0..n {
        std::fs::write(root.join(id(i)), &data).unwrap();
    }
    if driver == "sqlite" {
        let mut db = rusqlite::Connection::open(root.join("cache.db")).unwrap();
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS cached_images (image_id TEXT PRIMARY KEY, last_accessed REAL DEFAULT 0.0, \
             last_modified REAL DEFAULT 0.0, size INTEGER DEFAULT 0, hits INTEGER DEFAULT 0, checksum TEXT);",
        )
        .unwrap();
        let tx = db.transaction().unwrap();
        for i in 0..n {
            tx.execute(
                "INSERT INTO cached_images VALUES (?, ?, ?, ?, 0, NULL)",
                rusqlite::params![id(i), base + i as f64, base, size as i64],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    } else {
        for i in 0..n {
            let path = root.join(id(i));
            xattr::set(&path, "user.hits", b"0").unwrap();
            let t = SystemTime::UNIX_EPOCH + Duration::from_secs_f64(base + i as f64);
            let f = std::fs::File::options().write(true).open(&path).unwrap();
            f.set_times(std::fs::FileTimes::new().set_accessed(t).set_modified(t))
                .unwrap();
        }
    }
}
