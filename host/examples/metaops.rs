//! Per-call cost of the metadata operations through the sandbox, for
//! same-run comparisons between two builds (e.g. two releases):
//!
//! ```sh
//! cargo run --release -p image-cache --example metaops -- DIR [ROUNDS]
//! ```
//!
//! `DIR` is populated once (10,000 images of 16 bytes, with sqlite rows);
//! each round times every operation, and the best round is printed.
//! `METAOPS_ONLY=list` times only the operations whose names contain
//! `list` (for a profiler).
use std::path::Path;
use std::time::Instant;

use image_cache::{CacheConfig, DriverSource, ImageCache};

const N: usize = 10_000;

/// A named operation, how many calls a round makes, and one call.
type Op<'a> = (&'static str, usize, Box<dyn Fn(usize) + 'a>);

fn id(i: usize) -> String {
    format!("{:08}-0000-4000-8000-000000000000", i % N)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = args.next().expect("usage: metaops DIR [ROUNDS]");
    let rounds: usize = args.next().map_or(5, |r| r.parse().expect("ROUNDS"));
    let root = Path::new(&dir);
    let fresh = !root.exists();
    std::fs::create_dir_all(root).unwrap();
    let config = CacheConfig::new(root)
        .driver(DriverSource::Builtin("sqlite"))
        .fallback_to_sqlite(false);
    let cache = ImageCache::open(config).unwrap();
    if fresh {
        for i in 0..N {
            std::fs::write(root.join(id(i)), b"0123456789abcdef").unwrap();
        }
        let mut db = rusqlite::Connection::open(root.join("cache.db")).unwrap();
        let tx = db.transaction().unwrap();
        for i in 0..N {
            tx.execute(
                "INSERT OR REPLACE INTO cached_images VALUES (?, ?, ?, 16, 0, NULL)",
                rusqlite::params![id(i), 1.7e9 + i as f64, 1.7e9],
            )
            .unwrap();
        }
        tx.commit().unwrap();
    }
    let tag = std::process::id();
    let ops: Vec<Op> = vec![
        (
            "is-cached",
            20_000,
            Box::new(|i| assert!(cache.is_cached(&id(i * 7)).unwrap())),
        ),
        (
            "is-cached (miss)",
            20_000,
            Box::new(|i| assert!(!cache.is_cached(&format!("missing-{i}")).unwrap())),
        ),
        (
            "get-hit-count",
            20_000,
            Box::new(|i| {
                cache.get_hit_count(&id(i * 3)).unwrap();
            }),
        ),
        (
            "queue-image (new id)",
            1_000,
            Box::new(|i| assert!(cache.queue_image(&format!("q-{tag}-{i}")).unwrap())),
        ),
        (
            "queue-image (already cached)",
            20_000,
            Box::new(|i| assert!(!cache.queue_image(&id(i)).unwrap())),
        ),
        (
            "read a 16-byte image (open+read+finish)",
            5_000,
            Box::new(|i| {
                cache.read_image(&id(i * 11), std::io::sink()).unwrap();
            }),
        ),
        (
            "list cached images",
            20,
            Box::new(|_| {
                cache.get_cached_images().unwrap();
            }),
        ),
        (
            "cache size",
            20,
            Box::new(|_| {
                cache.get_cache_size().unwrap();
            }),
        ),
        (
            // Last: it adds images (removed at the end).
            "cache a 4 KiB image (fdatasync, commit)",
            200,
            Box::new(|i| {
                cache
                    .cache_reader(&format!("w-{tag}-{i}"), None, &[7u8; 4096][..])
                    .unwrap();
            }),
        ),
    ];
    let only = std::env::var("METAOPS_ONLY").unwrap_or_default();
    let ops: Vec<Op> = ops
        .into_iter()
        .filter(|(name, _, _)| name.contains(only.as_str()))
        .collect();
    let mut best = vec![f64::MAX; ops.len()];
    for round in 0..rounds {
        for (k, (_, calls, op)) in ops.iter().enumerate() {
            let t = Instant::now();
            for i in 0..*calls {
                op(i + round * calls);
            }
            best[k] = best[k].min(t.elapsed().as_secs_f64() * 1e6 / *calls as f64);
        }
    }
    cache.delete_all_queued_images().unwrap();
    for image in cache.get_cached_images().unwrap() {
        if image.image_id.starts_with("w-") {
            cache.delete_cached_image(&image.image_id).unwrap();
        }
    }
    for ((name, _, _), us) in ops.iter().zip(best) {
        println!("{name}\t{us:.2}");
    }
}
