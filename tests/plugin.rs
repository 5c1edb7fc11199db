//! An outsider's driver, built from `wit/` alone (tests/plugin: no code of
//! this project's guest crates) and loaded as an operator loads a plugin:
//! `--driver FILE --driver-sha256 HEX`, nothing granted beyond fs and clock.
//! Each of its attacks is refused by the host, and the next call works.

use std::path::Path;
use std::time::{Duration, Instant};

use image_cache::{
    CacheConfig, DriverSource, Error, Grants, ImageCache, Limits, LoadPolicy, Runtime,
};
use image_cache_tests::{assert_access_denied, cli_binary, third_party_plugin};

fn sha256(path: &Path) -> String {
    image_cache::runtime::sha256_hex(&std::fs::read(path).unwrap())
}

/// The plugin on `root`, pinned, as the library loads it for `--driver`.
fn plugin_cache(root: &Path) -> ImageCache {
    let plugin = third_party_plugin();
    let limits = Limits {
        call_deadline: Duration::from_millis(800),
        ..Limits::default()
    };
    let config = CacheConfig::new(root)
        .driver(DriverSource::File(plugin.to_path_buf()))
        .fallback_to_sqlite(false)
        .policy(LoadPolicy {
            sha256: Some(sha256(plugin)),
            grants: Grants::NONE,
            ..Default::default()
        });
    ImageCache::with_runtime(
        Runtime::new(limits, Some(image_cache_tests::artifact_dir())).unwrap(),
        config,
    )
    .unwrap()
}

#[test]
fn the_cli_loads_an_outsiders_plugin_pinned_and_refuses_its_escape() {
    let plugin = third_party_plugin();
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(cli_binary())
            .arg("--dir")
            .arg(dir.path())
            .arg("--driver")
            .arg(plugin)
            .args(["--no-fallback"])
            .args(args)
            .output()
            .unwrap()
    };
    let sha = sha256(plugin);
    // Pinned: loaded, and its escape is the host's refusal, an access
    // denied (exit 6) as the fs import answers it.
    let out = run(&["--driver-sha256", &sha, "status", "escape"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("`..` is not allowed"), "{stderr}");
    assert!(
        !stderr.contains(&dir.path().display().to_string()),
        "{stderr}"
    );
    // The next call works.
    let out = run(&["--driver-sha256", &sha, "status", "benign"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Another pin: refused before compiling.
    let out = run(&["--driver-sha256", &"0".repeat(64), "status", "benign"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not the pinned"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_outsiders_plugin_cannot_block_the_host_or_keep_a_lock() {
    let dir = tempfile::tempdir().unwrap();
    let cache = plugin_cache(dir.path());
    // A FIFO in the root: refused at once, not at the deadline.
    let fifo = std::ffi::CString::new(
        dir.path()
            .join("fifo")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let started = Instant::now();
    assert_access_denied(cache.is_cached("fifo").unwrap_err(), "not a regular file");
    assert!(started.elapsed() < Duration::from_millis(800));
    // A lock kept past the call: released when the call returned.
    assert!(cache.is_cached("hold-lock").unwrap());
    let native = rusqlite::Connection::open(dir.path().join("cache.db")).unwrap();
    native.busy_timeout(Duration::ZERO).unwrap();
    native
        .execute_batch("BEGIN EXCLUSIVE; CREATE TABLE t (x); COMMIT;")
        .expect("not locked out between calls");
    // A loop: stopped at the deadline; the next call works.
    match cache.is_cached("spin") {
        Err(Error::DriverFault { message, .. }) => {
            assert!(message.contains("deadline"), "{message}")
        }
        other => panic!("expected a fault at the deadline, got {other:?}"),
    }
    assert!(!cache.is_cached("benign").unwrap());
}

#[test]
fn an_outsiders_plugin_cannot_change_or_swap_an_images_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // Two images the host committed (and sealed) under the sqlite driver.
    {
        let cache = image_cache_tests::open(dir.path(), &DriverSource::Builtin("sqlite"));
        cache
            .cache_reader("source", None, &b"the other image"[..])
            .unwrap();
        cache
            .cache_reader("victim", None, &b"this image"[..])
            .unwrap();
    }
    let cache = plugin_cache(dir.path());
    assert_access_denied(
        cache.is_cached("write-image").unwrap_err(),
        "not a file a driver may write",
    );
    assert_eq!(
        std::fs::read(dir.path().join("source")).unwrap(),
        b"the other image"
    );
    let mut out = Vec::new();
    assert_access_denied(
        cache.read_image("victim", &mut out).unwrap_err(),
        "not a rename a driver may make",
    );
    assert!(out.is_empty(), "not a byte served");
    assert_eq!(
        std::fs::read(dir.path().join("victim")).unwrap(),
        b"this image"
    );
}
