//! Builds the built-in driver components in `guest/` (sqlite, xattr,
//! centralized) with a nested cargo and exposes them to the host as
//! `$OUT_DIR/<name>.wasm` for `include_bytes!` (host/src/builtin.rs); they
//! also land in `target/guest/components/`. How: `build-support/`, shared
//! with `tests/build.rs`, which builds the test fixtures (hostile, chaos),
//! never part of the library.

fn main() {
    let built = image_cache_build_support::build_drivers(&[
        "sqlite-driver",
        "xattr-driver",
        "centralized-driver",
    ]);
    if let Some(dir) = built {
        // For dependents' build scripts (`links`): tests/build.rs.
        println!("cargo::metadata=dir={}", dir.display());
    }
}
