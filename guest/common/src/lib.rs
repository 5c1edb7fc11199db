//! What every image-cache driver shares.
//!
//! A driver component is this crate's [`Driver`] plus a [`MetadataStore`]:
//! the id rules, the root's layout (`incomplete/`, `invalid/`, `queue/`),
//! the queue, clean, prune, LRU order and the write/read session rules are
//! here, once; a driver crate says only where hits and times live.
//!
//! The driver reaches the disk only through the host's `fs` and `xattr`
//! imports (and a shared database through `database`), all relative to the
//! cache root the host chose.

pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "driver",
        pub_export_macro: true,
        default_bindings_module: "driver_common::bindings",
        generate_all,
    });
}

mod driver;
mod id;
mod layout;
mod store;
pub mod values;

pub use driver::{Driver, saturating_sum, select_victims};
pub use id::{IdMap, cmp_ids, id_map, validate_image_id};
pub use layout::remove_if_present;
pub use layout::{Layout, now};
pub use store::{Backend, FORGET_MISSING_AFTER, Image, MetadataStore, Options};

pub use bindings::image_cache::driver::types::{
    CachedImage, CleanReport, DriverInfo, Error, IoError, LruEntry, PruneReport, ReadRecord,
    RemovedFile,
};
pub use bindings::image_cache::driver::{clock, database, fs, xattr};

/// The custom section a driver declares itself in, which hosts read
/// without running any of its code (`image-cache drivers inspect`).
pub const INFO_SECTION: &str = "image-cache:driver-info";

/// Declare a driver's name and description once: `driver_info!("name",
/// "description")` defines `DRIVER_INFO` (for [`Backend::info`], via
/// [`parse_info`]) and puts the same text, with the crate's version, in the
/// [`INFO_SECTION`] custom section: `name\nversion\ndescription`.
#[macro_export]
macro_rules! driver_info {
    ($name:literal, $description:literal) => {
        const DRIVER_INFO: &str =
            concat!($name, "\n", env!("CARGO_PKG_VERSION"), "\n", $description);
        #[unsafe(link_section = "image-cache:driver-info")]
        #[used]
        static DRIVER_INFO_SECTION: [u8; DRIVER_INFO.len()] = $crate::section_bytes(DRIVER_INFO);
    };
}

/// The bytes of `s` as an array (for a custom section's static).
pub const fn section_bytes<const N: usize>(s: &str) -> [u8; N] {
    let bytes = s.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < N {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// The [`DriverInfo`] of a [`driver_info!`] text.
pub fn parse_info(text: &str) -> DriverInfo {
    let mut parts = text.splitn(3, '\n');
    let mut next = || parts.next().unwrap_or_default().to_string();
    DriverInfo {
        name: next(),
        version: next(),
        description: next(),
    }
}

/// Turn a host `fs` error into the driver's `io` error, keeping its code
/// (a full disk stays `no-space` up to the CLI's exit code and the
/// server's status) and its message.
pub fn io_error(e: fs::FsError) -> Error {
    Error::Io(IoError {
        code: e.code,
        message: e.message,
    })
}

/// An `io` error the driver found itself (no `fs` call failed).
pub fn io_failure(message: impl Into<String>) -> Error {
    Error::Io(IoError {
        code: fs::ErrorCode::Io,
        message: message.into(),
    })
}
