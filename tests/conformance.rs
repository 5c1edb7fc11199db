//! The behaviour contract (docs/src/spec.md), run unchanged against every driver.
//! These are the scenarios of Glance's own image-cache test case, in our
//! terms, plus what the specification (docs/src/spec.md) asks beyond it.

use std::io::{self, Read, Write};
use std::time::Duration;

use image_cache::{Checksum, DriverSource, Error, ReadRecord};
use image_cache_tests::{TestCache, age_file, cached_ids, for_each_driver, image_bytes, lru_ids};

const KIB: usize = 1024;

for_each_driver!(
    caches_an_image,
    reads_back_identical_bytes_and_counts_the_hit,
    reports_image_size,
    deletes_one_image,
    deletes_all_images,
    clean_removes_invalid_files,
    clean_with_stall_time_zero_removes_incomplete_files,
    clean_removes_only_stalled_files,
    prune_evicts_least_recently_accessed_first,
    prune_to_zero_empties_the_cache,
    queue_refuses_cached_queued_and_incoming_images,
    queued_images_come_back_oldest_first,
    committed_write_leaves_no_staging_files,
    aborted_write_lands_in_invalid,
    dropped_write_is_an_incomplete_fetch,
    second_writer_of_an_image_is_refused,
    tee_passes_every_chunk_and_caches,
    tee_source_failure_aborts,
    tee_good_checksums_cache,
    tee_bad_checksum_is_an_error_and_caches_nothing,
    tee_of_a_cached_image_just_passes_bytes,
    cached_images_are_ordered_by_id,
    least_recently_accessed_and_batch,
    cache_size_counts_only_complete_images,
    configure_is_idempotent,
    concurrent_reads_never_lose_a_hit,
    rereading_moves_an_image_to_the_back_of_the_lru,
    a_read_reports_the_recorded_checksum,
    reads_recorded_in_a_batch_count_as_hits,
);

fn caches_an_image(driver: &DriverSource) {
    let t = TestCache::new(driver);
    assert!(!t.cache.is_cached("0").unwrap());
    t.put("0", &image_bytes(0, KIB));
    assert!(t.cache.is_cached("0").unwrap());
    assert!(!t.cache.is_cacheable("0").unwrap());
    let images = t.cache.get_cached_images().unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].image_id, "0");
    assert_eq!(images[0].size, KIB as u64);
    assert_eq!(images[0].hits, 0);
    assert!(images[0].last_modified > 0.0 && images[0].last_accessed > 0.0);
    assert_eq!(t.cache.get_cache_size().unwrap(), KIB as u64);
}

fn reads_back_identical_bytes_and_counts_the_hit(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let bytes = image_bytes(7, KIB);
    t.put("xxx", &bytes);
    assert_eq!(t.cache.get_hit_count("xxx").unwrap(), 0);
    assert_eq!(t.get("xxx"), bytes);
    assert_eq!(t.cache.get_hit_count("xxx").unwrap(), 1);
    assert_eq!(t.get("xxx"), bytes);
    assert_eq!(t.cache.get_hit_count("xxx").unwrap(), 2);
    // A read dropped before the end counts nothing.
    let mut reader = t.cache.open_for_read("xxx").unwrap();
    let mut first = [0u8; 10];
    reader.read_exact(&mut first).unwrap();
    drop(reader);
    assert_eq!(t.cache.get_hit_count("xxx").unwrap(), 2);
    assert_eq!(t.cache.get_hit_count("never-cached").unwrap(), 0);
    assert!(matches!(
        t.cache.open_for_read("never-cached"),
        Err(Error::NotFound(_))
    ));
}

fn reports_image_size(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("1", &image_bytes(1, KIB));
    assert_eq!(t.cache.get_image_size("1").unwrap(), KIB as u64);
    match t.cache.get_image_size("2") {
        Err(Error::NotFound(m)) => assert!(m.contains("\"2\""), "{m}"),
        other => panic!("expected not-found, got {other:?}"),
    }
}

fn deletes_one_image(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("1", &image_bytes(1, KIB));
    t.put("2", &image_bytes(2, KIB));
    t.get("1");
    t.cache.delete_cached_image("1").unwrap();
    assert!(!t.cache.is_cached("1").unwrap());
    assert!(t.cache.is_cached("2").unwrap());
    assert_eq!(t.cache.get_hit_count("1").unwrap(), 0);
    assert_eq!(t.cache.get_cached_images().unwrap().len(), 1);
    // Deleting a missing image is not an error.
    t.cache.delete_cached_image("1").unwrap();
    // Caching it again starts from zero hits.
    t.put("1", &image_bytes(1, KIB));
    assert_eq!(t.cache.get_hit_count("1").unwrap(), 0);
}

fn deletes_all_images(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for id in ["1", "2", "3"] {
        t.put(id, &image_bytes(3, KIB));
    }
    t.cache.queue_image("4").unwrap();
    assert_eq!(t.cache.delete_all_cached_images().unwrap(), 3);
    assert!(t.cache.get_cached_images().unwrap().is_empty());
    assert_eq!(t.cache.get_cache_size().unwrap(), 0);
    assert!(t.cache.is_queued("4").unwrap(), "queue untouched");
    assert_eq!(t.cache.delete_all_cached_images().unwrap(), 0);
}

fn clean_removes_invalid_files(driver: &DriverSource) {
    let t = TestCache::new(driver);
    std::fs::write(t.path("invalid/1"), b"broken").unwrap();
    std::fs::write(t.path("invalid/2"), b"broken too").unwrap();
    t.put("3", &image_bytes(3, KIB));
    let report = t.cache.clean(Duration::from_secs(86_400)).unwrap();
    let mut removed: Vec<_> = report.invalid.iter().map(|r| r.image_id.as_str()).collect();
    removed.sort();
    assert_eq!(removed, ["1", "2"]);
    assert!(report.incomplete.is_empty() && report.failures.is_empty());
    assert!(t.files_in("invalid").is_empty());
    assert!(t.cache.is_cached("3").unwrap());
}

fn clean_with_stall_time_zero_removes_incomplete_files(driver: &DriverSource) {
    let t = TestCache::new(driver);
    std::fs::write(t.path("incomplete/1"), b"partial").unwrap();
    std::fs::write(t.path("incomplete/2"), b"partial").unwrap();
    assert!(t.cache.is_being_cached("1").unwrap());
    let report = t.cache.clean(Duration::ZERO).unwrap();
    assert_eq!(report.incomplete.len(), 2);
    assert!(t.files_in("incomplete").is_empty());
    assert!(!t.cache.is_being_cached("1").unwrap());
}

fn clean_removes_only_stalled_files(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let day = Duration::from_secs(86_400);
    let stage = |t: &TestCache| {
        for (id, age) in [
            ("fresh", Duration::ZERO),
            ("half-hour", Duration::from_secs(1800)),
            ("one-day", day),
            ("two-days", 2 * day),
        ] {
            std::fs::write(t.path(&format!("incomplete/{id}")), b"partial").unwrap();
            if !age.is_zero() {
                age_file(&t.path(&format!("incomplete/{id}")), age);
            }
        }
    };
    stage(&t);
    // Default stall time: one day.
    let report = t
        .cache
        .clean(image_cache::cache::DEFAULT_STALL_TIME)
        .unwrap();
    let mut removed: Vec<_> = report
        .incomplete
        .iter()
        .map(|r| r.image_id.clone())
        .collect();
    removed.sort();
    assert_eq!(removed, ["one-day", "two-days"]);
    assert_eq!(t.files_in("incomplete"), ["fresh", "half-hour"]);

    stage(&t);
    let report = t.cache.clean(Duration::from_secs(3600)).unwrap();
    assert_eq!(report.incomplete.len(), 2);
    assert_eq!(t.files_in("incomplete"), ["fresh", "half-hour"]);
}

fn prune_evicts_least_recently_accessed_first(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for i in 0..10u8 {
        t.put(&i.to_string(), &image_bytes(i, KIB));
    }
    for i in 0..10u8 {
        t.get(&i.to_string());
    }
    t.put("99", &image_bytes(99, KIB));
    assert_eq!(t.cache.get_cache_size().unwrap(), 11 * KIB as u64);

    let report = t.cache.prune(5 * KIB as u64).unwrap();
    let removed: Vec<_> = report.removed.iter().map(|r| r.image_id.as_str()).collect();
    assert_eq!(removed, ["0", "1", "2", "3", "4", "5"]);
    assert_eq!(report.bytes_removed, 6 * KIB as u64);
    assert_eq!(report.size_after, 5 * KIB as u64);
    for i in 0..=5 {
        assert!(
            !t.cache.is_cached(&i.to_string()).unwrap(),
            "{i} should be gone"
        );
    }
    for id in ["6", "7", "8", "9", "99"] {
        assert!(t.cache.is_cached(id).unwrap(), "{id} should remain");
    }
    assert_eq!(t.cache.get_cache_size().unwrap(), 5 * KIB as u64);
    // Under the budget: nothing more to do.
    assert!(t.cache.prune(5 * KIB as u64).unwrap().removed.is_empty());
}

fn prune_to_zero_empties_the_cache(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for i in 0..4u8 {
        t.put(&i.to_string(), &image_bytes(i, KIB));
    }
    let report = t.cache.prune(0).unwrap();
    assert_eq!(report.removed.len(), 4);
    assert_eq!(report.size_after, 0);
    assert_eq!(t.cache.get_cache_size().unwrap(), 0);
    assert!(t.cache.get_cached_images().unwrap().is_empty());
}

fn queue_refuses_cached_queued_and_incoming_images(driver: &DriverSource) {
    let t = TestCache::new(driver);
    assert!(t.cache.queue_image("0").unwrap());
    assert!(t.cache.is_queued("0").unwrap());
    assert!(!t.cache.queue_image("0").unwrap(), "already queued");

    t.put("1", &image_bytes(1, KIB));
    assert!(!t.cache.queue_image("1").unwrap(), "already cached");

    std::fs::write(t.path("incomplete/2"), b"partial").unwrap();
    assert!(!t.cache.queue_image("2").unwrap(), "being cached");

    // Caching a queued image takes it off the queue.
    t.put("0", &image_bytes(0, KIB));
    assert!(!t.cache.is_queued("0").unwrap());

    assert!(t.cache.queue_image("3").unwrap());
    t.cache.delete_queued_image("3").unwrap();
    assert!(!t.cache.is_queued("3").unwrap());
    t.cache.delete_queued_image("3").unwrap();
}

fn queued_images_come_back_oldest_first(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for id in ["c", "a", "b", "0"] {
        assert!(t.cache.queue_image(id).unwrap());
    }
    assert_eq!(t.cache.get_queued_images().unwrap(), ["c", "a", "b", "0"]);
    assert_eq!(t.cache.delete_all_queued_images().unwrap(), 4);
    assert!(t.cache.get_queued_images().unwrap().is_empty());
}

fn committed_write_leaves_no_staging_files(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let mut w = t.cache.open_for_write("1").unwrap();
    assert!(t.cache.is_being_cached("1").unwrap());
    assert!(
        !t.cache.is_cached("1").unwrap(),
        "no partial file under the final name"
    );
    w.write_all(&image_bytes(1, 3000)).unwrap();
    w.commit(None).unwrap();
    assert!(t.cache.is_cached("1").unwrap());
    assert!(t.files_in("incomplete").is_empty());
    assert!(t.files_in("invalid").is_empty());
    assert_eq!(t.cache.get_image_size("1").unwrap(), 3000);
}

fn aborted_write_lands_in_invalid(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let mut w = t.cache.open_for_write("1").unwrap();
    w.write_all(b"half an image").unwrap();
    w.abort("the source failed").unwrap();
    assert!(!t.cache.is_cached("1").unwrap());
    assert!(!t.cache.is_being_cached("1").unwrap());
    assert_eq!(t.files_in("invalid"), ["1"]);
    assert!(t.cache.get_cached_images().unwrap().is_empty());
    assert_eq!(t.cache.get_hit_count("1").unwrap(), 0);
    // It can be cached again afterwards.
    t.put("1", b"whole");
    assert!(t.cache.is_cached("1").unwrap());
}

fn dropped_write_is_an_incomplete_fetch(driver: &DriverSource) {
    let t = TestCache::new(driver);
    {
        let mut w = t.cache.open_for_write("1").unwrap();
        w.write_all(&image_bytes(1, 500)).unwrap();
    }
    assert!(!t.cache.is_cached("1").unwrap());
    assert!(t.files_in("incomplete").is_empty());
    assert_eq!(t.files_in("invalid"), ["1"]);
}

fn second_writer_of_an_image_is_refused(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let mut first = t.cache.open_for_write("1").unwrap();
    assert!(matches!(
        t.cache.open_for_write("1"),
        Err(Error::BeingCached(_))
    ));
    first.write_all(b"only one writer").unwrap();
    first.commit(None).unwrap();
    assert!(matches!(
        t.cache.open_for_write("1"),
        Err(Error::AlreadyCached(_))
    ));
    assert_eq!(t.get("1"), b"only one writer");
}

/// A source yielding fixed chunks, then optionally failing.
struct Chunks {
    chunks: Vec<Vec<u8>>,
    fail_at_end: bool,
}

impl Read for Chunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.chunks.is_empty() {
            return if self.fail_at_end {
                Err(io::Error::other("connection reset by the image store"))
            } else {
                Ok(0)
            };
        }
        let chunk = self.chunks.remove(0);
        assert!(chunk.len() <= buf.len());
        buf[..chunk.len()].copy_from_slice(&chunk);
        Ok(chunk.len())
    }
}

fn chunks() -> Vec<Vec<u8>> {
    (0..8u8).map(|i| image_bytes(i, 700)).collect()
}

fn tee_passes_every_chunk_and_caches(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let mut out = Vec::new();
    let source = Chunks {
        chunks: chunks(),
        fail_at_end: false,
    };
    let report = t.cache.cache_stream("1", None, source, &mut out).unwrap();
    assert_eq!(out, chunks().concat());
    assert!(report.cached && report.cache_error.is_none());
    assert_eq!(report.bytes, 8 * 700);
    assert_eq!(t.get("1"), chunks().concat());
}

fn tee_source_failure_aborts(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let mut out = Vec::new();
    let source = Chunks {
        chunks: chunks(),
        fail_at_end: true,
    };
    match t.cache.cache_stream("1", None, source, &mut out) {
        Err(Error::Source(e)) => assert!(e.to_string().contains("connection reset")),
        other => panic!("expected a source error, got {other:?}"),
    }
    assert_eq!(
        out,
        chunks().concat(),
        "the bytes read so far were passed on"
    );
    assert!(!t.cache.is_cached("1").unwrap());
    assert_eq!(t.files_in("invalid"), ["1"]);
    assert!(t.files_in("incomplete").is_empty());
}

fn tee_good_checksums_cache(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let data = chunks().concat();
    let digests = [
        ("md5", "md5:"),
        ("sha256", "sha256:"),
        ("sha512", "sha512:"),
    ];
    for (i, (algorithm, prefix)) in digests.iter().enumerate() {
        let hex = digest(algorithm, &data);
        let checksum: Checksum = format!("{prefix}{hex}").parse().unwrap();
        let id = format!("img-{i}");
        let mut out = Vec::new();
        let report = t
            .cache
            .cache_stream(&id, Some(&checksum), &data[..], &mut out)
            .unwrap();
        assert!(report.cached, "{algorithm}");
        assert_eq!(out, data);
        assert_eq!(t.get(&id), data);
    }
}

fn tee_bad_checksum_is_an_error_and_caches_nothing(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let data = chunks().concat();
    let wrong: Checksum = format!("md5:{}", digest("md5", b"something else"))
        .parse()
        .unwrap();
    let mut out = Vec::new();
    match t.cache.cache_stream("1", Some(&wrong), &data[..], &mut out) {
        Err(Error::ChecksumMismatch { image_id, .. }) => assert_eq!(image_id, "1"),
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
    assert_eq!(out, data, "the bytes were passed on before the check");
    assert!(!t.cache.is_cached("1").unwrap());
    assert_eq!(t.files_in("invalid"), ["1"]);
}

fn tee_of_a_cached_image_just_passes_bytes(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("1", b"original");
    let mut out = Vec::new();
    let report = t
        .cache
        .cache_stream("1", None, &b"newer bytes"[..], &mut out)
        .unwrap();
    assert_eq!(out, b"newer bytes");
    assert!(!report.cached);
    assert_eq!(t.get("1"), b"original");
}

fn cached_images_are_ordered_by_id(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for id in ["delta", "alpha", "charlie", "bravo", "10", "9"] {
        t.put(id, b"x");
    }
    let ids = cached_ids(&t.cache);
    assert_eq!(ids, ["10", "9", "alpha", "bravo", "charlie", "delta"]);
}

fn least_recently_accessed_and_batch(driver: &DriverSource) {
    let t = TestCache::new(driver);
    assert_eq!(t.cache.get_least_recently_accessed().unwrap(), None);
    for id in ["a", "b", "c"] {
        t.put(id, &image_bytes(1, 100));
    }
    t.tick();
    t.get("a");
    let (id, size) = t.cache.get_least_recently_accessed().unwrap().unwrap();
    assert_eq!((id.as_str(), size), ("b", 100));
    let batch = lru_ids(&t.cache, 2);
    assert_eq!(batch, ["b", "c"]);
    assert_eq!(
        t.cache.get_least_recently_accessed_batch(10).unwrap().len(),
        3
    );
}

fn cache_size_counts_only_complete_images(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("1", &image_bytes(1, 1000));
    std::fs::write(t.path("incomplete/2"), vec![0u8; 5000]).unwrap();
    std::fs::write(t.path("invalid/3"), vec![0u8; 7000]).unwrap();
    t.cache.queue_image("4").unwrap();
    std::fs::create_dir(t.path("not-an-image")).unwrap();
    assert_eq!(t.cache.get_cache_size().unwrap(), 1000);
    let ids = cached_ids(&t.cache);
    assert_eq!(
        ids,
        ["1"],
        "database, directories and staging files are never images"
    );
}

fn configure_is_idempotent(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("1", b"kept");
    t.get("1");
    let again = t.reopen(driver);
    assert!(again.is_cached("1").unwrap());
    assert_eq!(again.get_hit_count("1").unwrap(), 1);
}

fn digest(algorithm: &str, data: &[u8]) -> String {
    let mut h = image_cache::checksum::Hasher::new(match algorithm {
        "md5" => image_cache::checksum::Algorithm::Md5,
        "sha256" => image_cache::checksum::Algorithm::Sha256,
        _ => image_cache::checksum::Algorithm::Sha512,
    });
    h.update(data);
    h.finish()
}

fn concurrent_reads_never_lose_a_hit(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let bytes = image_bytes(5, 4 * KIB);
    t.put("popular", &bytes);
    std::thread::scope(|s| {
        for _ in 0..8 {
            s.spawn(|| {
                for _ in 0..125 {
                    assert_eq!(t.get("popular"), bytes);
                }
            });
        }
    });
    assert_eq!(t.cache.get_hit_count("popular").unwrap(), 1000);
}

fn rereading_moves_an_image_to_the_back_of_the_lru(driver: &DriverSource) {
    // On relatime mounts a second read does not move atime by itself: the
    // driver must record the access.
    let t = TestCache::new(driver);
    for id in ["a", "b", "c"] {
        t.put(id, b"x");
    }
    for id in ["a", "b", "c", "a", "a"] {
        t.tick();
        t.get(id);
    }
    let order = lru_ids(&t.cache, 3);
    assert_eq!(order, ["b", "c", "a"]);
    let report = t.cache.prune(2).unwrap();
    assert_eq!(
        report
            .removed
            .iter()
            .map(|r| r.image_id.as_str())
            .collect::<Vec<_>>(),
        ["b"]
    );
}

fn a_read_reports_the_recorded_checksum(driver: &DriverSource) {
    let t = TestCache::new(driver);
    let data = chunks().concat();
    let checksum: Checksum = format!("md5:{}", digest("md5", &data)).parse().unwrap();
    let mut out = Vec::new();
    t.cache
        .cache_stream("summed", Some(&checksum), &data[..], &mut out)
        .unwrap();
    t.put("plain", &data);

    let mut reader = t.cache.open_for_read("summed").unwrap();
    // As given (`md5:HEX`), or as Glance's schema keeps it (bare hex).
    let recorded: Checksum = reader
        .checksum()
        .unwrap()
        .expect("a recorded checksum")
        .parse()
        .unwrap();
    assert_eq!(recorded.to_string(), checksum.to_string());
    // Asking does not end the read: the bytes and the hit follow.
    let mut read = Vec::new();
    reader.read_to_end(&mut read).unwrap();
    assert_eq!(read, data);
    assert_eq!(t.cache.get_hit_count("summed").unwrap(), 1);

    let mut reader = t.cache.open_for_read("plain").unwrap();
    assert_eq!(reader.checksum().unwrap(), None);
    reader.finish().unwrap();
    assert_eq!(t.cache.get_hit_count("plain").unwrap(), 1);
}

/// `record-reads` (a server's batched hits): each read of a cached image
/// is a hit at its own time, as `finish` would record it; reads of images
/// that are not cached are skipped and create nothing.
fn reads_recorded_in_a_batch_count_as_hits(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("a", &image_bytes(1, KIB));
    t.put("b", &image_bytes(2, KIB));
    let read = |id: &str, accessed: f64| ReadRecord {
        image_id: id.to_string(),
        accessed,
    };
    let recorded = t
        .cache
        .record_reads(&[
            read("a", 2_000_000_000.0),
            read("missing", 2_000_000_001.0),
            read("a", 2_000_000_002.5),
            read("b", 2_000_000_003.0),
        ])
        .unwrap();
    assert_eq!(recorded, 3);
    assert_eq!(t.cache.get_hit_count("a").unwrap(), 2);
    assert_eq!(t.cache.get_hit_count("b").unwrap(), 1);
    assert!(!t.cache.is_cached("missing").unwrap());
    let images = t.cache.get_cached_images().unwrap();
    let seen: Vec<_> = images
        .iter()
        .map(|i| (i.image_id.as_str(), i.hits, i.last_accessed))
        .collect();
    assert_eq!(
        seen,
        [
            ("a", 2, t.recorded_time(2_000_000_002.5)),
            ("b", 1, 2_000_000_003.0)
        ]
    );
    // The LRU order follows the recorded times.
    assert_eq!(lru_ids(&t.cache, 2), ["a", "b"]);
    assert_eq!(t.cache.record_reads(&[]).unwrap(), 0);
}
