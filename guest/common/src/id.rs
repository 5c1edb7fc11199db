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
