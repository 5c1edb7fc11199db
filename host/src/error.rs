//! The library's typed errors.

use crate::bindings::types::Error as DriverError;

/// Everything that can go wrong in the cache, by what the caller can do
/// about it. Messages name the image, file or driver involved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The root or an option cannot be used (Glance's BadDriverConfiguration).
    #[error("bad configuration: {0}")]
    BadConfiguration(String),
    #[error("{0}")]
    InvalidImageId(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyCached(String),
    #[error("{0}")]
    BeingCached(String),
    #[error("I/O error: {0}")]
    Io(String),
    #[error("database error: {0}")]
    Database(String),
    #[error("{0}")]
    NotConfigured(String),
    /// The bytes did not match the expected checksum; nothing was cached.
    #[error("checksum mismatch for image {image_id:?}: expected {expected}, got {actual}")]
    ChecksumMismatch {
        image_id: String,
        expected: String,
        actual: String,
    },
    /// The image source failed; nothing was cached.
    #[error("reading the image source failed: {0}")]
    Source(#[source] std::io::Error),
    /// Passing bytes on to the caller failed; nothing was cached.
    #[error("writing the image to its destination failed: {0}")]
    Sink(#[source] std::io::Error),
    /// The driver trapped, ran past its deadline or broke the contract. Its
    /// instance was discarded; the next call gets a fresh one.
    #[error("driver {driver} failed: {message}")]
    DriverFault { driver: String, message: String },
    /// A driver component could not be loaded.
    #[error("cannot load driver {driver}: {message}")]
    Load { driver: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        match e {
            DriverError::BadConfiguration(m) => Error::BadConfiguration(m),
            DriverError::InvalidImageId(m) => Error::InvalidImageId(m),
            DriverError::NotFound(m) => Error::NotFound(m),
            DriverError::AlreadyCached(m) => Error::AlreadyCached(m),
            DriverError::BeingCached(m) => Error::BeingCached(m),
            DriverError::Io(m) => Error::Io(m),
            DriverError::Database(m) => Error::Database(m),
            DriverError::NotConfigured(m) => Error::NotConfigured(m),
        }
    }
}

impl Error {
    /// A short name of the kind, stable for scripts (`--json` output).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadConfiguration(_) => "bad-configuration",
            Error::InvalidImageId(_) => "invalid-image-id",
            Error::NotFound(_) => "not-found",
            Error::AlreadyCached(_) => "already-cached",
            Error::BeingCached(_) => "being-cached",
            Error::Io(_) => "io",
            Error::Database(_) => "database",
            Error::NotConfigured(_) => "not-configured",
            Error::ChecksumMismatch { .. } => "checksum-mismatch",
            Error::Source(_) => "source",
            Error::Sink(_) => "sink",
            Error::DriverFault { .. } => "driver-fault",
            Error::Load { .. } => "load",
        }
    }
}
