//! Image ids: opaque strings that become one file name in the root.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;

use crate::Error;

/// A map keyed by image id. FxHash: the keys are ids the driver listed
/// itself, and SipHash cost more in wasm than the lookups it guards.
pub type IdMap<V> = HashMap<String, V, BuildHasherDefault<rustc_hash::FxHasher>>;

/// An empty [`IdMap`] with room for `n` ids.
pub fn id_map<V>(n: usize) -> IdMap<V> {
    IdMap::with_capacity_and_hasher(n, Default::default())
}

/// The order of two ids, as `str::cmp` gives it, compared eight bytes at a
/// time: wasm's `memcmp` goes byte by byte, and ids (UUIDs) share long
/// prefixes.
pub fn cmp_ids(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut whole = 0;
    for (x, y) in a.chunks_exact(8).zip(b.chunks_exact(8)) {
        let word = |c: &[u8]| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let (x, y) = (word(x), word(y));
        if x != y {
            return x.cmp(&y);
        }
        whole += 8;
    }
    a[whole..].cmp(&b[whole..])
}

/// Accept `id` only if it can be one file name inside the root and nothing
/// else (the rule in the `image-id` crate, shared with the host). Called
/// before any file is touched.
pub fn validate_image_id(id: &str) -> Result<(), Error> {
    match image_id::problem(id) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidImageId(image_id::refusal(id, reason))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_compare_as_strings_do() {
        let ids = [
            "",
            "1",
            "10",
            "2",
            "a",
            "ab",
            "abcdefgh",
            "abcdefgh1",
            "abcdefgi",
            "abcdefghabcdefgh",
            "abcdefghabcdefgi",
            "abcdefghabcdefg",
            "é",
            "e\u{301}",
            "6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e0001",
            "6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e0002",
            "6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e000",
            "zzzzzzzz\u{7f}",
        ];
        for a in ids {
            for b in ids {
                assert_eq!(cmp_ids(a, b), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn glance_ids_pass() {
        for id in [
            "1",
            "xxx",
            "99",
            "6bd3c1a4-2f1e-4f8e-9d2a-7c1c2a9e0001",
            "a.b",
            "...",
            "é",
        ] {
            validate_image_id(id).unwrap_or_else(|e| panic!("{id}: {e:?}"));
        }
        validate_image_id(&"x".repeat(255)).unwrap();
    }

    #[test]
    fn ids_that_are_not_one_file_name_are_refused_with_the_reason() {
        for (id, reason) in [
            ("", "it is empty"),
            (".", "relative directory name"),
            ("..", "relative directory name"),
            ("a/b", "path separator"),
            ("../etc/passwd", "path separator"),
            ("a\\b", "path separator"),
            ("a\0b", "control character"),
            ("a\nb", "control character"),
            ("\u{1b}[2J", "control character"),
        ] {
            match validate_image_id(id) {
                Err(Error::InvalidImageId(m)) => assert!(m.contains(reason), "{id:?}: {m}"),
                other => panic!("{id:?}: {other:?}"),
            }
        }
        match validate_image_id(&"x".repeat(256)) {
            Err(Error::InvalidImageId(m)) => {
                assert!(
                    m.contains("longer than 255 bytes") && m.contains("..."),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}
