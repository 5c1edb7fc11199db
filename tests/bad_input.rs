//! Bad input never touches anything: invalid image ids are refused before
//! any file is read, created or deleted, and an unusable root is a
//! bad-configuration error naming the root.

use image_cache::{CacheConfig, DriverSource, Error, ImageCache};
use image_cache_tests::{TestCache, bad_configuration, for_each_driver, runtime, snapshot};

/// Every kind of id the specification (docs/src/spec.md) rejects.
fn invalid_ids() -> Vec<String> {
    vec![
        String::new(),
        ".".into(),
        "..".into(),
        "../escape".into(),
        "a/b".into(),
        "/etc/passwd".into(),
        "a\\b".into(),
        "nul\0byte".into(),
        "new\nline".into(),
        "tab\tid".into(),
        "bell\x07".into(),
        "del\x7f".into(),
        // Invisible formatting: an id that would print as another.
        "gpj.\u{202e}exe".into(),
        "zero\u{200b}width".into(),
        "\u{feff}bom".into(),
        "x".repeat(256),
    ]
}

for_each_driver!(every_operation_rejects_invalid_ids, long_but_valid_ids_work);

fn every_operation_rejects_invalid_ids(driver: &DriverSource) {
    let t = TestCache::new(driver);
    t.put("victim", b"must survive");
    t.cache.queue_image("queued").unwrap();
    // Things an escaping id could reach.
    std::fs::write(t.root().join("incomplete").join("x"), b"partial").unwrap();
    let before = snapshot(t.root());
    let c = &t.cache;
    for id in invalid_ids() {
        let id = id.as_str();
        let results: Vec<(&str, Result<(), Error>)> = vec![
            ("is_cached", c.is_cached(id).map(drop)),
            ("is_being_cached", c.is_being_cached(id).map(drop)),
            ("is_cacheable", c.is_cacheable(id).map(drop)),
            ("is_queued", c.is_queued(id).map(drop)),
            ("queue_image", c.queue_image(id).map(drop)),
            ("get_hit_count", c.get_hit_count(id).map(drop)),
            ("get_image_size", c.get_image_size(id).map(drop)),
            ("delete_cached_image", c.delete_cached_image(id)),
            ("delete_queued_image", c.delete_queued_image(id)),
            ("open_for_write", c.open_for_write(id).map(drop)),
            ("open_for_read", c.open_for_read(id).map(drop)),
            (
                "cache_reader",
                c.cache_reader(id, None, &b"data"[..]).map(drop),
            ),
            (
                "cache_stream",
                c.cache_stream(id, None, &b"data"[..], std::io::sink())
                    .map(drop),
            ),
        ];
        for (op, result) in results {
            match result {
                Err(Error::InvalidImageId(message)) => {
                    assert!(message.starts_with("invalid image id"), "{op}: {message}");
                    assert!(
                        !message.contains('\n'),
                        "{op}: one-line message: {message:?}"
                    );
                }
                other => panic!("{op}({id:?}) should be an invalid-image-id error, got {other:?}"),
            }
        }
    }
    assert_eq!(
        snapshot(t.root()),
        before,
        "rejected ids touched the cache directory"
    );
    assert_eq!(t.get("victim"), b"must survive");
}

fn long_but_valid_ids_work(driver: &DriverSource) {
    let t = TestCache::new(driver);
    for id in [
        "x".repeat(255),
        "ünïcödé-ïd".into(),
        "with space".into(),
        ".hidden".into(),
        "...".into(),
    ] {
        t.put(&id, id.as_bytes());
        assert_eq!(t.get(&id), id.as_bytes());
    }
}

fn open_root(path: &std::path::Path, driver: DriverSource) -> Result<ImageCache, Error> {
    let config = CacheConfig::new(path)
        .driver(driver)
        .fallback_to_sqlite(false);
    ImageCache::with_runtime(runtime(), config)
}

#[test]
fn a_root_that_is_a_file_is_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    for driver in ["sqlite", "xattr"] {
        let m = bad_configuration(open_root(&file, DriverSource::Builtin(driver)));
        assert!(m.contains(&file.display().to_string()), "{m}");
        assert!(m.contains("not a directory"), "{m}");
    }
    assert_eq!(std::fs::read(&file).unwrap(), b"x", "the file is untouched");
}

#[test]
fn a_root_that_cannot_be_created_is_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), b"x").unwrap();
    let root = dir.path().join("file").join("cache");
    let m = bad_configuration(open_root(&root, DriverSource::Builtin("sqlite")));
    assert!(
        m.contains(&root.display().to_string()) && m.contains("cannot"),
        "{m}"
    );
}

#[test]
fn staging_directory_replaced_by_a_file_is_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("queue"), b"oops").unwrap();
    let m = bad_configuration(open_root(dir.path(), DriverSource::Builtin("sqlite")));
    assert!(
        m.contains("queue/") && m.contains(&dir.path().display().to_string()),
        "{m}"
    );
}

#[test]
fn a_database_that_is_not_sqlite_is_a_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cache.db"), vec![0xAB; 4096]).unwrap();
    let m = bad_configuration(open_root(dir.path(), DriverSource::Builtin("sqlite")));
    assert!(m.contains("cache.db"), "{m}");
    assert_eq!(
        std::fs::read(dir.path().join("cache.db")).unwrap(),
        vec![0xAB; 4096],
        "not overwritten"
    );
}

#[test]
fn a_sqlite_db_option_outside_the_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["../elsewhere.db", "/tmp/abs.db", "sub/dir.db", ""] {
        let mut config = CacheConfig::new(dir.path()).fallback_to_sqlite(false);
        config.sqlite_db = name.to_string();
        let m = bad_configuration(ImageCache::with_runtime(runtime(), config));
        assert!(m.contains("image_cache_sqlite_db"), "{name:?}: {m}");
    }
    assert!(!dir.path().parent().unwrap().join("elsewhere.db").exists());
}

#[test]
fn a_missing_driver_file_is_a_load_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-driver.wasm");
    match open_root(dir.path(), DriverSource::File(path.clone())) {
        Err(Error::Load { driver, .. }) => assert_eq!(driver, path.display().to_string()),
        Err(e) => panic!("expected a load error, got {e:?}"),
        Ok(_) => panic!("expected a load error, got a cache"),
    }
    let not_wasm = dir.path().join("garbage.wasm");
    std::fs::write(&not_wasm, b"not a component").unwrap();
    assert!(matches!(
        open_root(dir.path(), DriverSource::File(not_wasm)),
        Err(Error::Load { .. })
    ));
}
