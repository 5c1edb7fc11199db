//! Builds the test-fixture driver components in `guest/` (`hostile`, a
//! driver that attacks its host, and `chaos`, one that calls every import at
//! random) with a nested cargo, as `host/build.rs` builds the built-in ones
//! (`build-support/`). They go to `target/guest/components/`, where the
//! Python and Node hosts' tests find them, and to `$OUT_DIR`, which the
//! suites find as `IMAGE_CACHE_FIXTURES_DIR` (`support::fixture`). The
//! library `image-cache` neither builds nor carries them.

fn main() {
    if let Some(dir) = image_cache_build_support::build_drivers(&["hostile-driver", "chaos-driver"])
    {
        println!(
            "cargo::rustc-env=IMAGE_CACHE_FIXTURES_DIR={}",
            dir.display()
        );
    }
}
