//! Every attack class of the security model, tried by a hostile driver
//! component (guest/hostile) against the real host: each is refused with
//! its exact error (or stopped at the deadline), nothing outside the root
//! changes (a canary directory beside it is compared before and after), no
//! host thread outlives the deadline by much, no host panic, and the next
//! call works.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use image_cache::{
    CacheConfig, Capability, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy, Runtime,
};
use image_cache_tests::{canary_state, fixture};

const DEADLINE: Duration = Duration::from_millis(800);

/// A root and, beside it, a canary directory whose contents and times
/// must never change.
struct Scene {
    _top: tempfile::TempDir,
    root: PathBuf,
    canary: PathBuf,
    before: Vec<(PathBuf, u64, SystemTime)>,
    cache: ImageCache,
}

fn scene() -> Scene {
    scene_with(Limits {
        call_deadline: DEADLINE,
        memory_bytes: 64 << 20,
        ..Limits::default()
    })
}

fn scene_with(limits: Limits) -> Scene {
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("root");
    let canary = top.path().join("canary");
    std::fs::create_dir(&canary).unwrap();
    std::fs::write(canary.join("secret"), b"do not read").unwrap();
    let victim = rusqlite::Connection::open(canary.join("victim.db")).unwrap();
    victim
        .execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES ('victim');")
        .unwrap();
    drop(victim);
    let before = canary_state(&canary);
    let mut config = CacheConfig::new(&root)
        .driver(DriverSource::File(fixture("hostile_driver")))
        .fallback_to_sqlite(false)
        .policy(LoadPolicy {
            sha256: None,
            grants: Grants::of(&[Capability::Sqlite, Capability::Xattr]),
        });
    config.driver_options = vec![(
        "hostile_target".to_string(),
        canary.join("victim.db").display().to_string(),
    )];
    let cache = ImageCache::with_runtime(Runtime::new(limits, None).unwrap(), config).unwrap();
    Scene {
        _top: top,
        root,
        canary,
        before,
        cache,
    }
}

impl Scene {
    /// The error an attack gets; the next call works; the root's location
    /// is in no message.
    fn refusal(&self, attack: &str) -> Error {
        let e = match self.cache.is_cached(attack) {
            Err(e) => e,
            Ok(v) => panic!("{attack}: the attack succeeded ({v})"),
        };
        let text = e.to_string();
        assert!(
            !text.contains(&self.root.display().to_string()),
            "{attack}: the root's location leaked: {text}"
        );
        assert!(
            !self.cache.is_cached("benign").unwrap(),
            "{attack}: next call works"
        );
        e
    }

    /// A database refusal with the host's error code in it.
    fn database_refusal(&self, attack: &str, code: &str) -> String {
        match self.refusal(attack) {
            Error::Database(m) => {
                assert!(m.contains(code), "{attack}: expected {code}: {m}");
                m
            }
            e => panic!("{attack}: expected a database error, got {e:?}"),
        }
    }

    fn fault(&self, attack: &str) -> String {
        let discarded = self.discarded();
        let message = match self.refusal(attack) {
            Error::DriverFault { message, .. } => message,
            e => panic!("{attack}: expected a driver fault, got {e:?}"),
        };
        assert_eq!(
            self.discarded(),
            discarded + 1,
            "{attack}: instance discarded"
        );
        message
    }

    fn discarded(&self) -> u64 {
        self.cache
            .runtime()
            .stats
            .instances_discarded
            .load(Ordering::Relaxed)
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                canary_state(&self.canary),
                self.before,
                "nothing outside the root changed"
            );
            assert!(
                !self
                    .root
                    .parent()
                    .unwrap()
                    .join("hostile-planted.db")
                    .exists()
            );
            assert!(
                !Path::new("hostile-planted.db").exists(),
                "nothing in the working directory"
            );
        }
    }
}

#[test]
fn sql_cannot_attach_files_outside_the_root() {
    let s = scene();
    for attack in ["sql-attach", "sql-attach-relative", "sql-attach-uri"] {
        let m = s.database_refusal(attack, "AccessDenied");
        assert!(m.contains("not authorized"), "{m}");
    }
}

#[test]
fn sql_cannot_write_a_file_with_vacuum_into() {
    let s = scene();
    // VACUUM INTO attaches its target: refused by the authorizer and by
    // SQLITE_LIMIT_ATTACHED 0, whichever SQLite consults first.
    let m = match s.refusal("sql-vacuum-into") {
        Error::Database(m) => m,
        e => panic!("expected a database error, got {e:?}"),
    };
    assert!(
        m.contains("AccessDenied")
            && (m.contains("authoriz") || m.contains("too many attached databases")),
        "{m}"
    );
    assert!(!s.canary.join("victim.db-journal").exists());
}

#[test]
fn sql_cannot_change_process_wide_state() {
    let s = scene();
    for attack in ["sql-heap-limit", "sql-soft-heap-limit", "sql-temp-dir"] {
        s.database_refusal(attack, "AccessDenied");
    }
    // The embedding application's own SQLite still works, unlimited.
    // SAFETY: reads of process-wide settings (-1 / a negative value query).
    let (hard, soft) = unsafe {
        (
            rusqlite::ffi::sqlite3_hard_heap_limit64(-1),
            rusqlite::ffi::sqlite3_soft_heap_limit64(-1),
        )
    };
    assert_eq!((hard, soft), (0, 0));
    let mine = rusqlite::Connection::open_in_memory().unwrap();
    mine.execute_batch("CREATE TABLE x (y); INSERT INTO x VALUES (zeroblob(1000000));")
        .unwrap();
}

#[test]
fn sql_cannot_learn_where_its_files_are_or_load_code() {
    let s = scene();
    s.database_refusal("sql-database-list", "AccessDenied");
    s.database_refusal("sql-pragma-table", "AccessDenied");
    s.database_refusal("sql-load-extension", "AccessDenied");
}

#[test]
fn a_runaway_query_is_stopped_at_the_deadline() {
    let s = scene();
    let started = Instant::now();
    let m = s.fault("sql-runaway");
    let took = started.elapsed();
    // Stopped inside SQLite by the host, or (if the host returned at the
    // deadline and the driver's own code ran on) by the epoch in wasm.
    assert!(m.contains("ran past its deadline"), "{m}");
    assert!(took >= DEADLINE, "ran until the deadline: {took:?}");
    // Generous: a shared machine; the point is "stopped", not "waited out".
    assert!(
        took < DEADLINE + Duration::from_secs(3),
        "stopped: {took:?}"
    );
}

#[test]
fn a_lock_never_waits_past_the_deadline() {
    let s = scene();
    let started = Instant::now();
    let m = s.fault("lock-forever");
    // The host's wait ends at the deadline (timed-out); the call is then a
    // fault, stopped in the host call or, a moment later, in wasm.
    assert!(m.contains("ran past its deadline"), "{m}");
    assert!(started.elapsed() < DEADLINE + Duration::from_secs(3));
}

#[test]
fn huge_values_are_refused_before_they_are_copied() {
    let s = scene();
    let m = s.database_refusal("sql-zeroblob", "LimitExceeded");
    assert!(m.contains("too big"), "{m}");
}

#[test]
fn connections_per_instance_are_capped() {
    let s = scene();
    let m = s.database_refusal("sql-connections", "LimitExceeded");
    assert!(m.contains("after 4 connections"), "{m}");
}

#[test]
fn a_time_before_1970_is_an_error_not_a_host_panic() {
    let s = scene();
    match s.refusal("set-times-negative") {
        Error::Io(m) => assert!(
            m.contains("InvalidArgument") && m.contains("not a usable time"),
            "{m}"
        ),
        e => panic!("expected the host's refusal, got {e:?}"),
    }
}

#[test]
fn a_flood_of_error_text_is_cut_and_made_printable() {
    let s = scene();
    match s.refusal("error-flood") {
        Error::Io(m) => {
            assert!(m.len() < 2000, "cut: {} bytes", m.len());
            assert!(!m.contains('\u{1b}'), "no terminal escapes");
            assert!(m.contains("flood"), "{m}");
        }
        e => panic!("expected the driver's error, got {e:?}"),
    }
}

#[test]
fn a_write_session_must_hand_back_its_own_incomplete_file() {
    let s = scene();
    let discarded = s.discarded();
    match s.cache.open_for_write("wrong-file") {
        Err(Error::DriverFault { message, .. }) => assert!(
            message.contains("handed back \"decoy\", which is not incomplete/wrong-file"),
            "{message}"
        ),
        Err(e) => panic!("expected a contract fault, got {e:?}"),
        Ok(_) => panic!("a write session wrote into another file of the root"),
    }
    assert_eq!(s.discarded(), discarded + 1);
    assert!(!s.cache.is_cached("benign").unwrap());
}

#[test]
fn a_read_session_must_hand_back_the_cached_image() {
    let s = scene();
    match s.cache.open_for_read("read-db") {
        Err(Error::DriverFault { message, .. }) => {
            assert!(message.contains("which is not read-db"), "{message}")
        }
        Err(e) => panic!("expected a contract fault, got {e:?}"),
        Ok(_) => panic!("the database was served as an image"),
    }
}

#[test]
fn a_checksum_that_would_inject_a_header_is_a_fault() {
    // The checksum becomes an HTTP header value in `serve`: a driver that
    // slips a line break into it broke the contract.
    let s = scene();
    std::fs::write(s.root.join("bad-checksum"), b"bytes").unwrap();
    let discarded = s.discarded();
    let mut reader = s.cache.open_for_read("bad-checksum").unwrap();
    match reader.checksum() {
        Err(Error::DriverFault { message, .. }) => assert!(
            message.contains("the checksum of \"bad-checksum\" is not a short token"),
            "{message}"
        ),
        other => panic!("expected a contract fault, got {other:?}"),
    }
    // The read ended uncounted; the instance is gone; the next call works.
    assert!(reader.checksum().unwrap().is_none());
    assert_eq!(s.discarded(), discarded + 1);
    assert!(!s.cache.is_cached("benign").unwrap());
}

#[test]
fn ids_from_a_driver_are_checked_before_the_host_uses_them() {
    let s = scene();
    assert!(!s.cache.queue_image("bad-ids").unwrap());
    match s.cache.get_queued_images() {
        Err(Error::DriverFault { message, .. }) => assert!(
            message.contains("get-queued-images returned invalid image id \"../../etc/passwd\""),
            "{message}"
        ),
        other => panic!("expected a contract fault, got {other:?}"),
    }
}

#[test]
fn instances_per_driver_are_capped_and_callers_wait_then_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        instances: 2,
        instance_wait: Duration::from_millis(300),
        ..Limits::default()
    };
    let cache = ImageCache::with_runtime(
        Runtime::new(limits, None).unwrap(),
        CacheConfig::new(dir.path()),
    )
    .unwrap();
    let a = cache.open_for_write("a").unwrap();
    let b = cache.open_for_write("b").unwrap();
    assert_eq!(cache.driver().live_instances(), 2);
    let started = Instant::now();
    match cache.is_cached("c") {
        Err(Error::Overloaded(m)) => {
            assert!(m.contains("all 2 instances stayed busy for 300ms"), "{m}")
        }
        other => panic!("expected overloaded, got {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(300));
    drop(a);
    assert!(
        !cache.is_cached("c").unwrap(),
        "a freed instance serves the next call"
    );
    drop(b);
}

#[test]
fn memory_is_capped_across_all_instances_of_a_driver() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        memory_bytes: 8 << 20,
        instances: 64,
        ..Limits::default()
    };
    let cache = ImageCache::with_runtime(
        Runtime::new(limits, None).unwrap(),
        CacheConfig::new(dir.path()),
    )
    .unwrap();
    // Each write session holds an instance (and its memory) until it ends.
    let mut sessions = Vec::new();
    let fault = loop {
        match cache.open_for_write(&format!("image-{}", sessions.len())) {
            Ok(w) => sessions.push(w),
            Err(e) => break e,
        }
        assert!(sessions.len() < 64, "8 MiB cannot hold 64 instances");
    };
    assert!(
        fault
            .to_string()
            .contains("memory cap of 8388608 bytes across its instances"),
        "{fault}"
    );
    assert!(cache.driver().memory_used() <= 8 << 20);
    drop(sessions);
    cache.cache_reader("after", None, &b"ok"[..]).unwrap();
}

#[test]
fn opening_a_root_leaves_no_probe_in_it() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(Limits::default(), None).unwrap();
    for _ in 0..3 {
        let cache =
            ImageCache::with_runtime(runtime.clone(), CacheConfig::new(dir.path())).unwrap();
        assert!(cache.get_cached_images().unwrap().is_empty());
    }
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("probe")), "{names:?}");
}

#[test]
fn one_runtime_shared_by_a_hostile_and_a_good_driver() {
    let s = scene();
    let good_dir = tempfile::tempdir().unwrap();
    let good = Arc::new(
        ImageCache::with_runtime(s.cache.runtime().clone(), CacheConfig::new(good_dir.path()))
            .unwrap(),
    );
    good.cache_reader("1", None, &b"unaffected"[..]).unwrap();
    for attack in ["sql-heap-limit", "sql-attach", "sql-zeroblob"] {
        let _ = s.refusal(attack);
        assert!(good.is_cached("1").unwrap());
        assert_eq!(good.get_cached_images().unwrap().len(), 1);
    }
}
