//! Image ids: opaque strings that become one file name in the root.

use crate::Error;

/// Longest id accepted, in bytes (a file name's limit on Linux).
pub const MAX_ID_LEN: usize = 255;

/// Accept `id` only if it can be one file name inside the root and nothing
/// else: not empty, at most 255 bytes, not `.` or `..`, no `/`, `\`, NUL or
/// other control character. Called before any file is touched.
pub fn validate_image_id(id: &str) -> Result<(), Error> {
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
