// temporary profiling harness (not committed)
use image_cache::{CacheConfig, DriverSource, ImageCache};
use std::time::Instant;
fn main() {
    let root = std::path::Path::new("/tmp/hp/root");
    let fresh = !root.exists();
    std::fs::create_dir_all(root).unwrap();
    let config = CacheConfig::new(root)
        .driver(DriverSource::Builtin("sqlite"))
        .fallback_to_sqlite(false);
    let cache = ImageCache::open(config).unwrap();
    let data = vec![7u8; 16];
    let n = 10_000;
    if fresh {
        for i in 0..n {
            std::fs::write(
                root.join(format!("{i:08}-0000-4000-8000-000000000000")),
                &data,
            )
            .unwrap();
        }
    }
    if fresh {
        let mut db = rusqlite::Connection::open(root.join("cache.db")).unwrap();
        let tx = db.transaction().unwrap();
        for i in 0..n {
            tx.execute(
                "INSERT OR REPLACE INTO cached_images VALUES (?, ?, ?, ?, 0, NULL)",
                rusqlite::params![
                    format!("{i:08}-0000-4000-8000-000000000000"),
                    1.7e9 + i as f64,
                    1.7e9,
                    16i64
                ],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let what = std::env::args().nth(1).unwrap_or_default();
    let iters: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(200000);
    let t = Instant::now();
    for i in 0..iters {
        match what.as_str() {
            "list" => {
                cache.get_cached_images().unwrap();
            }
            "size" => {
                cache.get_cache_size().unwrap();
            }
            _ => {
                assert!(
                    cache
                        .is_cached(&format!("{:08}-0000-4000-8000-000000000000", i % n))
                        .unwrap()
                );
            }
        }
    }
    println!(
        "{what}: {:.3} us/op",
        t.elapsed().as_secs_f64() * 1e6 / iters as f64
    );
}
