//! Builds driver crates of `guest/` with a nested cargo (own target
//! directory under the workspace's `target/`), for the build scripts of the
//! host (`host/build.rs`: the built-in drivers, embedded with
//! `include_bytes!`) and of the integration tests (`tests/build.rs`: the
//! test fixtures `hostile` and `chaos`, never part of the library).
//!
//! The guests are built for `wasm32-unknown-unknown`, and each core module
//! is turned into a component here with `wit-component`: the component then
//! imports exactly the `image-cache:driver` interfaces its code uses and no
//! `wasi:*` at all (wasm32-wasip2 would link Rust's std against 18 WASI
//! interfaces: clocks, random, stdio, poll). That keeps every host small to
//! write and leaves a driver no import that could block past a deadline.
//!
//! Both build scripts share one guest target directory: cargo's lock on it
//! makes their nested builds take turns.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-unknown-unknown";
/// The driver crate that compiles C (SQLite) for the wasm target.
const NEEDS_C_COMPILER: &str = "sqlite-driver";

/// Builds the guest packages `packages` (e.g. `sqlite-driver`) from a build
/// script of a crate one directory below the workspace root, and writes
/// each one's component, `<package with _ for ->.wasm`, to
/// `$OUT_DIR` and to `<target>/guest/components/`. Returns `$OUT_DIR`, or
/// `None` after printing a `cargo::error` (the build then fails).
pub fn build_drivers(packages: &[&str]) -> Option<PathBuf> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().unwrap().to_path_buf();
    let guest = root.join("guest");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap());

    // Worktrees sharing one target directory share this script's output
    // directory too: naming the script itself makes an edited checkout's
    // build run it again rather than take another checkout's components.
    println!(
        "cargo::rerun-if-changed={}",
        manifest_dir.join("build.rs").display()
    );
    for path in [
        "wit",
        "guest/Cargo.toml",
        "guest/Cargo.lock",
        "image-id/Cargo.toml",
        "image-id/src",
    ] {
        println!("cargo::rerun-if-changed={}", root.join(path).display());
    }
    for entry in std::fs::read_dir(&guest).unwrap().flatten() {
        let crate_dir = entry.path();
        if crate_dir.join("Cargo.toml").exists() {
            println!(
                "cargo::rerun-if-changed={}",
                crate_dir.join("Cargo.toml").display()
            );
            println!(
                "cargo::rerun-if-changed={}",
                crate_dir.join("src").display()
            );
        }
    }

    if !target_installed() {
        println!(
            "cargo::error=the {TARGET} target is missing; install it with: rustup target add {TARGET}"
        );
        return None;
    }

    if packages.contains(&NEEDS_C_COMPILER) {
        println!("cargo::rerun-if-env-changed=CC_wasm32_unknown_unknown");
        if !c_compiler_for_wasm() {
            println!(
                "cargo::error=clang is missing: the sqlite driver compiles SQLite for {TARGET} with it; \
                 install it (Debian: apt-get install clang) or name a wasm-capable C compiler in \
                 CC_wasm32_unknown_unknown"
            );
            return None;
        }
    }

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("guest");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir);
    for package in packages {
        cmd.args(["-p", package]);
    }
    if guest.join("Cargo.lock").exists() {
        cmd.arg("--locked");
    }
    // The outer build's settings are for the host, not for the guests.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let keep = key == "CARGO_HOME"
            || key == "CARGO_MAKEFLAGS"
            || key.starts_with("CARGO_NET_")
            || key.starts_with("CARGO_HTTP_")
            || key.starts_with("CARGO_REGISTR");
        let outer = key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTFLAGS")
            || [
                "TARGET",
                "HOST",
                "PROFILE",
                "OUT_DIR",
                "OPT_LEVEL",
                "DEBUG",
                "NUM_JOBS",
            ]
            .contains(&key.as_ref());
        if outer && !keep {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd
        .status()
        .expect("failed to run cargo for the guest drivers");
    if !status.success() {
        println!("cargo::error=building the driver components in guest/ failed (see above)");
        return None;
    }

    // Components also go beside the core modules, where other hosts
    // (hosts/python, hosts/node) and third parties find them.
    let components_dir = target_dir.join("components");
    std::fs::create_dir_all(&components_dir).unwrap();
    for package in packages {
        let name = package.replace('-', "_");
        let built = target_dir
            .join(TARGET)
            .join("release")
            .join(format!("{name}.wasm"));
        if !built.exists() {
            println!(
                "cargo::error={} is missing after the build of {package}",
                built.display()
            );
            return None;
        }
        let module = std::fs::read(&built).unwrap_or_else(|e| panic!("{}: {e}", built.display()));
        let component = match componentize(&module) {
            Ok(c) => c,
            Err(e) => {
                println!("cargo::error=turning {name} into a component failed: {e:#}");
                return None;
            }
        };
        write_if_changed(&components_dir.join(format!("{name}.wasm")), &component);
        write_if_changed(&out_dir.join(format!("{name}.wasm")), &component);
    }
    Some(out_dir)
}

/// A core module with wit-bindgen's component type section, as a component.
fn componentize(module: &[u8]) -> anyhow::Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(module)?
        .validate(true)
        .encode()
}

/// Whether a C compiler for the wasm target is there (the `cc` crate in
/// `sqlite-wasm-rs`'s build uses `CC_wasm32_unknown_unknown`, else clang).
fn c_compiler_for_wasm() -> bool {
    let compiler = env::var_os("CC_wasm32_unknown_unknown").unwrap_or_else(|| "clang".into());
    Command::new(compiler)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether rustc's sysroot has the standard library for the wasm target.
fn target_installed() -> bool {
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let Ok(out) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return true; // let the nested build report it
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .exists()
}

fn write_if_changed(to: &Path, new: &[u8]) {
    if std::fs::read(to).ok().as_deref() != Some(new) {
        std::fs::write(to, new).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    }
}
