//! One root, two drivers: switching from sqlite to xattr (and back) keeps
//! every cached image readable. What metadata carries over is in README.md.

use image_cache::DriverSource;
use image_cache_tests::{TestCache, cached_ids, image_bytes, lru_ids};

fn sqlite() -> DriverSource {
    DriverSource::Builtin("sqlite")
}

fn xattr() -> DriverSource {
    DriverSource::Builtin("xattr")
}

#[test]
fn sqlite_to_xattr_and_back_keeps_every_image() {
    let t = TestCache::new(&sqlite());
    for i in 0..5u8 {
        t.put(&format!("img-{i}"), &image_bytes(i, 2048));
    }
    t.get("img-0");

    let as_xattr = t.reopen(&xattr());
    let ids = cached_ids(&as_xattr);
    assert_eq!(
        ids,
        ["img-0", "img-1", "img-2", "img-3", "img-4"],
        "cache.db is not an image"
    );
    assert_eq!(as_xattr.get_cache_size().unwrap(), 5 * 2048);
    for i in 0..5u8 {
        let mut out = Vec::new();
        as_xattr.read_image(&format!("img-{i}"), &mut out).unwrap();
        assert_eq!(out, image_bytes(i, 2048));
    }
    as_xattr
        .cache_reader("by-xattr", None, &b"new"[..])
        .unwrap();
    drop(as_xattr);

    let back = t.reopen(&sqlite());
    assert_eq!(back.get_cached_images().unwrap().len(), 6);
    let mut out = Vec::new();
    back.read_image("by-xattr", &mut out).unwrap();
    assert_eq!(out, b"new");
    // Hits recorded by sqlite are still there when it comes back; the read
    // made under xattr was counted in user.hits, not in cache.db.
    assert_eq!(back.get_hit_count("img-0").unwrap(), 1);
}

#[test]
fn xattr_lru_order_survives_a_switch_to_sqlite() {
    let t = TestCache::new(&xattr());
    for id in ["a", "b", "c"] {
        t.put(id, b"x");
    }
    for id in ["c", "a", "b"] {
        t.get(id);
    }
    let as_sqlite = t.reopen(&sqlite());
    let order = lru_ids(&as_sqlite, 3);
    assert_eq!(
        order,
        ["c", "a", "b"],
        "images without rows order by their access time"
    );
}
