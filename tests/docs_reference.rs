//! The book's CLI and server reference (`docs/src/reference/cli.md`) is
//! generated from the tool's clap definitions by the hidden command
//! `image-cache help-reference`; this test fails when the file is stale,
//! so the reference cannot drift from the binary.

use std::path::Path;
use std::process::Command;

const REGENERATE: &str =
    "cargo run -q -p image-cache-cli -- help-reference > docs/src/reference/cli.md";

#[test]
fn the_cli_reference_in_the_book_is_what_the_binary_prints() {
    let mut command = Command::new(image_cache_tests::cli_binary());
    command.arg("help-reference");
    // Settings from the environment must not matter (the reference prints
    // variables' names, never their values).
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("IMAGE_CACHE_") {
            command.env_remove(name);
        }
    }
    let output = command
        .output()
        .expect("running image-cache help-reference");
    assert!(
        output.status.success(),
        "image-cache help-reference failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let generated = String::from_utf8(output.stdout).expect("the reference is UTF-8");

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/src/reference/cli.md");
    let in_book = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; generate it with: {REGENERATE}",
            path.display()
        )
    });
    if in_book != generated {
        let line = in_book
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map(|i| i + 1)
            .unwrap_or_else(|| in_book.lines().count().min(generated.lines().count()) + 1);
        panic!(
            "docs/src/reference/cli.md is stale (first difference at line {line}): \
             the CLI's options changed; regenerate it, from the repository root, with:\n    {REGENERATE}"
        );
    }
}
