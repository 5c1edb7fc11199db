//! The library's typed errors.

use crate::bindings::types::Error as DriverError;
use crate::limits::printable;

/// What kind of file-system failure an [`Error::Io`] is: the `fs` import's
/// error code, carried through the driver's `io` error (contract 0.3.0), so
/// a full disk or a denied access stays one up to exit codes and HTTP
/// statuses.
pub use crate::bindings::fs::ErrorCode as IoCode;

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
    #[error("I/O error: {message}")]
    Io { code: IoCode, message: String },
    #[error("database error: {0}")]
    Database(String),
    #[error("{0}")]
    NotConfigured(String),
    /// The driver does not offer the operation.
    #[error("{0}")]
    Unsupported(String),
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
    /// Every instance the driver may have stayed busy past the wait.
    #[error("{0}")]
    Overloaded(String),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Longest message kept from a driver's error value.
const MAX_DRIVER_MESSAGE: usize = 1024;

impl From<DriverError> for Error {
    /// A driver's error, its message cut to one printable line (a driver
    /// must not flood logs or terminals through its errors).
    fn from(e: DriverError) -> Self {
        let clean = |m: String| printable(&m, MAX_DRIVER_MESSAGE);
        match e {
            DriverError::BadConfiguration(m) => Error::BadConfiguration(clean(m)),
            DriverError::InvalidImageId(m) => Error::InvalidImageId(clean(m)),
            DriverError::NotFound(m) => Error::NotFound(clean(m)),
            DriverError::AlreadyCached(m) => Error::AlreadyCached(clean(m)),
            DriverError::BeingCached(m) => Error::BeingCached(clean(m)),
            DriverError::Io(e) => Error::Io {
                code: e.code,
                message: clean(e.message),
            },
            DriverError::Database(m) => Error::Database(clean(m)),
            DriverError::NotConfigured(m) => Error::NotConfigured(clean(m)),
            DriverError::Unsupported(m) => Error::Unsupported(clean(m)),
        }
    }
}

impl Error {
    /// An I/O failure of the host's own, its code from the system's error.
    pub fn io(context: impl std::fmt::Display, e: &std::io::Error) -> Error {
        let code = crate::fs::io_error("", std::io::Error::new(e.kind(), "")).code;
        let code = match e.raw_os_error() {
            Some(libc::ENOSPC) | Some(libc::EDQUOT) => IoCode::NoSpace,
            Some(libc::EMFILE) | Some(libc::ENFILE) => IoCode::LimitExceeded,
            _ => code,
        };
        Error::Io {
            code,
            message: format!("{context}: {e}"),
        }
    }

    /// An I/O failure the host found without a system error.
    pub fn io_message(message: impl Into<String>) -> Error {
        Error::Io {
            code: IoCode::Io,
            message: message.into(),
        }
    }

    /// A short name of the kind, stable for scripts (`--json` output).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::BadConfiguration(_) => "bad-configuration",
            Error::InvalidImageId(_) => "invalid-image-id",
            Error::NotFound(_) => "not-found",
            Error::AlreadyCached(_) => "already-cached",
            Error::BeingCached(_) => "being-cached",
            Error::Io { .. } => "io",
            Error::Database(_) => "database",
            Error::NotConfigured(_) => "not-configured",
            Error::Unsupported(_) => "unsupported",
            Error::ChecksumMismatch { .. } => "checksum-mismatch",
            Error::Source(_) => "source",
            Error::Sink(_) => "sink",
            Error::DriverFault { .. } => "driver-fault",
            Error::Load { .. } => "load",
            Error::Overloaded(_) => "overloaded",
        }
    }

    /// An `io` error's file-system code, by its WIT name (`no-space`,
    /// `access-denied`, ...); `None` for the other kinds.
    pub fn io_code(&self) -> Option<&'static str> {
        let Error::Io { code, .. } = self else {
            return None;
        };
        Some(match code {
            IoCode::NotFound => "not-found",
            IoCode::AlreadyExists => "already-exists",
            IoCode::AccessDenied => "access-denied",
            IoCode::InvalidPath => "invalid-path",
            IoCode::NotADirectory => "not-a-directory",
            IoCode::IsADirectory => "is-a-directory",
            IoCode::NoSpace => "no-space",
            IoCode::Unsupported => "unsupported",
            IoCode::LimitExceeded => "limit-exceeded",
            IoCode::TimedOut => "timed-out",
            IoCode::InvalidArgument => "invalid-argument",
            IoCode::Io => "io",
        })
    }
}

/// The host's own check of an image id (docs/src/spec.md; the rule in the
/// `image-id` crate, shared with the drivers): not empty, at most 255
/// bytes, not `.` or `..`, no `/`, `\`, NUL or other control character.
/// Applied to every id before the host puts it in a path, and to every id
/// a driver returns.
pub fn validate_image_id(id: &str) -> Result<()> {
    match image_id::problem(id) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidImageId(image_id::refusal(id, reason))),
    }
}
