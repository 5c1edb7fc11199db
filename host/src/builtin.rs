//! The driver components built into this binary (by `build.rs`), and what
//! each is granted.

use crate::contract::Capability;

/// A built-in driver.
pub struct Builtin {
    pub name: &'static str,
    /// Other names operators use for it (Glance's).
    pub aliases: &'static [&'static str],
    pub description: &'static str,
    /// What it is linked with beyond `fs` and `clock`.
    pub grants: &'static [Capability],
    pub component: &'static [u8],
}

pub const SQLITE: Builtin = Builtin {
    name: "sqlite",
    aliases: &[],
    description: "hits and access times in Glance's cached_images table (cache.db in the root)",
    grants: &[],
    component: include_bytes!(concat!(env!("OUT_DIR"), "/sqlite_driver.wasm")),
};

pub const XATTR: Builtin = Builtin {
    name: "xattr",
    aliases: &[],
    description: "hits in the user.hits extended attribute, last access in the file's atime",
    grants: &[Capability::Xattr],
    component: include_bytes!(concat!(env!("OUT_DIR"), "/xattr_driver.wasm")),
};

pub const CENTRALIZED: Builtin = Builtin {
    name: "centralized",
    aliases: &["centralized_db"],
    description: "every node's hits and access times in Glance's cached_images and node_reference \
                  tables, in a shared PostgreSQL, MySQL or MariaDB database (the host's database \
                  named glance)",
    grants: &[Capability::Database],
    component: include_bytes!(concat!(env!("OUT_DIR"), "/centralized_driver.wasm")),
};

pub const ALL: &[Builtin] = &[SQLITE, XATTR, CENTRALIZED];

/// The built-in driver called `name` (or by one of its aliases).
pub fn find(name: &str) -> Option<&'static Builtin> {
    ALL.iter()
        .find(|b| b.name == name || b.aliases.contains(&name))
}
