//! Builds the test-fixture driver components in `guest/` (`hostile`, a
//! driver that attacks its host, and `chaos`, one that calls every import at
//! random) with a nested cargo, as `host/build.rs` builds the built-in ones
//! (`build-support/`). They go to `target/guest/components/`, where the
//! Python and Node hosts' tests find them, and to `$OUT_DIR`, which the
//! suites find as `IMAGE_CACHE_FIXTURES_DIR` (`support::fixture`). The
//! library `image-cache` neither builds nor carries them.
//!
//! It also signs the built-in drivers, as a release would: a key pair is
//! made for this build, and copies of the components the host's build
//! script built (`DEP_IMAGE_CACHE_DRIVER_COMPONENTS_DIR`) are signed with
//! it, embedded, into `$OUT_DIR/signed/`, with the public key beside them
//! (`support::signed_builtin`, `support::builtin_signing_key`).

use std::path::Path;

fn main() {
    let Some(dir) = image_cache_build_support::build_drivers(&["hostile-driver", "chaos-driver"])
    else {
        return;
    };
    println!(
        "cargo::rustc-env=IMAGE_CACHE_FIXTURES_DIR={}",
        dir.display()
    );
    println!("cargo::rerun-if-env-changed=DEP_IMAGE_CACHE_DRIVER_COMPONENTS_DIR");
    let builtins = std::env::var_os("DEP_IMAGE_CACHE_DRIVER_COMPONENTS_DIR")
        .expect("host/build.rs names the built-in components' directory");
    if let Err(e) = sign_builtins(Path::new(&builtins), &dir.join("signed")) {
        println!("cargo::error=signing the built-in drivers for the tests: {e}");
    }
}

/// Sign each built-in component in `from` with a new key into `to`.
fn sign_builtins(from: &Path, to: &Path) -> Result<(), String> {
    use wasmsign2::{KeyPair, Module};
    std::fs::create_dir_all(to).map_err(|e| format!("{}: {e}", to.display()))?;
    let key = KeyPair::generate();
    let public = key.pk.clone().attach_default_key_id();
    let key_id = public.key_id().cloned();
    for name in ["sqlite_driver", "xattr_driver", "centralized_driver"] {
        let source = from.join(format!("{name}.wasm"));
        println!("cargo::rerun-if-changed={}", source.display());
        let bytes = std::fs::read(&source).map_err(|e| format!("{}: {e}", source.display()))?;
        let module = Module::deserialize(&mut std::io::Cursor::new(&bytes))
            .map_err(|e| format!("{name}: {e}"))?;
        let signed = key
            .sk
            .sign(module, key_id.as_ref())
            .map_err(|e| format!("{name}: {e}"))?;
        let mut out = Vec::new();
        signed
            .serialize(&mut out)
            .map_err(|e| format!("{name}: {e}"))?;
        std::fs::write(to.join(format!("{name}.wasm")), out).map_err(|e| e.to_string())?;
    }
    let public_key = to.join("builtin-signing.pub");
    std::fs::write(&public_key, key.pk.to_bytes()).map_err(|e| e.to_string())
}
