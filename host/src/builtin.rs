//! The driver components built into this binary (by `build.rs`).

/// A built-in driver.
pub struct Builtin {
    pub name: &'static str,
    pub description: &'static str,
    pub component: &'static [u8],
}

pub const SQLITE: Builtin = Builtin {
    name: "sqlite",
    description: "hits and access times in Glance's cached_images table (cache.db in the root)",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/sqlite_driver.wasm")),
};

pub const XATTR: Builtin = Builtin {
    name: "xattr",
    description: "hits in the user.hits extended attribute, last access in the file's atime",
    component: include_bytes!(concat!(env!("OUT_DIR"), "/xattr_driver.wasm")),
};

pub const ALL: &[Builtin] = &[SQLITE, XATTR];

pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter().find(|b| b.name == name)
}
