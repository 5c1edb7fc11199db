//! The runtime as an embedding application sees it: a `Send + Sync` handle
//! used from many threads, compiled components reused across restarts, and
//! drivers swapped while requests are in flight.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use image_cache::{CacheConfig, DriverSource, Error, ImageCache, Limits, Runtime, XattrSupport};
use image_cache_tests::{bad_configuration, files_in, image_bytes, runtime};

#[test]
fn the_cache_handle_is_send_and_sync() {
    fn shareable<T: Send + Sync>() {}
    shareable::<ImageCache>();
    shareable::<Runtime>();
}

#[test]
fn a_call_made_without_waiting_gives_way_to_a_lock_held_elsewhere() {
    // The sqlite driver reads a checksum from cache.db; another process
    // holds cache.db's exclusive lock. Made without waiting, the call
    // says it wanted to wait instead of waiting (an event loop asks again
    // off its thread); made as usual, it waits for the lock and succeeds.
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::open(CacheConfig::new(dir.path())).unwrap();
    use image_cache::checksum::{Algorithm, Checksum, Hasher};
    let bytes = image_bytes(9, 4096);
    let mut md5 = Hasher::new(Algorithm::Md5);
    md5.update(&bytes);
    let expected: Checksum = format!("md5:{}", md5.finish()).parse().unwrap();
    cache
        .cache_reader("img", Some(&expected), &bytes[..])
        .unwrap();
    let checksum = || -> Result<Option<String>, Error> {
        let mut reader = cache.open_for_read("img")?;
        reader.checksum()
    };
    let recorded = cache
        .without_waiting(checksum)
        .expect("nothing held: answered at once")
        .unwrap();
    assert!(recorded.is_some(), "the commit recorded the checksum");
    let native = rusqlite::Connection::open(dir.path().join("cache.db")).unwrap();
    native.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert!(
        cache.without_waiting(checksum).is_none(),
        "the lock is held elsewhere: the call gave way"
    );
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        native.execute_batch("COMMIT").unwrap();
    });
    assert_eq!(checksum().unwrap(), recorded, "waited for it");
    holder.join().unwrap();
}

#[test]
fn a_prune_too_long_for_one_call_takes_several_and_reports_them_as_one() {
    // Each driver call evicts for `image_cache_evict_seconds` at most (10 s
    // by default, inside the 30 s call deadline) and returns what it
    // removed; the host calls again while the cache is over the size. With
    // 0 s every call takes one batch (100 images): 250 images go in three
    // calls, reported together, least recently accessed first.
    for driver in ["sqlite", "xattr"] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = CacheConfig::new(dir.path()).driver(DriverSource::Builtin(driver));
        config
            .driver_options
            .push(("image_cache_evict_seconds".into(), "0".into()));
        let cache = match ImageCache::with_runtime(runtime(), config) {
            Ok(c) => c,
            Err(e) if driver == "xattr" => {
                eprintln!("skipped xattr: {e}");
                continue;
            }
            Err(e) => panic!("{e}"),
        };
        for i in 0..250 {
            cache
                .cache_reader(&format!("img-{i:03}"), None, &b"0123456789"[..])
                .unwrap();
        }
        let report = cache.prune(0).unwrap();
        assert_eq!(report.removed.len(), 250, "{driver}: {:?}", report.failures);
        assert_eq!(report.bytes_removed, 2500);
        assert_eq!(report.size_after, 0);
        let removed: Vec<&str> = report.removed.iter().map(|r| r.image_id.as_str()).collect();
        let mut sorted = removed.clone();
        sorted.sort();
        assert_eq!(removed, sorted, "{driver}: least recently accessed first");
        assert!(cache.get_cached_images().unwrap().is_empty());
        for i in 0..120 {
            cache
                .cache_reader(&format!("again-{i:03}"), None, &b"x"[..])
                .unwrap();
        }
        assert_eq!(cache.delete_all_cached_images().unwrap(), 120, "{driver}");
        assert!(cache.get_cached_images().unwrap().is_empty());
    }
    // A budget that is not a number of seconds is refused.
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path());
    config
        .driver_options
        .push(("image_cache_evict_seconds".into(), "soon".into()));
    let e = match ImageCache::with_runtime(runtime(), config) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a budget of \"soon\" was taken"),
    };
    assert!(
        e.contains("image_cache_evict_seconds must be a number"),
        "{e}"
    );
}

#[test]
fn a_restart_reuses_compiled_artifacts() {
    let artifacts = tempfile::tempdir().unwrap();
    let first = Runtime::new(Limits::default(), Some(artifacts.path().to_path_buf())).unwrap();
    let component = first
        .component(&DriverSource::Builtin("sqlite"), &Default::default())
        .unwrap();
    assert!(!component.was_precompiled());
    assert_eq!(first.stats.compiled.load(Ordering::Relaxed), 1);
    // The same process asks again: nothing is loaded twice.
    first
        .component(&DriverSource::Builtin("sqlite"), &Default::default())
        .unwrap();
    assert_eq!(first.stats.compiled.load(Ordering::Relaxed), 1);
    drop(first);

    // "Restart": a new engine with the same artifact directory.
    let second = Runtime::new(Limits::default(), Some(artifacts.path().to_path_buf())).unwrap();
    let component = second
        .component(&DriverSource::Builtin("sqlite"), &Default::default())
        .unwrap();
    assert!(component.was_precompiled());
    assert_eq!(second.stats.compiled.load(Ordering::Relaxed), 0);
    assert_eq!(second.stats.loaded_precompiled.load(Ordering::Relaxed), 1);

    // A corrupt artifact is ignored and replaced, not trusted.
    for entry in std::fs::read_dir(artifacts.path()).unwrap() {
        std::fs::write(entry.unwrap().path(), b"garbage").unwrap();
    }
    let third = Runtime::new(Limits::default(), Some(artifacts.path().to_path_buf())).unwrap();
    assert!(
        !third
            .component(&DriverSource::Builtin("sqlite"), &Default::default())
            .unwrap()
            .was_precompiled()
    );
}

#[test]
fn writes_of_different_images_proceed_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(runtime(), CacheConfig::new(dir.path())).unwrap();
    let mut a = cache.open_for_write("a").unwrap();
    let mut b = cache.open_for_write("b").unwrap();
    a.write_all(b"first").unwrap();
    b.write_all(b"second").unwrap();
    b.commit(None).unwrap();
    a.commit(None).unwrap();
    assert!(cache.is_cached("a").unwrap() && cache.is_cached("b").unwrap());
}

#[test]
fn a_session_finishes_on_its_driver_and_the_old_driver_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(runtime(), CacheConfig::new(dir.path())).unwrap();
    let old = Arc::downgrade(&cache.driver());
    let mut writer = cache.open_for_write("in-flight").unwrap();
    writer.write_all(b"begun under sqlite").unwrap();

    cache.swap_driver(&DriverSource::Builtin("xattr")).unwrap();
    assert_eq!(cache.driver().info().name, "xattr");
    assert!(
        old.upgrade().is_some(),
        "the open session keeps the old driver"
    );

    writer.commit(None).unwrap();
    assert!(
        old.upgrade().is_some(),
        "the old driver is kept ready for a rollback"
    );
    cache.swap_driver(&DriverSource::Builtin("sqlite")).unwrap();
    assert!(
        old.upgrade().is_none(),
        "once it is no longer the one to roll back to, it is freed (its last session ended)"
    );
    let mut out = Vec::new();
    cache.read_image("in-flight", &mut out).unwrap();
    assert_eq!(out, b"begun under sqlite");
}

#[test]
fn a_failed_swap_keeps_the_old_driver() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = CacheConfig::new(dir.path());
    config.xattr = XattrSupport::Disabled;
    let cache = ImageCache::with_runtime(runtime(), config).unwrap();
    cache.cache_reader("1", None, &b"kept"[..]).unwrap();

    let missing = dir.path().join("missing.wasm");
    assert!(matches!(
        cache.swap_driver(&DriverSource::File(missing)),
        Err(Error::Load { .. })
    ));
    let m = bad_configuration(cache.swap_driver(&DriverSource::Builtin("xattr")));
    assert!(m.contains("extended attributes"), "{m}");
    assert_eq!(cache.driver().info().name, "sqlite");
    assert!(cache.is_cached("1").unwrap());
}

/// 8 threads cache, read, delete and queue for a few seconds while the
/// driver is swapped between sqlite and xattr at least 50 times.
#[test]
fn hot_swap_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let cache =
        Arc::new(ImageCache::with_runtime(runtime(), CacheConfig::new(dir.path())).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(9));

    let workers: Vec<_> = (0..8u8)
        .map(|t| {
            let (cache, stop, calls, start) =
                (cache.clone(), stop.clone(), calls.clone(), start.clone());
            std::thread::spawn(move || {
                // What this thread committed and did not delete: id -> bytes.
                let mut mine: HashMap<String, Vec<u8>> = HashMap::new();
                start.wait();
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let id = format!("t{t}-{i}");
                    let bytes = image_bytes(t.wrapping_add(i as u8), 1000 + (i as usize % 7) * 500);
                    let mut out = Vec::new();
                    let report = cache
                        .cache_stream(&id, None, &bytes[..], &mut out)
                        .unwrap_or_else(|e| panic!("caching {id}: {e}"));
                    assert!(report.cached, "{id}: {:?}", report.cache_error);
                    assert_eq!(out, bytes);
                    mine.insert(id.clone(), bytes);
                    if let Some(prev) = i.checked_sub(1).map(|p| format!("t{t}-{p}"))
                        && let Some(expected) = mine.get(&prev)
                    {
                        let mut got = Vec::new();
                        cache
                            .read_image(&prev, &mut got)
                            .unwrap_or_else(|e| panic!("reading {prev}: {e}"));
                        assert_eq!(&got, expected, "{prev}");
                    }
                    if i % 3 == 2 {
                        cache
                            .delete_cached_image(&id)
                            .unwrap_or_else(|e| panic!("deleting {id}: {e}"));
                        mine.remove(&id);
                    }
                    let queued = format!("q{t}-{i}");
                    assert!(
                        cache
                            .queue_image(&queued)
                            .unwrap_or_else(|e| panic!("queueing {queued}: {e}"))
                    );
                    cache.delete_queued_image(&queued).unwrap();
                    cache.get_cache_size().unwrap();
                    calls.fetch_add(6, Ordering::Relaxed);
                    i += 1;
                }
                mine
            })
        })
        .collect();

    start.wait();
    let began = Instant::now();
    let mut swaps = 0;
    while swaps < 50 || began.elapsed() < Duration::from_secs(3) {
        let next = if swaps % 2 == 0 { "xattr" } else { "sqlite" };
        cache
            .swap_driver(&DriverSource::Builtin(next))
            .unwrap_or_else(|e| panic!("swap {swaps}: {e}"));
        swaps += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    let committed: Vec<HashMap<String, Vec<u8>>> =
        workers.into_iter().map(|w| w.join().unwrap()).collect();

    println!(
        "{swaps} swaps, {} calls in {:?}",
        calls.load(Ordering::Relaxed),
        began.elapsed()
    );
    assert!(swaps >= 50);
    let mut images = 0;
    for mine in &committed {
        for (id, bytes) in mine {
            let mut got = Vec::new();
            cache
                .read_image(id, &mut got)
                .unwrap_or_else(|e| panic!("{id} after the swaps: {e}"));
            assert!(&got == bytes, "{id} is byte-identical");
            images += 1;
        }
    }
    assert!(images > 0);
    assert!(
        files_in(&dir.path().join("incomplete")).is_empty(),
        "nothing left half-written"
    );
    assert!(
        files_in(&dir.path().join("invalid")).is_empty(),
        "no write was abandoned"
    );
}
