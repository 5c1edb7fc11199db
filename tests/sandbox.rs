//! The sandbox, seen from outside: what a built driver component imports,
//! and that a component asking for more is refused at load.

use image_cache::runtime::{ALLOWED_IMPORTS, component_imports};
use image_cache::{DriverSource, Error};
use image_cache_tests::runtime;

/// What each built-in driver may import: the contract, and what Rust's std
/// pulls in on wasm32-wasip2.
fn imports_of(name: &str) -> Vec<String> {
    let rt = runtime();
    let bytes = image_cache::builtin::find(name).unwrap().component;
    let component = wasmtime::component::Component::new(rt.engine(), bytes).unwrap();
    let mut imports = component_imports(rt.engine(), &component);
    imports.sort();
    imports
}

fn assert_only_the_contract(name: &str, required: &[&str]) {
    let imports = imports_of(name);
    println!("{name} imports: {imports:#?}");
    for import in &imports {
        assert!(
            ALLOWED_IMPORTS.iter().any(|p| import.starts_with(p)),
            "{name} imports {import}, which is outside the contract"
        );
        for forbidden in ["wasi:filesystem", "wasi:sockets", "wasi:http"] {
            assert!(!import.starts_with(forbidden), "{name} imports {import}");
        }
    }
    for needed in required {
        assert!(
            imports.iter().any(|i| i.starts_with(needed)),
            "{name} should import {needed}: {imports:?}"
        );
    }
}

#[test]
fn sqlite_driver_imports_only_the_contract() {
    assert_only_the_contract(
        "sqlite",
        &["image-cache:driver/fs@", "image-cache:driver/sqlite@"],
    );
}

#[test]
fn xattr_driver_imports_only_the_contract() {
    assert_only_the_contract(
        "xattr",
        &["image-cache:driver/fs@", "image-cache:driver/xattr@"],
    );
}

/// A minimal component that imports wasi:filesystem: it must not load.
#[test]
fn a_component_importing_the_filesystem_is_refused() {
    let wat = r#"(component
        (import "wasi:filesystem/preopens@0.2.6" (instance))
    )"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greedy.wasm");
    std::fs::write(&path, wat).unwrap();
    match runtime().load(&DriverSource::File(path)) {
        Err(Error::Load { message, .. }) => {
            assert!(message.contains("wasi:filesystem/preopens"), "{message}")
        }
        Err(e) => panic!("expected a load error, got {e:?}"),
        Ok(_) => panic!("a component importing wasi:filesystem was loaded"),
    }
}
