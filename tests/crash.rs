//! Killed processes: a writer killed mid-image leaves its file in
//! `incomplete/`, never a partial image under the final name, and the image
//! can be cached again at once (its lock died with it), not a day later.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use image_cache::{CacheConfig, DriverSource, Error, ImageCache};
use image_cache_tests::{age_file, cli_binary, runtime};

fn open(root: &std::path::Path, driver: &str) -> ImageCache {
    let config = CacheConfig::new(root).driver(DriverSource::Builtin(if driver == "sqlite" {
        "sqlite"
    } else {
        "xattr"
    }));
    ImageCache::with_runtime(runtime(), config).unwrap()
}

#[test]
fn a_killed_writer_leaves_no_image_and_blocks_nothing() {
    for driver in ["sqlite", "xattr"] {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let mut child = Command::new(cli_binary())
            .args(["--dir"])
            .arg(&root)
            .args(["--driver", driver, "cache", "victim", "--from", "-"])
            .env("XDG_CACHE_HOME", dir.path().join("xdg"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Feed part of an image, wait until it is being written, then kill.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&vec![42u8; 3 << 20]).unwrap();
        let partial = root.join("incomplete/victim");
        let started = Instant::now();
        while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "{driver}: the writer never started"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        drop(stdin);

        let cache = open(&root, driver);
        assert!(
            !cache.is_cached("victim").unwrap(),
            "{driver}: no partial image under the final name"
        );
        assert!(cache.is_being_cached("victim").unwrap());
        assert!(cache.get_cached_images().unwrap().is_empty());

        // Moments later the file may still belong to a live writer.
        assert!(
            matches!(cache.open_for_write("victim"), Err(Error::BeingCached(_))),
            "{driver}"
        );
        // Once it has been left alone a while, the dead writer's file goes
        // to invalid/ and the image caches normally.
        age_file(&partial, Duration::from_secs(60));
        cache
            .cache_reader("victim", None, &b"complete image"[..])
            .unwrap();
        let mut out = Vec::new();
        cache.read_image("victim", &mut out).unwrap();
        assert_eq!(out, b"complete image");
        assert!(!partial.exists());
        assert!(
            root.join("invalid/victim").exists(),
            "{driver}: the dead writer's bytes are kept for clean"
        );
    }
}

#[test]
fn a_live_writer_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let cache = open(dir.path(), "sqlite");
    let mut writer = cache.open_for_write("busy").unwrap();
    writer.write_all(b"slow download").unwrap();
    // Even when its file looks old, its lock says it is alive.
    age_file(
        &dir.path().join("incomplete/busy"),
        Duration::from_secs(3600),
    );
    assert!(matches!(
        cache.open_for_write("busy"),
        Err(Error::BeingCached(_))
    ));
    writer.commit(None).unwrap();
    let mut out = Vec::new();
    cache.read_image("busy", &mut out).unwrap();
    assert_eq!(out, b"slow download");
}
