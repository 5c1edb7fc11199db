//! The main job, end to end, as an application embedding the cache would
//! run it: open a cache (built-in sqlite driver by default), cache a file
//! with a checksum, list, read it back, prune, then swap the driver at
//! runtime and keep going.
//!
//! ```text
//! cargo run -p image-cache --example demo [-- ROOT [DRIVER]]
//! ```
//!
//! ROOT defaults to a fresh temporary directory; DRIVER to `sqlite`.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use image_cache::checksum::{Algorithm, Hasher};
use image_cache::{CacheConfig, Checksum, DriverSource, ImageCache};

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let temp;
    let root = match args.next() {
        Some(dir) => std::path::PathBuf::from(dir),
        None => {
            temp = tempfile::tempdir()?;
            temp.path().to_path_buf()
        }
    };
    let driver = DriverSource::parse(&args.next().unwrap_or_else(|| "sqlite".into()));

    let started = Instant::now();
    let cache = ImageCache::open(CacheConfig::new(&root).driver(driver))?;
    let info = cache.driver().info().clone();
    println!(
        "cache root {} with driver {} {} ({:?} to start)",
        root.display(),
        info.name,
        info.version,
        started.elapsed()
    );

    // An image file to cache: 64 MiB of a pattern, with its sha256.
    let source = root.with_file_name(format!(
        "{}-source.img",
        root.file_name().unwrap_or_default().to_string_lossy()
    ));
    let image: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    std::fs::File::create(&source)?.write_all(&image)?;
    let mut hasher = Hasher::new(Algorithm::Sha256);
    hasher.update(&image);
    let checksum: Checksum = format!("sha256:{}", hasher.finish())
        .parse()
        .map_err(anyhow::Error::msg)?;

    let id = "6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e0001";
    let t = Instant::now();
    let bytes = cache
        .cache_file(id, &source, Some(&checksum))
        .context("caching the image")?;
    println!(
        "cached {id}: {bytes} bytes, {checksum} verified, in {:?}",
        t.elapsed()
    );
    for (i, size) in [(2, 1 << 20), (3, 2 << 20)] {
        let small = format!("6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e000{i}");
        cache.cache_reader(&small, None, &image[..size])?;
    }

    let t = Instant::now();
    let mut back = Vec::with_capacity(image.len());
    cache.read_image(id, &mut back)?;
    ensure!(
        back == image,
        "the image read back differs from the one cached"
    );
    println!("read it back byte-identical in {:?}", t.elapsed());

    list(&cache)?;
    let report = cache.prune(66 << 20)?;
    println!(
        "pruned to 66 MiB: {} images, {} bytes removed ({} bytes left)",
        report.removed.len(),
        report.bytes_removed,
        report.size_after
    );

    let t = Instant::now();
    let next = if info.name == "sqlite" {
        "xattr"
    } else {
        "sqlite"
    };
    match cache.swap_driver(&DriverSource::Builtin(next)) {
        Ok(()) => println!("swapped the driver to {next} in {:?}", t.elapsed()),
        Err(e) => println!("could not swap to {next} (kept {}): {e}", info.name),
    }
    ensure!(cache.is_cached(id)?, "the image survives the swap");
    list(&cache)?;
    let t = Instant::now();
    cache.rollback()?;
    println!(
        "rolled back to {} in {:?} (the previous driver was kept ready)",
        cache.driver().info().name,
        t.elapsed()
    );
    let clean = cache.clean(Duration::from_secs(86_400))?;
    println!(
        "clean: {} invalid, {} stalled files removed",
        clean.invalid.len(),
        clean.incomplete.len()
    );
    std::fs::remove_file(&source)?;
    Ok(())
}

fn list(cache: &ImageCache) -> Result<()> {
    println!("{:<40} {:>10} {:>5}", "image", "bytes", "hits");
    for image in cache.get_cached_images()? {
        println!(
            "{:<40} {:>10} {:>5}",
            image.image_id, image.size, image.hits
        );
    }
    println!("total {} bytes", cache.get_cache_size()?);
    Ok(())
}
