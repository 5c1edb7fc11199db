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

/// Longest id accepted, in bytes (a file name's limit on Linux).
pub const MAX_ID_LEN: usize = 255;

/// Accept `id` only if it can be one file name inside the root and nothing
/// else: not empty, at most 255 bytes, not `.` or `..`, no `/`, `\`, NUL or
/// other control character. Called before any file is touched.
pub fn validate_image_id(id: &str) -> Result<(), Error> {
    // The common case, checked in one pass over the bytes: printable
    // ASCII without a separator, and not `.` or `..`.
    if !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'/' && b != b'\\')
        && id != "."
        && id != ".."
    {
        return Ok(());
    }
    let reason = if id.is_empty() {
        "it is empty"
    } else if id.len() > MAX_ID_LEN {
        "it is longer than 255 bytes"
    } else if id == "." || id == ".." {
        "it is a relative directory name"
    } else if id.contains('/') || id.contains('\\') {
        "it contains a path separator"
    } else if id.chars().any(char::is_control) {
        "it contains a control character"
    } else {
        return Ok(());
    };
    Err(Error::InvalidImageId(format!(
        "invalid image id {}: {reason}",
        quoted(id)
    )))
}

/// The id as a readable quoted string, shortened if huge, with control
/// characters escaped so an error message stays one line.
fn quoted(id: &str) -> String {
    let mut shown: String = id.chars().take(64).collect();
    if shown.len() < id.len() {
        shown.push_str("...");
    }
    format!("{shown:?}")
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
