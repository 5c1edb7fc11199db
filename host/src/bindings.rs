//! Host bindings of the `image-cache:driver` world, generated in one place.
//!
//! Imports are trappable: a host function returns `wasmtime::Result`, whose
//! `Err` traps the guest (a resource-table misuse, a host bug). Expected
//! failures travel as WIT error values inside the `Ok`.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "driver",
    imports: { default: trappable },
    with: {
        "image-cache:driver/fs.file": crate::fs::OpenFile,
        "image-cache:driver/database.connection": crate::database::Connection,
    },
});

pub use self::image_cache::driver::{clock, database, fs, types, xattr};
pub use exports::image_cache::driver::cache_driver;
