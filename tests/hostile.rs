//! Hostile drivers: each attack gets an error for that call only, its
//! instance is replaced, and the next call works. One fixture component
//! (guest/hostile) whose `is-cached(id)` argument picks the attack.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use image_cache::{
    CacheConfig, Capability, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy,
    ReadRecord, Runtime,
};
use image_cache_tests::fixture;

fn hostile_cache(limits: Limits) -> (tempfile::TempDir, ImageCache) {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap();
    let config = CacheConfig::new(dir.path())
        .driver(DriverSource::File(fixture("hostile_driver")))
        .fallback_to_sqlite(false)
        .policy(hostile_grants());
    let cache = ImageCache::with_runtime(runtime, config).unwrap();
    (dir, cache)
}

/// The hostile driver imports xattr: grant it, so its attacks reach the
/// host's checks instead of being refused at load.
fn hostile_grants() -> LoadPolicy {
    LoadPolicy {
        sha256: None,
        grants: Grants::of(&[Capability::Xattr]),
        ..Default::default()
    }
}

fn limits() -> Limits {
    Limits {
        call_deadline: Duration::from_millis(500),
        memory_bytes: 64 << 20,
        resources: 64,
        ..Limits::default()
    }
}

/// Instances the runtime discarded so far (after faults).
fn discarded(cache: &ImageCache) -> u64 {
    cache
        .runtime()
        .stats
        .instances_discarded
        .load(Ordering::Relaxed)
}

/// The fault of one attack, after which the same cache keeps working.
fn fault_of(cache: &ImageCache, attack: &str) -> String {
    let before = discarded(cache);
    let message = match cache.is_cached(attack) {
        Err(Error::DriverFault { driver, message }) => {
            assert!(driver.ends_with("hostile_driver.wasm"), "{driver}");
            message
        }
        other => panic!("{attack}: expected a driver fault, got {other:?}"),
    };
    assert_eq!(
        discarded(cache),
        before + 1,
        "{attack}: the faulty instance is discarded"
    );
    assert!(
        !cache.is_cached("benign").unwrap(),
        "{attack}: the next call works"
    );
    message
}

#[test]
fn a_driver_that_spins_is_stopped_at_its_deadline() {
    let (_dir, cache) = hostile_cache(limits());
    let started = Instant::now();
    let message = fault_of(&cache, "spin");
    assert!(message.contains("deadline of 500ms"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "stopped, not waited out"
    );
}

#[test]
fn a_call_made_without_waiting_never_waits_and_a_spinning_one_stops_at_a_second() {
    // The call deadline is long (30 s): what stops these is the no-wait rule.
    let (_dir, cache) = hostile_cache(Limits {
        call_deadline: Duration::from_secs(30),
        ..limits()
    });
    // A pause is answered "the deadline passed" at once, and the caller is
    // told the call wanted to wait (its result says nothing).
    assert!(cache.without_waiting(|| cache.is_cached("nap")).is_none());
    assert_eq!(
        discarded(&cache),
        0,
        "no fault: the driver stopped waiting when told to"
    );
    // A driver that spins is stopped at the short deadline, a fault...
    match cache.without_waiting(|| cache.is_cached("spin")) {
        Some(Err(Error::DriverFault { message, .. })) => {
            assert!(message.contains("deadline of 1s"), "{message}")
        }
        other => panic!("expected a fault at the no-wait deadline, got {other:?}"),
    }
    // ...after which it is not called that way again (the caller calls it
    // as usual), and it works.
    assert!(
        cache
            .without_waiting(|| cache.is_cached("benign"))
            .is_none()
    );
    assert!(!cache.is_cached("benign").unwrap());
}

#[test]
fn a_driver_that_allocates_without_end_hits_its_memory_cap() {
    let (_dir, cache) = hostile_cache(limits());
    let message = fault_of(&cache, "alloc");
    assert!(
        message.contains("exceeded its memory cap of 67108864 bytes"),
        "{message}"
    );
}

#[test]
fn a_driver_that_panics_gets_an_error_for_that_call() {
    let (_dir, cache) = hostile_cache(limits());
    let message = fault_of(&cache, "panic");
    assert!(
        message.contains("unreachable"),
        "a Rust panic is a wasm `unreachable`: {message}"
    );
    assert!(!message.contains('\n'), "one line: {message}");
}

#[test]
fn a_driver_that_exhausts_handles_hits_the_resource_cap() {
    let (_dir, cache) = hostile_cache(limits());
    let message = fault_of(&cache, "exhaust-handles");
    assert!(
        message.contains("resource table has no free keys"),
        "{message}"
    );
}

#[test]
fn a_driver_that_returns_garbage_is_discarded() {
    let (_dir, cache) = hostile_cache(limits());
    let before = discarded(&cache);
    match cache.get_least_recently_accessed_batch(3) {
        Err(Error::DriverFault { message, .. }) => {
            assert!(
                message.contains("asked for 3 LRU entries, got 8"),
                "{message}"
            )
        }
        other => panic!("expected a contract fault, got {other:?}"),
    }
    match cache.get_cached_images() {
        Err(Error::DriverFault { message, .. }) => {
            assert!(message.contains("not ordered by id"), "{message}")
        }
        other => panic!("expected a contract fault, got {other:?}"),
    }
    let reads = |ids: &[&str]| -> Vec<ReadRecord> {
        ids.iter()
            .map(|id| ReadRecord {
                image_id: id.to_string(),
                accessed: 1.7e9,
            })
            .collect()
    };
    match cache.record_reads(&reads(&["a", "record-reads-overcount"])) {
        Err(Error::DriverFault { message, .. }) => {
            assert!(
                message.contains("record-reads recorded 3 reads of the 2 it was given"),
                "{message}"
            )
        }
        other => panic!("expected a contract fault, got {other:?}"),
    }
    // An invalid id never reaches the driver.
    assert!(matches!(
        cache.record_reads(&reads(&["a", "../x"])),
        Err(Error::InvalidImageId(_))
    ));
    assert_eq!(discarded(&cache), before + 3);
    assert!(!cache.is_cached("benign").unwrap());
}

/// Attacks the host refuses with an error value: the driver sees the
/// refusal, nothing outside the root is touched, the instance lives on.
#[test]
fn escapes_are_refused_by_the_host() {
    let (dir, cache) = hostile_cache(limits());
    let refused = |attack: &str| match cache.is_cached(attack) {
        Err(e @ (Error::Io { .. } | Error::Database(_))) => e.to_string(),
        other => panic!("{attack}: expected the host's refusal, got {other:?}"),
    };
    assert!(refused("escape-parent").contains("`..` is not allowed"));
    assert!(refused("escape-absolute").contains("absolute paths are not allowed"));
    assert!(refused("trusted-xattr").contains("only user.* names are allowed"));
    assert!(refused("sql-attach-relative").contains("unable to open"));
    assert!(
        !dir.path()
            .parent()
            .unwrap()
            .join("hostile-planted.db")
            .exists()
    );
    assert_eq!(discarded(&cache), 0);
}

#[test]
fn an_embedder_can_share_one_runtime_across_hostile_and_good_drivers() {
    // The deadline is wall time, host calls included: leave room for the
    // good driver's database set-up on a busy machine.
    let generous = Limits {
        call_deadline: Duration::from_secs(10),
        ..limits()
    };
    let runtime: Arc<Runtime> =
        Runtime::new(generous, Some(image_cache_tests::artifact_dir())).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let hostile = ImageCache::with_runtime(
        runtime.clone(),
        CacheConfig::new(dir.path().join("a"))
            .driver(DriverSource::File(fixture("hostile_driver")))
            .fallback_to_sqlite(false)
            .policy(hostile_grants()),
    )
    .unwrap();
    let good = ImageCache::with_runtime(runtime, CacheConfig::new(dir.path().join("b"))).unwrap();
    assert!(hostile.is_cached("panic").is_err());
    good.cache_reader("1", None, &b"unaffected"[..]).unwrap();
    assert!(good.is_cached("1").unwrap());
}
