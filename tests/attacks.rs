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

use image_cache::error::IoCode;
use image_cache::{
    CacheConfig, Capability, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy, Runtime,
};
use image_cache_tests::{assert_access_denied, canary_state, fixture};

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
            grants: Grants::of(&[Capability::Xattr]),
            ..Default::default()
        });
    config.driver_options = vec![(
        "hostile_target".to_string(),
        canary.join("victim.db").display().to_string(),
    )];
    let cache = ImageCache::with_runtime(
        Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap(),
        config,
    )
    .unwrap();
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
fn sql_inside_the_driver_cannot_reach_files_outside_the_root() {
    let s = scene();
    // SQLite runs inside the driver: ATTACH and VACUUM INTO open their
    // targets through the VFS on `fs`, which refuses paths out of the root.
    for attack in ["sql-attach", "sql-attach-relative", "sql-vacuum-into"] {
        match s.refusal(attack) {
            Error::Database(m) => assert!(m.contains("unable to open"), "{attack}: {m}"),
            e => panic!("{attack}: expected a database error, got {e:?}"),
        }
    }
    assert!(!s.canary.join("victim.db-journal").exists());
}

#[test]
fn one_sqlite_opcode_is_stopped_at_the_deadline() {
    let s = scene();
    let started = Instant::now();
    // instr() on a 4M-char haystack with a 2M-char needle: one VDBE opcode
    // for minutes. As wasm, it is stopped by the epoch like any loop.
    let m = s.fault("sql-instr");
    let took = started.elapsed();
    assert!(m.contains("ran past its deadline"), "{m}");
    eprintln!(
        "sql-instr stopped {:?} past a deadline of {DEADLINE:?}",
        took.saturating_sub(DEADLINE)
    );
    // Generous: a shared machine; the point is "stopped", not "waited out".
    assert!(
        took < DEADLINE + Duration::from_secs(3),
        "stopped: {took:?}"
    );
}

#[test]
fn the_memory_of_a_statement_stays_under_the_drivers_cap() {
    let s = scene();
    // ORDER BY over 64 values of 16 MB: SQLite inside the driver runs out of
    // its heap (or the driver out of its 64 MiB cap), never the host.
    match s.cache.is_cached("sql-sort-memory") {
        Err(Error::Database(m)) => assert!(m.contains("out of memory"), "{m}"),
        Err(Error::DriverFault { message, .. }) => {
            assert!(message.contains("memory"), "{message}")
        }
        other => panic!("expected the statement to fail, got {other:?}"),
    }
    let driver = s.cache.driver();
    assert!(
        driver.memory_used() <= 64 << 20,
        "{} bytes",
        driver.memory_used()
    );
    assert!(!s.cache.is_cached("benign").unwrap(), "next call works");
}

#[test]
fn a_byte_range_lock_never_outlives_the_call_that_took_it() {
    let s = scene();
    let db = s.root.join("cache.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("CREATE TABLE IF NOT EXISTS t (x)")
        .unwrap();
    // The driver locks all of cache.db and keeps the file open past the
    // call; the host released the lock when the call returned.
    assert!(s.cache.is_cached("hold-range-lock").unwrap());
    let native = rusqlite::Connection::open(&db).unwrap();
    native.busy_timeout(Duration::ZERO).unwrap();
    native
        .execute_batch("BEGIN EXCLUSIVE; INSERT INTO t VALUES (1); COMMIT;")
        .expect("a native writer is not locked out between calls");
}

/// Plant an entry in the root, as another process could.
fn plant(s: &Scene, make: impl FnOnce(&Path)) {
    std::fs::create_dir_all(&s.root).unwrap();
    make(&s.root);
}

#[test]
fn a_planted_fifo_is_refused_without_blocking() {
    let s = scene();
    plant(&s, |root| {
        let path = std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    });
    let started = Instant::now();
    assert_access_denied(s.refusal("open-fifo"), "not a regular file");
    assert!(
        started.elapsed() < DEADLINE,
        "refused at once, not at the deadline"
    );
}

#[test]
fn a_planted_hard_link_is_refused() {
    let s = scene();
    let secret = s.canary.join("secret");
    plant(&s, |root| {
        std::fs::hard_link(&secret, root.join("hardlink")).unwrap()
    });
    assert_access_denied(s.refusal("open-hardlink"), "hard links");
    // Canary untouched (Scene's Drop compares it), its link count aside.
    std::fs::remove_file(s.root.join("hardlink")).unwrap();
}

#[test]
fn a_driver_cannot_write_the_bytes_of_an_image() {
    let s = scene();
    assert_access_denied(s.refusal("write-image"), "not a file a driver may write");
    assert_eq!(std::fs::read(s.root.join("hostile-image")).unwrap(), b"");
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
fn a_time_before_1970_is_an_error_not_a_host_panic() {
    let s = scene();
    match s.refusal("set-times-negative") {
        Error::Io { code, message: m } => assert!(
            code == IoCode::InvalidArgument && m.contains("not a usable time"),
            "{m}"
        ),
        e => panic!("expected the host's refusal, got {e:?}"),
    }
}

#[test]
fn a_flood_of_error_text_is_cut_and_made_printable() {
    let s = scene();
    match s.refusal("error-flood") {
        Error::Io { message: m, .. } => {
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
        Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap(),
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
        Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap(),
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
    let runtime = Runtime::new(Limits::default(), Some(image_cache_tests::artifact_dir())).unwrap();
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
    for attack in ["sql-attach", "sql-instr", "sql-sort-memory", "spin"] {
        let _ = s.refusal(attack);
        assert!(good.is_cached("1").unwrap());
        assert_eq!(good.get_cached_images().unwrap().len(), 1);
    }
}

#[test]
fn a_driver_cannot_serve_one_images_bytes_as_another() {
    let s = scene();
    // Two images committed by the host (sealed with their ids).
    {
        let good = ImageCache::with_runtime(
            s.cache.runtime().clone(),
            CacheConfig::new(&s.root).fallback_to_sqlite(false),
        )
        .unwrap();
        good.cache_reader("swap-source", None, &b"the other image"[..])
            .unwrap();
        good.cache_reader("swapped", None, &b"this image"[..])
            .unwrap();
    }
    // The hostile driver renames one over the other: the host refuses the
    // rename (nothing moves onto an image's name but its own fill).
    let mut out = Vec::new();
    assert_access_denied(
        s.cache.read_image("swapped", &mut out).unwrap_err(),
        "not a rename a driver may make",
    );
    assert!(out.is_empty(), "not a byte served");
    // Another process does the same (whatever is in the root): the seal
    // catches it before a byte is served.
    std::fs::rename(s.root.join("swap-source"), s.root.join("swapped")).unwrap();
    let discarded = s.discarded();
    let good = ImageCache::with_runtime(
        s.cache.runtime().clone(),
        CacheConfig::new(&s.root).fallback_to_sqlite(false),
    )
    .unwrap();
    match good.read_image("swapped", &mut out) {
        Err(Error::DriverFault { message, .. }) => assert!(
            message.contains("committed as \"swap-source\""),
            "{message}"
        ),
        other => panic!("expected the seal to refuse it, got {other:?}"),
    }
    assert!(out.is_empty(), "not a byte served");
    assert_eq!(s.discarded(), discarded + 1);
    // The seal is the host's: a driver can neither write nor list it.
    let file = std::fs::File::open(s.root.join("swapped")).unwrap();
    assert_eq!(
        image_cache::xattr::read_seal(&file).unwrap(),
        image_cache::xattr::Seal::Id(b"swap-source".to_vec())
    );
    assert!(
        image_cache::xattr::check_name(image_cache::xattr::SEAL)
            .unwrap_err()
            .message
            .contains("the host's own")
    );
}
