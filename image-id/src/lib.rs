//! The image id rule of the specification (docs/src/spec.md), once, for the host (which checks every id
//! before it reaches a path, and every id a driver returns) and for the
//! drivers (which check every id before any file is touched). No
//! dependencies: it builds for the host and for `wasm32-unknown-unknown`.

/// Longest id accepted, in bytes (a file name's limit on Linux).
pub const MAX_ID_LEN: usize = 255;

/// Why `id` cannot be an image id, or `None` if it can: not empty, at most
/// 255 bytes, not `.` or `..`, no `/`, `\`, NUL or other control character,
/// no invisible formatting character ([`hidden`]: a bidi override would make
/// an id print as another).
pub fn problem(id: &str) -> Option<&'static str> {
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
        return None;
    }
    if id.is_empty() {
        Some("it is empty")
    } else if id.len() > MAX_ID_LEN {
        Some("it is longer than 255 bytes")
    } else if id == "." || id == ".." {
        Some("it is a relative directory name")
    } else if id.contains(['/', '\\']) {
        Some("it contains a path separator")
    } else if id.chars().any(char::is_control) {
        Some("it contains a control character")
    } else if id.chars().any(hidden) {
        Some("it contains an invisible formatting character")
    } else {
        None
    }
}

/// Characters that change how text around them shows without showing
/// themselves: control characters (terminal escapes), bidirectional
/// marks, overrides and isolates (U+061C, U+200E/F, U+202A-U+202E,
/// U+2066-U+2069), zero-width characters (U+200B-U+200D, U+2060, U+FEFF)
/// and other invisible formatting (U+00AD, U+180E, U+2061-U+2064).
pub fn hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00AD}'
                | '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{202A}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// The message for an id refused because of `reason`: the id quoted,
/// shortened to 64 characters, with control characters escaped so the
/// message stays one line (and invisible ones shown escaped too).
pub fn refusal(id: &str, reason: &str) -> String {
    let mut shown: String = id.chars().take(64).collect();
    if shown.len() < id.len() {
        shown.push_str("...");
    }
    format!("invalid image id {shown:?}: {reason}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_path_and_the_full_check_agree() {
        for id in [
            "1",
            "xxx",
            "a.b",
            "...",
            "é",
            ".",
            "..",
            "",
            "a/b",
            "a\\b",
            "a\0b",
            "a\nb",
            "\u{85}",
            "\u{7f}",
            " ",
            "a\u{202e}b",
            "\u{200b}",
            "\u{feff}x",
        ] {
            let fast = !id.is_empty()
                && id.len() <= MAX_ID_LEN
                && id != "."
                && id != ".."
                && !id.contains(['/', '\\'])
                && !id.chars().any(hidden);
            assert_eq!(problem(id).is_none(), fast, "{id:?}");
        }
        assert_eq!(problem(&"x".repeat(255)), None);
        assert_eq!(
            problem(&"x".repeat(256)),
            Some("it is longer than 255 bytes")
        );
    }

    #[test]
    fn refusals_are_one_short_line() {
        let m = refusal(
            &format!("a\n{}", "b".repeat(100)),
            "it contains a control character",
        );
        assert!(
            !m.contains('\n') && m.contains("\\n") && m.contains("...\""),
            "{m}"
        );
    }
}
