//! The cache itself failing mid-stream (here: the file-size limit of the
//! process, which makes writes fail the way a full disk does) never stops
//! the bytes on their way to the caller. One test in its own process: the
//! limit is process-wide.

use image_cache::DriverSource;
use image_cache_tests::{TestCache, image_bytes};

const LIMIT: u64 = 256 * 1024;

fn set_file_size_limit(bytes: u64) {
    // SAFETY: plain libc calls; SIGXFSZ would otherwise kill the process
    // instead of making write(2) fail with EFBIG.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[test]
fn a_write_failure_mid_stream_still_delivers_every_chunk() {
    let caches: Vec<TestCache> = ["sqlite", "xattr"]
        .into_iter()
        .map(|d| TestCache::new(&DriverSource::Builtin(d)))
        .collect();
    let data = image_bytes(9, 4 * LIMIT as usize);
    set_file_size_limit(LIMIT);
    for t in &caches {
        let mut out = Vec::new();
        let report = t
            .cache
            .cache_stream("big", None, &data[..], &mut out)
            .unwrap_or_else(|e| panic!("{:?}: the stream must keep flowing: {e}", t.driver));
        assert_eq!(out.len(), data.len(), "{:?}", t.driver);
        assert!(out == data, "{:?}: every byte, in order", t.driver);
        assert!(!report.cached);
        let error = report.cache_error.expect("the cache failure is reported");
        assert!(error.contains("big"), "{error}");
        assert!(!t.cache.is_cached("big").unwrap());
        assert!(
            !t.cache.is_being_cached("big").unwrap(),
            "{:?}: staging file moved away",
            t.driver
        );
        assert_eq!(t.files_in("invalid"), ["big"]);

        // With a checksum the bytes flow too, and are still verified.
        let mut h = image_cache::checksum::Hasher::new(image_cache::checksum::Algorithm::Sha256);
        h.update(&data);
        let sum: image_cache::Checksum = format!("sha256:{}", h.finish()).parse().unwrap();
        let mut out = Vec::new();
        let report = t
            .cache
            .cache_stream("big2", Some(&sum), &data[..], &mut out)
            .unwrap();
        assert!(out == data && !report.cached && report.cache_error.is_some());

        // Small images still fit and cache normally.
        t.put("small", b"fits");
        assert_eq!(t.get("small"), b"fits");
    }
}
