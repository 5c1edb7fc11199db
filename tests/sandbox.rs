//! The sandbox, seen from outside: what a built driver component imports
//! (exactly the contract, no WASI at all), and that a component asking for
//! more is refused at load.

use image_cache::contract;
use image_cache::{DriverSource, Error, LoadPolicy};
use image_cache_tests::runtime;

/// What a component binary imports, read from the binary.
fn imports_of(bytes: &[u8]) -> Vec<String> {
    let mut imports = contract::declared(bytes).unwrap().imports;
    imports.sort();
    imports
}

fn builtin(name: &str) -> &'static [u8] {
    image_cache::builtin::find(name).unwrap().component
}

#[test]
fn sqlite_driver_imports_exactly_its_contract_and_no_sqlite() {
    assert_eq!(
        imports_of(builtin("sqlite")),
        [
            "image-cache:driver/clock@0.3.0",
            "image-cache:driver/fs@0.3.0",
            "image-cache:driver/types@0.3.0",
        ],
        "SQLite runs inside the driver: no sqlite import"
    );
}

#[test]
fn xattr_driver_imports_exactly_its_contract() {
    assert_eq!(
        imports_of(builtin("xattr")),
        [
            "image-cache:driver/clock@0.3.0",
            "image-cache:driver/fs@0.3.0",
            "image-cache:driver/types@0.3.0",
            "image-cache:driver/xattr@0.3.0",
        ]
    );
}

/// What wasmtime itself reports once compiled agrees with the binary.
#[test]
fn the_compiled_component_agrees_and_imports_no_wasi() {
    let rt = runtime();
    for name in ["sqlite", "xattr"] {
        let component = wasmtime::component::Component::new(rt.engine(), builtin(name)).unwrap();
        let mut compiled = image_cache::runtime::component_imports(rt.engine(), &component);
        compiled.sort();
        assert_eq!(compiled, imports_of(builtin(name)), "{name}");
        assert!(
            compiled.iter().all(|i| !i.starts_with("wasi:")),
            "{compiled:?}"
        );
    }
}

/// A minimal component that imports wasi:filesystem: it must not load.
#[test]
fn a_component_importing_the_filesystem_is_refused() {
    let wat = r#"(component
        (import "wasi:filesystem/preopens@0.2.6" (instance))
        (instance $driver)
        (export "image-cache:driver/cache-driver@0.3.0" (instance $driver))
    )"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("greedy.wasm");
    std::fs::write(&path, wat::parse_str(wat).unwrap()).unwrap();
    match runtime().component(&DriverSource::File(path), &LoadPolicy::default()) {
        Err(Error::Load { message, .. }) => {
            assert!(message.contains("wasi:filesystem/preopens"), "{message}")
        }
        Err(e) => panic!("expected a load error, got {e:?}"),
        Ok(_) => panic!("a component importing wasi:filesystem was loaded"),
    }
}
