//! Drivers as plugins: which contract a component speaks, what it may
//! touch, whether it is the component the operator meant, and going back
//! when a new one misbehaves.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use image_cache::contract::{Capability, SUPPORTED};
use image_cache::{
    CacheConfig, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy, RollbackPolicy,
    Runtime,
};
use image_cache_tests::{fixture, release, runtime};

fn load_error(result: image_cache::Result<impl Sized>) -> String {
    match result {
        Err(Error::Load { message, .. }) => message,
        Err(e) => panic!("expected a load error, got {e:?}"),
        Ok(_) => panic!("expected a load error, got a driver"),
    }
}

/// A fresh runtime (no artifact directory) whose compile counter starts at 0.
fn fresh_runtime() -> Arc<Runtime> {
    Runtime::new(Limits::default(), None).unwrap()
}

#[test]
fn components_of_earlier_contracts_are_refused_before_compiling() {
    let fixtures = [
        ("0.1.0", "sqlite_driver", "WASI"),
        ("0.1.0", "xattr_driver", "WASI"),
        // 0.2.0 runs through the adapter, but not with the import 0.3.0
        // retired: the message names the import and what to change.
        (
            "0.2.0",
            "sqlite_driver",
            "image-cache:driver/sqlite@0.2.0, which contract 0.3.0 retired",
        ),
    ];
    for (version, name, advice) in fixtures {
        let rt = fresh_runtime();
        let path = release(version, name);
        assert!(path.exists(), "{} is a committed fixture", path.display());
        let message = load_error(rt.component(
            &DriverSource::File(path),
            &LoadPolicy {
                sha256: None,
                grants: Grants::of(&Capability::ALL),
                ..Default::default()
            },
        ));
        assert!(
            (message.contains(&format!("image-cache:driver@{version}"))
                && message.contains(SUPPORTED)
                || message.contains(&format!("contract {version} drivers through an adapter")))
                && message.contains(advice)
                && message.contains("guest/sqlite-vfs") == (version == "0.2.0"),
            "{version} {name}: names its version, the supported range and what to change: \
             {message}"
        );
        assert_eq!(
            rt.stats.compiled.load(Ordering::Relaxed),
            0,
            "nothing compiled"
        );
    }
}

/// Release 0.2.0's drivers that import no `sqlite` run through the
/// contract adapter (the conformance suite runs them: `xattr_v0_2`,
/// `centralized_v0_2`); a swap to one and back works.
#[test]
fn release_0_2_drivers_without_sqlite_run_through_the_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let config = CacheConfig::new(dir.path()).policy(LoadPolicy {
        grants: Grants::of(&Capability::ALL),
        ..Default::default()
    });
    let cache = ImageCache::with_runtime(runtime(), config).unwrap();
    cache.cache_reader("kept", None, &b"bytes"[..]).unwrap();
    cache
        .swap_driver(&DriverSource::File(release("0.2.0", "xattr_driver")))
        .unwrap();
    assert!(
        cache
            .driver()
            .name()
            .ends_with("contract-0.2.0/xattr_driver.wasm")
    );
    let driver = cache.driver();
    let info = driver.info();
    assert_eq!(info.name, "xattr", "{info:?}");
    cache.cache_reader("new", None, &b"more bytes"[..]).unwrap();
    let mut read = Vec::new();
    cache.read_image("new", &mut read).unwrap();
    assert_eq!(read, b"more bytes");
    assert_eq!(cache.get_hit_count("new").unwrap(), 1);
    // A driver error of 0.2.0 (no fs code) arrives as an io error or as
    // what it was, never as a fault.
    assert!(matches!(
        cache.delete_cached_image("absent"),
        Ok(()) | Err(Error::NotFound(_))
    ));
    cache.swap_driver(&DriverSource::Builtin("sqlite")).unwrap();
    assert!(cache.is_cached("new").unwrap());
}

#[test]
fn a_previous_release_driver_is_refused_on_swap_and_the_cache_keeps_working() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(runtime(), CacheConfig::new(dir.path())).unwrap();
    cache.cache_reader("kept", None, &b"bytes"[..]).unwrap();
    for version in ["0.1.0", "0.2.0"] {
        let message =
            load_error(cache.swap_driver(&DriverSource::File(release(version, "sqlite_driver"))));
        assert!(message.contains(version), "{message}");
    }
    assert_eq!(cache.driver().name(), "sqlite");
    assert!(cache.is_cached("kept").unwrap());
}

/// A component that says it speaks a future contract.
fn future_component(dir: &Path, version: &str) -> PathBuf {
    let wat = format!(
        r#"(component
            (instance $driver)
            (export "image-cache:driver/cache-driver@{version}" (instance $driver))
        )"#
    );
    let path = dir.join(format!("future-{version}.wasm"));
    std::fs::write(&path, wat::parse_str(&wat).unwrap()).unwrap();
    path
}

#[test]
fn components_of_a_newer_contract_are_refused_with_the_supported_range() {
    let dir = tempfile::tempdir().unwrap();
    for version in ["0.4.0", "1.0.0", "0.3.1"] {
        let message = load_error(fresh_runtime().component(
            &DriverSource::File(future_component(dir.path(), version)),
            &LoadPolicy::default(),
        ));
        assert!(
            message.contains(&format!("image-cache:driver@{version}"))
                && message.contains(SUPPORTED),
            "{message}"
        );
    }
}

#[test]
fn something_that_is_not_a_driver_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_driver = dir.path().join("empty.wasm");
    std::fs::write(&not_a_driver, wat::parse_str("(component)").unwrap()).unwrap();
    let message = load_error(
        fresh_runtime().component(&DriverSource::File(not_a_driver), &LoadPolicy::default()),
    );
    assert!(
        message.contains("exports no image-cache:driver/cache-driver"),
        "{message}"
    );

    let wasi = dir.path().join("greedy.wasm");
    let wat = r#"(component
        (import "wasi:filesystem/preopens@0.2.6" (instance))
        (instance $driver)
        (export "image-cache:driver/cache-driver@0.3.0" (instance $driver))
    )"#;
    std::fs::write(&wasi, wat::parse_str(wat).unwrap()).unwrap();
    let message =
        load_error(fresh_runtime().component(&DriverSource::File(wasi), &LoadPolicy::default()));
    assert!(
        message.contains("wasi:filesystem/preopens@0.2.6")
            && message.contains("not part of the driver contract"),
        "{message}"
    );
}

/// A built-in driver, as a third party would ship it: a file.
fn as_a_file(dir: &Path, builtin: &image_cache::builtin::Builtin) -> PathBuf {
    let path = dir.join(format!("third-party-{}.wasm", builtin.name));
    std::fs::write(&path, builtin.component).unwrap();
    path
}

fn sqlite_as_a_file(dir: &Path) -> PathBuf {
    as_a_file(dir, &image_cache::builtin::SQLITE)
}

#[test]
fn an_ungranted_import_is_refused_at_load_naming_the_interface() {
    let dir = tempfile::tempdir().unwrap();
    let path = as_a_file(dir.path(), &image_cache::builtin::XATTR);
    let rt = fresh_runtime();
    let message =
        load_error(rt.component(&DriverSource::File(path.clone()), &LoadPolicy::default()));
    assert!(
        message.contains("image-cache:driver/xattr@0.3.0")
            && message.contains("not granted")
            && message.contains("image_cache_driver_grants = xattr"),
        "{message}"
    );
    assert_eq!(rt.stats.compiled.load(Ordering::Relaxed), 0);

    // Granted database only: still refused (it asks for xattr).
    let database_only = LoadPolicy {
        sha256: None,
        grants: Grants::of(&[Capability::Database]),
        ..Default::default()
    };
    assert!(
        load_error(rt.component(&DriverSource::File(path.clone()), &database_only))
            .contains("xattr@0.3.0")
    );

    // Granted what it needs: it runs, through the cache, as a third party.
    let granted = LoadPolicy {
        sha256: None,
        grants: Grants::of(&[Capability::Xattr]),
        ..Default::default()
    };
    let root = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(
        runtime(),
        CacheConfig::new(root.path())
            .driver(DriverSource::File(path))
            .fallback_to_sqlite(false)
            .policy(granted),
    )
    .unwrap();
    assert_eq!(
        cache.driver().component().grants(),
        Grants::of(&[Capability::Xattr])
    );
    cache.cache_reader("1", None, &b"third party"[..]).unwrap();
    assert!(cache.is_cached("1").unwrap());
}

#[test]
fn the_sqlite_driver_needs_no_grant_beyond_fs() {
    // SQLite runs inside it: a third party's copy loads with nothing granted.
    let dir = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(
        runtime(),
        CacheConfig::new(root.path())
            .driver(DriverSource::File(sqlite_as_a_file(dir.path())))
            .fallback_to_sqlite(false)
            .policy(LoadPolicy::default()),
    )
    .unwrap();
    assert_eq!(cache.driver().component().grants(), Grants::NONE);
    assert!(
        cache
            .driver()
            .component()
            .manifest()
            .imports
            .iter()
            .all(|i| i.ends_with("@0.3.0") && !i.contains("/sqlite@")),
        "{:?}",
        cache.driver().component().manifest().imports
    );
    cache.cache_reader("1", None, &b"third party"[..]).unwrap();
    assert_eq!(cache.get_hit_count("1").unwrap(), 0);
}

#[test]
fn a_wrong_sha256_is_refused_before_compiling() {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite_as_a_file(dir.path());
    let right = image_cache::runtime::sha256_hex(image_cache::builtin::SQLITE.component);
    let rt = fresh_runtime();
    let wrong = LoadPolicy {
        sha256: Some("0".repeat(64)),
        grants: Grants::NONE,
        ..Default::default()
    };
    let message = load_error(rt.component(&DriverSource::File(path.clone()), &wrong));
    assert!(
        message.contains(&right)
            && message.contains("not the pinned")
            && message.contains("before compiling"),
        "{message}"
    );
    assert_eq!(
        rt.stats.compiled.load(Ordering::Relaxed),
        0,
        "refused before compiling"
    );

    let pinned = LoadPolicy {
        sha256: Some(right.to_uppercase()),
        grants: Grants::NONE,
        ..Default::default()
    };
    let component = rt
        .component(&DriverSource::File(path.clone()), &pinned)
        .unwrap();
    assert_eq!(component.sha256(), right);
    // Loaded once, the pin is still checked on the next load.
    assert!(load_error(rt.component(&DriverSource::File(path), &wrong)).contains("not the pinned"));
}

#[test]
fn rollback_swaps_back_to_the_previous_driver() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(runtime(), CacheConfig::new(dir.path())).unwrap();
    match cache.rollback() {
        Err(Error::NotFound(m)) => assert!(m.contains("no previous driver"), "{m}"),
        other => panic!("nothing to roll back to yet: {other:?}"),
    }
    cache.cache_reader("a", None, &b"bytes"[..]).unwrap();
    cache.swap_driver(&DriverSource::Builtin("xattr")).unwrap();
    assert_eq!(cache.driver().name(), "xattr");
    cache.rollback().unwrap();
    assert_eq!(cache.driver().name(), "sqlite");
    assert!(cache.is_cached("a").unwrap());
    assert_eq!(cache.stats.rollbacks.load(Ordering::Relaxed), 1);
    // And forward again: the rolled-back driver is the one to go back to.
    cache.rollback().unwrap();
    assert_eq!(cache.driver().name(), "xattr");
}

/// A swapped-in driver that faults more than the policy allows within its
/// window is rolled back by itself, while other threads keep calling; none
/// of their calls fails.
#[test]
fn a_faulting_new_driver_is_rolled_back_automatically_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let quick = Limits {
        call_deadline: Duration::from_secs(10),
        ..Limits::default()
    };
    let rt = Runtime::new(quick, None).unwrap();
    let cache = Arc::new(
        ImageCache::with_runtime(
            rt,
            CacheConfig::new(dir.path()).policy(LoadPolicy {
                sha256: None,
                grants: Grants::of(&[Capability::Xattr]),
                ..Default::default()
            }),
        )
        .unwrap(),
    );
    cache.cache_reader("steady", None, &b"bytes"[..]).unwrap();
    cache.set_rollback_policy(Some(RollbackPolicy {
        max_faults: 3,
        window: Duration::from_secs(60),
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let calls = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(5));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (cache, stop, calls, start) =
                (cache.clone(), stop.clone(), calls.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    // Benign traffic: both drivers answer it without fault.
                    cache
                        .is_cacheable("benign")
                        .unwrap_or_else(|e| panic!("a benign call failed: {e}"));
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    start.wait();
    cache
        .swap_driver(&DriverSource::File(fixture("hostile_driver")))
        .unwrap();
    let mut faults = 0;
    while cache.driver().name() != "sqlite" {
        assert!(cache.is_cached("panic").is_err());
        faults += 1;
        assert!(faults <= 4, "rolled back after more than 3 faults");
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("no benign call failed");
    }
    assert_eq!(faults, 4, "the fourth fault rolls back");
    let reason = cache.last_rollback().expect("the reason is kept");
    assert!(
        reason.contains("faulted 4 times") && reason.contains("rolled back to sqlite"),
        "{reason}"
    );
    assert_eq!(cache.stats.rollbacks.load(Ordering::Relaxed), 1);
    assert!(calls.load(Ordering::Relaxed) > 0);
    assert!(cache.is_cached("steady").unwrap());
}

/// `drivers inspect` reads what a component says of itself from its bytes
/// (its `image-cache:driver-info` section): nothing is compiled or run, and
/// the driver's words come out printable, one field per line.
#[test]
fn inspect_runs_no_driver_code_and_shows_its_words_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("talker.wasm");
    let wat = r#"(component
        (core module
            (@custom "image-cache:driver-info" "evil\1b[2J\e2\80\ae\0a1.0\0aline one\0a  sha256: fake")
            (func (export "run") unreachable))
        (instance $driver)
        (export "image-cache:driver/cache-driver@0.3.0" (instance $driver))
    )"#;
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    let rt = fresh_runtime();
    let inspection = rt.inspect(&DriverSource::File(path)).unwrap();
    assert_eq!(rt.stats.compiled.load(Ordering::Relaxed), 0, "not compiled");
    assert_eq!(rt.stats.instances.load(Ordering::Relaxed), 0, "not run");
    let info = inspection.declared.info.expect("the section is read");
    assert_eq!(info.name, "evil?[2J?");
    assert_eq!(info.version, "1.0");
    assert!(
        !info.description.contains('\n') && info.description.contains("line one?  sha256: fake"),
        "{info:?}"
    );
    // Built-in drivers declare themselves the same way.
    let builtin = rt.inspect(&DriverSource::Builtin("sqlite")).unwrap();
    let info = builtin.declared.info.expect("sqlite declares itself");
    assert_eq!(
        (info.name.as_str(), info.version.as_str()),
        ("sqlite", "0.3.0")
    );
    assert_eq!(rt.stats.compiled.load(Ordering::Relaxed), 0);
}

/// The built-in drivers, signed at build time (tests/build.rs, with a key
/// made for the build), load as component files under that key and work;
/// the same bytes unsigned are refused, and the signature names the key.
#[test]
fn built_in_drivers_signed_at_build_time_load_under_their_key() {
    use image_cache::signature::{self, TrustedKeys};

    let key = image_cache_tests::builtin_signing_key();
    let trusted = Arc::new(TrustedKeys::from_files(&[key]).unwrap());
    let policy = LoadPolicy {
        trusted_keys: Some(trusted.clone()),
        grants: Grants::of(&Capability::ALL),
        ..Default::default()
    };
    let rt = fresh_runtime();
    for (name, builtin) in [
        ("sqlite_driver", &image_cache::builtin::SQLITE),
        ("xattr_driver", &image_cache::builtin::XATTR),
        ("centralized_driver", &image_cache::builtin::CENTRALIZED),
    ] {
        let path = image_cache_tests::signed_builtin(name);
        let bytes = std::fs::read(&path).unwrap();
        let report = signature::verify_report(&bytes, None, &trusted).unwrap();
        assert_eq!(report.verified_by.len(), 1, "{name}: {report:?}");
        let component = rt
            .component(&DriverSource::File(path.clone()), &policy)
            .unwrap();
        assert_eq!(component.sha256(), image_cache::runtime::sha256_hex(&bytes));
        // The same code, unsigned, is refused under the key.
        let dir = tempfile::tempdir().unwrap();
        let unsigned = dir.path().join(format!("{name}.wasm"));
        std::fs::write(&unsigned, builtin.component).unwrap();
        let message = load_error(rt.component(&DriverSource::File(unsigned), &policy));
        assert!(
            message.starts_with("it carries no signature"),
            "{name}: {message}"
        );
    }
    // A signed built-in runs: a cache on it caches and lists.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    std::fs::write(&image, b"bytes").unwrap();
    let config = CacheConfig::new(dir.path().join("cache"))
        .driver(DriverSource::File(image_cache_tests::signed_builtin(
            "sqlite_driver",
        )))
        .fallback_to_sqlite(false)
        .policy(policy);
    let cache = ImageCache::with_runtime(rt.clone(), config).unwrap();
    cache.cache_file("signed", &image, None).unwrap();
    assert_eq!(cache.get_cached_images().unwrap().len(), 1);
}

/// Under trusted keys a component file loads only if one of them signed
/// exactly its bytes (embedded, or in `<file>.sig`); anything else is
/// refused before it is compiled, naming the key ids found and trusted,
/// and a component compiled earlier is no way around it. Built-in drivers
/// are part of the binary and pass; a swap keeps the cache's keys.
#[test]
fn under_trusted_keys_only_a_signed_driver_loads_and_others_are_refused_before_compiling() {
    use image_cache::signature::{self, SigningKey, TrustedKeys};

    let dir = tempfile::tempdir().unwrap();
    let ours = signature::generate_key_pair();
    let theirs = signature::generate_key_pair();
    let signer = SigningKey::from_bytes(&ours.secret_key).unwrap();
    let stranger = SigningKey::from_bytes(&theirs.secret_key).unwrap();
    let key_file = dir.path().join("ours.pub");
    std::fs::write(&key_file, &ours.public_key).unwrap();
    let trusted = Arc::new(TrustedKeys::from_files(&[key_file]).unwrap());
    let policy = LoadPolicy {
        trusted_keys: Some(trusted),
        ..Default::default()
    };
    let unsigned = image_cache::builtin::SQLITE.component;
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        DriverSource::File(path)
    };
    let (signed, _) = signature::sign(unsigned, &signer, false).unwrap();
    let (by_stranger, _) = signature::sign(unsigned, &stranger, false).unwrap();
    let mut tampered = signed.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;

    let rt = fresh_runtime();
    let compiled = || rt.stats.compiled.load(Ordering::Relaxed);
    let message = load_error(rt.component(&file("unsigned.wasm", unsigned), &policy));
    assert!(
        message.starts_with("it carries no signature")
            && message.contains(&format!(
                "signed by one of the trusted keys (key id {})",
                ours.key_id
            ))
            && message.ends_with("refused before compiling it"),
        "{message}"
    );
    let message = load_error(rt.component(&file("stranger.wasm", &by_stranger), &policy));
    assert!(
        message.starts_with("no trusted key verifies it")
            && message.contains(&format!("signature by key id {}", theirs.key_id))
            && message.contains(&format!("(trusted: key id {})", ours.key_id)),
        "{message}"
    );
    let message = load_error(rt.component(&file("tampered.wasm", &tampered), &policy));
    assert!(
        message.contains(&format!(
            "the signature by trusted key id {} does not match its bytes",
            ours.key_id
        )),
        "{message}"
    );
    // Bytes of no file (load_bytes) must carry their signature too.
    let message = load_error(rt.load_bytes("bytes", unsigned, &policy, Grants::NONE));
    assert!(message.starts_with("it carries no signature"), "{message}");
    assert_eq!(compiled(), 0, "nothing refused was compiled");

    let component = rt
        .component(&file("signed.wasm", &signed), &policy)
        .unwrap();
    assert_eq!(
        component.sha256(),
        image_cache::runtime::sha256_hex(&signed)
    );
    assert_eq!(
        compiled(),
        1,
        "the signed component compiles (and runs, below)"
    );
    rt.load_bytes("bytes", &signed, &policy, Grants::NONE)
        .unwrap();

    // A detached signature beside the unchanged component.
    let (_, sig) = signature::sign(unsigned, &signer, true).unwrap();
    let detached = file("detached.wasm", unsigned);
    std::fs::write(dir.path().join("detached.wasm.sig"), sig.unwrap()).unwrap();
    rt.component(&detached, &policy).unwrap();
    // Compiled and memoized now, the same bytes without the .sig are still
    // refused.
    std::fs::remove_file(dir.path().join("detached.wasm.sig")).unwrap();
    assert!(load_error(rt.component(&detached, &policy)).starts_with("it carries no signature"));
    // A built-in driver is part of the binary: no signature needed.
    rt.component(&DriverSource::Builtin("sqlite"), &policy)
        .unwrap();

    // A cache's swaps (the server's swap endpoint and SIGHUP) keep its keys.
    let root = tempfile::tempdir().unwrap();
    let cache =
        ImageCache::with_runtime(rt.clone(), CacheConfig::new(root.path()).policy(policy)).unwrap();
    match cache.swap_driver(&file("unsigned.wasm", unsigned)) {
        Err(Error::Load { message, .. }) => assert!(message.contains("no signature"), "{message}"),
        other => panic!("the swap must be refused: {other:?}"),
    }
    assert_eq!(cache.driver().name(), "sqlite", "the old driver stays");
    cache.swap_driver(&file("signed.wasm", &signed)).unwrap();
    cache.cache_reader("signed", None, &b"bytes"[..]).unwrap();
    assert!(cache.is_cached("signed").unwrap());
}

/// A cache on sqlite with `policy`, and a swap to the hostile fixture,
/// which faults (panics) on `is-cached("panic")`, breaks the contract in
/// its listing (out of order) and overcounts `record-reads`.
fn swapped_to_a_faulting_driver(dir: &Path, policy: image_cache::FailPolicy) -> Arc<ImageCache> {
    let cache = ImageCache::with_runtime(
        runtime(),
        CacheConfig::new(dir)
            .policy(LoadPolicy {
                sha256: None,
                grants: Grants::of(&[Capability::Xattr]),
                ..Default::default()
            })
            .fail_policy(policy),
    )
    .unwrap();
    assert_eq!(cache.fail_policy(), policy);
    cache.cache_reader("steady", None, &b"bytes"[..]).unwrap();
    cache
        .swap_driver(&DriverSource::File(fixture("hostile_driver")))
        .unwrap();
    assert_eq!(cache.driver().info().name, "hostile");
    Arc::new(cache)
}

/// fail-reload: the first call that faults rolls the cache back to the
/// driver before the swap and runs once more there; 8 concurrent callers
/// all get the restored driver's answer (no error reaches any of them),
/// and the rollback happens, and is counted, once.
#[test]
fn fail_reload_retries_a_faulting_call_on_the_previous_driver() {
    use image_cache::FailPolicy;
    let dir = tempfile::tempdir().unwrap();
    let cache = swapped_to_a_faulting_driver(dir.path(), FailPolicy::Reload);
    let start = Arc::new(Barrier::new(8));
    let callers: Vec<_> = (0..8)
        .map(|_| {
            let (cache, start) = (cache.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                cache.is_cached("panic")
            })
        })
        .collect();
    for c in callers {
        match c.join().unwrap() {
            Ok(cached) => assert!(!cached),
            Err(e) => panic!("an error reached the caller under fail-reload: {e}"),
        }
    }
    assert_eq!(cache.driver().name(), "sqlite");
    assert_eq!(cache.fail_reloads(), 1);
    assert_eq!(cache.stats.fail_reloads.load(Ordering::Relaxed), 1);
    assert_eq!(cache.stats.rollbacks.load(Ordering::Relaxed), 1);
    assert!(cache.stats.driver_faults.load(Ordering::Relaxed) >= 1);
    let reason = cache.last_rollback().expect("the reason is kept");
    assert!(
        reason.contains("hostile_driver.wasm faulted")
            && reason.contains("fail-reload rolled back to sqlite"),
        "{reason}"
    );
    assert!(cache.is_cached("steady").unwrap());

    // Other operations too: a listing that breaks the contract is answered
    // by the restored driver, with its own images...
    cache.rollback().unwrap();
    assert_eq!(cache.driver().info().name, "hostile");
    let listed = cache
        .get_cached_images()
        .expect("answered after the reload");
    assert_eq!(
        listed
            .iter()
            .map(|i| i.image_id.as_str())
            .collect::<Vec<_>>(),
        ["steady"]
    );
    assert_eq!(cache.driver().name(), "sqlite");
    assert_eq!(cache.fail_reloads(), 2);
    // ... and so is a batch of reads the driver miscounts.
    cache.rollback().unwrap();
    let reads = [image_cache::ReadRecord {
        image_id: "record-reads-overcount".to_string(),
        accessed: 1.7e9,
    }];
    assert_eq!(cache.record_reads(&reads).unwrap(), 0);
    assert_eq!(cache.driver().name(), "sqlite");
    assert_eq!(cache.fail_reloads(), 3);

    // Without a driver to go back to, the fault stands.
    let alone = tempfile::tempdir().unwrap();
    let first = ImageCache::with_runtime(
        runtime(),
        CacheConfig::new(alone.path())
            .driver(DriverSource::File(fixture("hostile_driver")))
            .policy(LoadPolicy {
                sha256: None,
                grants: Grants::of(&[Capability::Xattr]),
                ..Default::default()
            })
            .fallback_to_sqlite(false)
            .fail_policy(FailPolicy::Reload),
    )
    .unwrap();
    assert!(matches!(
        first.is_cached("panic"),
        Err(Error::DriverFault { .. })
    ));
    assert_eq!(first.fail_reloads(), 0);
    assert_eq!(first.driver().info().name, "hostile");
    // A retry that faults too: the error stands. And a driver put back
    // after a fault is not rolled back again (to the one that faulted).
    first
        .swap_driver(&DriverSource::File(fixture("hostile_driver")))
        .unwrap();
    for _ in 0..3 {
        assert!(matches!(
            first.is_cached("panic"),
            Err(Error::DriverFault { .. })
        ));
    }
    assert_eq!(first.fail_reloads(), 1, "one rollback, no flip-flop");
    assert_eq!(first.stats.swaps.load(Ordering::Relaxed), 2);
    assert_eq!(first.stats.driver_faults.load(Ordering::Relaxed), 5);
}

/// fail-closed (the default) and fail-open (which a library cannot do
/// more for: it has no upstream) let the fault reach the caller and keep
/// the driver; switched to fail-reload, the next call is answered.
#[test]
fn fail_closed_and_fail_open_let_the_fault_reach_the_caller() {
    use image_cache::FailPolicy;
    assert_eq!(CacheConfig::new("/x").fail_policy, FailPolicy::Closed);
    for policy in [FailPolicy::Closed, FailPolicy::Open] {
        let dir = tempfile::tempdir().unwrap();
        let cache = swapped_to_a_faulting_driver(dir.path(), policy);
        for _ in 0..3 {
            match cache.is_cached("panic") {
                Err(Error::DriverFault { driver, .. }) => {
                    assert!(driver.contains("hostile"), "{driver}")
                }
                other => panic!("{policy}: the fault must reach the caller, got {other:?}"),
            }
        }
        assert_eq!(cache.driver().info().name, "hostile", "{policy}");
        assert_eq!(cache.fail_reloads(), 0);
        assert_eq!(cache.stats.rollbacks.load(Ordering::Relaxed), 0);
        assert_eq!(cache.stats.driver_faults.load(Ordering::Relaxed), 3);
        cache.set_fail_policy(FailPolicy::Reload);
        assert!(!cache.is_cached("panic").unwrap(), "{policy}");
        assert_eq!(cache.driver().name(), "sqlite");
        assert_eq!(cache.fail_reloads(), 1);
    }
}
