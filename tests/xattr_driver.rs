//! What is particular to the xattr driver: it needs user extended
//! attributes, keeps Glance's attribute names, and records why a write was
//! abandoned.

use image_cache::{CacheConfig, DriverSource, ImageCache, XattrSupport};
use image_cache_tests::{TestCache, bad_configuration, runtime};

fn xattr() -> DriverSource {
    DriverSource::Builtin("xattr")
}

fn config_without_xattrs(root: &std::path::Path) -> CacheConfig {
    let mut config = CacheConfig::new(root).driver(xattr());
    // The host reports user xattrs as unsupported, as a file system mounted
    // without them would.
    config.xattr = XattrSupport::Disabled;
    config
}

#[test]
fn without_user_xattrs_configure_fails_naming_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_without_xattrs(dir.path()).fallback_to_sqlite(false);
    let m = bad_configuration(ImageCache::with_runtime(runtime(), config));
    assert!(m.contains("extended attributes"), "{m}");
    assert!(m.contains(&dir.path().display().to_string()), "{m}");
}

#[test]
fn without_user_xattrs_the_cache_falls_back_to_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ImageCache::with_runtime(runtime(), config_without_xattrs(dir.path())).unwrap();
    assert_eq!(cache.driver().info().name, "sqlite");
    cache.cache_reader("1", None, &b"works"[..]).unwrap();
    assert!(dir.path().join("cache.db").exists());
}

#[test]
fn reads_hits_that_glance_wrote() {
    let t = TestCache::new(&xattr());
    t.put("1", b"image");
    // Glance stores the count as decimal text in user.hits.
    xattr::set(t.path("1"), "user.hits", b"41").unwrap();
    assert_eq!(t.cache.get_hit_count("1").unwrap(), 41);
    t.get("1");
    assert_eq!(
        xattr::get(t.path("1"), "user.hits").unwrap().as_deref(),
        Some(&b"42"[..])
    );
}

#[test]
fn an_aborted_write_records_its_reason() {
    let t = TestCache::new(&xattr());
    let w = t.cache.open_for_write("1").unwrap();
    w.abort("checksum mismatch").unwrap();
    assert_eq!(
        xattr::get(t.path("invalid/1"), "user.error")
            .unwrap()
            .as_deref(),
        Some(&b"checksum mismatch"[..])
    );
    drop(t.cache.open_for_write("2").unwrap());
    assert_eq!(
        xattr::get(t.path("invalid/2"), "user.error")
            .unwrap()
            .as_deref(),
        Some(&b"incomplete fetch"[..])
    );
}

#[test]
fn a_read_sets_the_access_time_itself() {
    let t = TestCache::new(&xattr());
    t.put("1", b"image");
    // As on a noatime mount: the access time stays in the past unless the
    // driver sets it.
    let old = std::time::SystemTime::now() - std::time::Duration::from_secs(7 * 86_400);
    let f = std::fs::File::open(t.path("1")).unwrap();
    f.set_times(std::fs::FileTimes::new().set_accessed(old))
        .unwrap();
    let before = std::time::SystemTime::now();
    t.get("1");
    let accessed = std::fs::metadata(t.path("1")).unwrap().accessed().unwrap();
    assert!(
        accessed >= before - std::time::Duration::from_secs(1),
        "atime moved to the read"
    );
}

/// A ramfs mounted for one test, unmounted when dropped.
struct Ramfs(tempfile::TempDir);

impl Ramfs {
    /// `None` where this process may not mount (not root, no
    /// CAP_SYS_ADMIN): the host-side switch above covers the behaviour.
    fn mount() -> Option<Ramfs> {
        let dir = tempfile::tempdir().ok()?;
        let status = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Ramfs(dir))
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

/// For real: ramfs stores no user extended attributes.
#[test]
fn on_a_file_system_without_user_xattrs_it_is_a_bad_configuration() {
    let Some(ramfs) = Ramfs::mount() else {
        panic!(
            "cannot mount a ramfs here (mounting needs root or CAP_SYS_ADMIN): run the tests as \
             root, or leave this one out with `--skip on_a_file_system_without_user_xattrs` \
             (the XattrSupport::Disabled tests cover the same behaviour without a mount)"
        );
    };
    let root = ramfs.0.path().join("cache");
    let strict = CacheConfig::new(&root)
        .driver(xattr())
        .fallback_to_sqlite(false);
    let m = bad_configuration(ImageCache::with_runtime(runtime(), strict));
    assert!(m.contains("extended attributes"), "{m}");
    assert!(m.contains(&root.display().to_string()), "{m}");
    let cache =
        ImageCache::with_runtime(runtime(), CacheConfig::new(&root).driver(xattr())).unwrap();
    assert_eq!(
        cache.driver().info().name,
        "sqlite",
        "fell back, as Glance does"
    );
    cache.cache_reader("1", None, &b"on ramfs"[..]).unwrap();
    assert!(cache.is_cached("1").unwrap());
    drop(cache);
}
