//! An image cache with sandboxed, swappable drivers.
//!
//! Glance's image cache (a directory of image files with hits and access
//! times, a prefetch queue, LRU pruning and cleaning) where every decision
//! about the directory is made by a WebAssembly driver component that sees
//! only that directory, through the host interfaces implemented here:
//!
//! | module | implements |
//! | --- | --- |
//! | [`limits`] | the leaf: call deadlines, shared default bounds, printable text |
//! | [`fs`] | `image-cache:driver/fs` on a `cap_std` directory |
//! | [`xattr`] | `image-cache:driver/xattr`, `user.` names only |
//! | [`database`] | `image-cache:driver/database`: configured databases by name |
//! | [`contract`] | contract versions, grants, what a component declares |
//! | [`runtime`] | engine, checks before compiling, linking by grants, limits |
//! | [`signature`] | driver signatures: trusted keys, signing, the check before compiling |
//! | [`driver`] | a driver on one root: instance pool, typed calls, sessions |
//! | [`cache`] | [`ImageCache`]: prune, clean, tee, read, swap |
//! | [`fail`] | [`FailPolicy`]: what a call does when the driver fails |
//! | [`config`] | Glance's options, sizes, durations, `glance-cache.conf` |

pub mod bindings;
pub mod builtin;
pub mod cache;
pub mod checksum;
mod compat;
pub mod config;
pub mod contract;
pub mod database;
pub mod driver;
pub mod error;
pub mod fail;
pub mod fs;
pub mod limits;
pub mod runtime;
pub mod signature;
pub mod xattr;

pub use bindings::types::{
    CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport, ReadRecord, RemovedFile,
};
pub use cache::{CacheConfig, ImageCache, ImageReader, ImageWriter, RollbackPolicy, TeeReport};
pub use checksum::{Algorithm, Checksum};
pub use contract::{Capability, Grants};
pub use error::{Error, Result, validate_image_id};
pub use fail::FailPolicy;
pub use runtime::{DriverSource, Limits, LoadPolicy, Runtime};
pub use xattr::XattrSupport;

/// The README's Rust example, compiled and run by `cargo test -p image-cache
/// --doc` so it cannot rot. (Every other code block in the README is tagged
/// with its language, so only the Rust one runs.)
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;
