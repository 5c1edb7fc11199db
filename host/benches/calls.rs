//! Per-call costs through the public API, with their floors measured in
//! the same run, by divan (many samples; fastest, median, mean, slowest):
//!
//! ```text
//! cargo bench -p image-cache --bench calls
//! cargo bench -p image-cache --bench calls -- is_cached   # one group
//! ```
//!
//! Each group pairs the cache's call with what bounds it from below:
//! `is-cached` with one `statx` of the image file; caching a 4 KiB image
//! with one `fdatasync` of a new 4 KiB file (plus the rename that
//! publishes it); listing and cache size with one directory listing of the
//! same root. The caches hold `BENCH_META_N` images (10,000), written
//! straight to disk with their metadata as an existing cache would have
//! them (see `common::populate`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use divan::Bencher;
use image_cache::{ImageCache, Limits, Runtime};

#[path = "common.rs"]
mod common;

const DRIVERS: [&str; 2] = ["sqlite", "xattr"];

struct Fixture {
    root: PathBuf,
    cache: ImageCache,
    n: usize,
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::fresh_scratch("bench-calls"))
}

fn fixture(driver: &str) -> &'static Fixture {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    static SQLITE: OnceLock<Fixture> = OnceLock::new();
    static XATTR: OnceLock<Fixture> = OnceLock::new();
    let cell = if driver == "sqlite" { &SQLITE } else { &XATTR };
    cell.get_or_init(|| {
        let runtime = RUNTIME.get_or_init(|| {
            Runtime::new(Limits::default(), Some(scratch().join("artifacts"))).unwrap()
        });
        let n = common::env_usize("BENCH_META_N", 10_000);
        let root = scratch().join(driver);
        std::fs::create_dir_all(&root).unwrap();
        common::populate(&root, driver, n, 4096);
        let cache = common::open(runtime, &root, driver);
        Fixture { root, cache, n }
    })
}

fn main() {
    divan::main();
}

#[divan::bench_group(sample_count = 200, sample_size = 50)]
mod is_cached {
    use super::*;

    #[divan::bench(args = DRIVERS)]
    fn cache(bencher: Bencher, driver: &str) {
        let f = fixture(driver);
        let mut i = 0usize;
        bencher.bench_local(|| {
            i += 7;
            f.cache.is_cached(&common::id(i % f.n)).unwrap()
        });
    }

    /// The floor as the host makes it: one `statx` of the image file by
    /// its name, relative to the root's open directory (cap-std).
    #[divan::bench]
    fn baseline_statx_in_root(bencher: Bencher) {
        let f = fixture("sqlite");
        let root =
            cap_std::fs::Dir::open_ambient_dir(&f.root, cap_std::ambient_authority()).unwrap();
        let mut i = 0usize;
        bencher.bench_local(|| {
            i += 7;
            root.symlink_metadata(common::id(i % f.n))
                .unwrap()
                .is_file()
        });
    }

    /// One `statx` of the image file by its absolute path.
    #[divan::bench]
    fn baseline_statx(bencher: Bencher) {
        let f = fixture("sqlite");
        let mut i = 0usize;
        bencher.bench_local(|| {
            i += 7;
            std::fs::symlink_metadata(f.root.join(common::id(i % f.n)))
                .unwrap()
                .is_file()
        });
    }
}

#[divan::bench_group(sample_count = 30, sample_size = 1)]
mod list_cached {
    use super::*;

    #[divan::bench(args = DRIVERS)]
    fn cache(bencher: Bencher, driver: &str) {
        let f = fixture(driver);
        bencher.bench_local(|| f.cache.get_cached_images().unwrap().len());
    }

    /// The floor: the names of the root's files, one `readdir`.
    #[divan::bench]
    fn baseline_readdir(bencher: Bencher) {
        let f = fixture("sqlite");
        bencher.bench_local(|| std::fs::read_dir(&f.root).unwrap().count());
    }
}

#[divan::bench_group(sample_count = 30, sample_size = 1)]
mod cache_size {
    use super::*;

    #[divan::bench(args = DRIVERS)]
    fn cache(bencher: Bencher, driver: &str) {
        let f = fixture(driver);
        bencher.bench_local(|| f.cache.get_cache_size().unwrap());
    }

    /// Glance's way (what the xattr driver must do): `readdir` and a
    /// `statx` per file.
    #[divan::bench]
    fn baseline_readdir_statx(bencher: Bencher) {
        let f = fixture("sqlite");
        bencher.bench_local(|| {
            std::fs::read_dir(&f.root)
                .unwrap()
                .map(|e| e.unwrap().metadata().map_or(0, |m| m.len()))
                .sum::<u64>()
        });
    }
}

#[divan::bench_group(sample_count = 40, sample_size = 1)]
mod cache_4k {
    use super::*;

    #[divan::bench(args = DRIVERS)]
    fn cache(bencher: Bencher, driver: &str) {
        let f = fixture(driver);
        let mut i = 0usize;
        let data = [7u8; 4096];
        bencher.bench_local(|| {
            i += 1;
            let id = format!("w-{i}");
            f.cache.cache_reader(&id, None, &data[..]).unwrap();
        });
        // The other groups see the fixture as it was.
        for k in 1..=i {
            f.cache.delete_cached_image(&format!("w-{k}")).unwrap();
        }
    }

    /// The floor: a new 4 KiB file written, `fdatasync`ed and renamed
    /// into place in the same file system.
    #[divan::bench]
    fn baseline_write_fdatasync_rename(bencher: Bencher) {
        let f = fixture("sqlite");
        let dir = f.root.parent().unwrap().join("plain");
        std::fs::create_dir_all(&dir).unwrap();
        let mut i = 0usize;
        let data = [7u8; 4096];
        bencher.bench_local(|| {
            i += 1;
            let tmp = dir.join(format!("tmp-{i}"));
            let mut file = std::fs::File::create_new(&tmp).unwrap();
            file.write_all(&data).unwrap();
            file.sync_data().unwrap();
            std::fs::rename(&tmp, dir.join(format!("img-{i}"))).unwrap();
        });
    }
}
