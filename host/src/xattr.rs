//! `image-cache:driver/xattr`: extended attributes of files the guest opened.
//!
//! Only names in the `user.` namespace pass; anything else (`trusted.`,
//! `security.`, `system.`) is refused before any system call. Attributes are
//! read and written through the open file, so a path is never re-resolved.

use std::sync::atomic::{AtomicU64, Ordering};

use wasmtime::component::{HasData, Linker, Resource, ResourceTable};
use xattr::FileExt;

use crate::bindings::fs::{ErrorCode, FsError};
use crate::bindings::xattr as wit;
use crate::fs::{OpenFile, RootFs, io_error};

/// Longest attribute name (Linux's XATTR_NAME_MAX).
pub const MAX_NAME: usize = 255;
/// Largest value a guest may store or read back.
pub const MAX_VALUE: usize = 64 * 1024;

pub type Result<T> = std::result::Result<T, FsError>;

/// How the host offers extended attributes to a driver instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XattrSupport {
    /// Pass through to the file system (which may still not support them).
    FileSystem,
    /// Report every call as unsupported, as a file system without user
    /// xattrs would (for tests and for operators who want to forbid them).
    Disabled,
}

/// Accept only `user.` names of a sane length.
pub fn check_name(name: &str) -> Result<()> {
    let user = name
        .strip_prefix("user.")
        .is_some_and(|rest| !rest.is_empty());
    if !user || name.len() > MAX_NAME || name.contains('\0') {
        return Err(FsError {
            code: ErrorCode::AccessDenied,
            message: format!("extended attribute {name:?}: only user.* names are allowed"),
        });
    }
    if name.starts_with(HOST_PREFIX) {
        return Err(FsError {
            code: ErrorCode::AccessDenied,
            message: format!("extended attribute {name:?}: {HOST_PREFIX}* is the host's own"),
        });
    }
    Ok(())
}

/// Attribute names the host keeps for itself: a driver can neither read,
/// write, remove nor list them.
pub const HOST_PREFIX: &str = "user.image-cache.";

/// The host's seal on an image file: the id it was committed as, written
/// by the host on the file it filled, before the driver publishes it.
pub const SEAL: &str = "user.image-cache.id";

/// What the seal of a cached image's file says.
#[derive(Debug, PartialEq, Eq)]
pub enum Seal {
    /// Committed as this id.
    Id(Vec<u8>),
    /// No seal: a file of release 0.2 or of Glance, or a file system
    /// without user attributes.
    None,
}

/// Seal `file` as image `id` (the host, at commit). A file system without
/// user attributes cannot carry seals: that is not an error.
pub fn seal(file: &std::fs::File, id: &str) -> std::io::Result<()> {
    match file.set_xattr(SEAL, id.as_bytes()) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => Ok(()),
        other => other,
    }
}

/// The seal of an open image file.
pub fn read_seal(file: &std::fs::File) -> std::io::Result<Seal> {
    match file.get_xattr(SEAL) {
        Ok(Some(id)) => Ok(Seal::Id(id)),
        Ok(None) => Ok(Seal::None),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA)) => {
            Ok(Seal::None)
        }
        Err(e) => Err(e),
    }
}

fn unsupported(what: &str) -> FsError {
    FsError {
        code: ErrorCode::Unsupported,
        message: format!("{what}: user extended attributes are not supported here"),
    }
}

/// Attribute operations on one open file.
pub struct Attributes<'a> {
    pub file: &'a OpenFile,
    pub support: XattrSupport,
}

impl Attributes<'_> {
    fn enabled(&self) -> Result<()> {
        match self.support {
            XattrSupport::FileSystem => Ok(()),
            XattrSupport::Disabled => Err(unsupported(&self.file.path)),
        }
    }

    /// The attribute's value; `not-found` if the file does not have it.
    pub fn get(&self, name: &str) -> Result<Vec<u8>> {
        check_name(name)?;
        self.enabled()?;
        let value = self
            .file
            .file
            .get_xattr(name)
            .map_err(|e| io_error(&self.file.path, e))?
            .ok_or_else(|| FsError {
                code: ErrorCode::NotFound,
                message: format!("{}: no attribute {name}", self.file.path),
            })?;
        if value.len() > MAX_VALUE {
            return Err(FsError {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "{}: attribute {name} is larger than {MAX_VALUE} bytes",
                    self.file.path
                ),
            });
        }
        Ok(value)
    }

    pub fn set(&self, name: &str, value: &[u8]) -> Result<()> {
        check_name(name)?;
        self.enabled()?;
        if value.len() > MAX_VALUE {
            return Err(FsError {
                code: ErrorCode::LimitExceeded,
                message: format!(
                    "{}: attribute values are limited to {MAX_VALUE} bytes",
                    self.file.path
                ),
            });
        }
        self.file
            .file
            .set_xattr(name, value)
            .map_err(|e| io_error(&self.file.path, e))
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        check_name(name)?;
        self.enabled()?;
        match self.file.file.remove_xattr(name) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(61) => Ok(()), // ENODATA: not there
            Err(e) => Err(io_error(&self.file.path, e)),
        }
    }

    pub fn list(&self) -> Result<Vec<String>> {
        self.enabled()?;
        let names = self
            .file
            .file
            .list_xattr()
            .map_err(|e| io_error(&self.file.path, e))?;
        Ok(names
            .filter_map(|n| n.into_string().ok())
            .filter(|n| n.starts_with("user.") && !n.starts_with(HOST_PREFIX))
            .collect())
    }
}

/// Whether the root's file system stores `user.` attributes: set one on a
/// scratch file in the root, read it back, remove the file.
pub fn probe(root: &RootFs, support: XattrSupport) -> Result<()> {
    static PROBES: AtomicU64 = AtomicU64::new(0);
    let scratch = format!(
        ".image-cache-xattr-probe-{}-{}",
        std::process::id(),
        PROBES.fetch_add(1, Ordering::Relaxed)
    );
    // In incomplete/ (if the driver made it) so that no listing of the
    // root takes the scratch file for an image while it exists.
    let mut name = format!("incomplete/{scratch}");
    let file = match root.create_new(&name) {
        Ok(file) => file,
        Err(e) if e.code == ErrorCode::NotFound => {
            name = scratch;
            root.create_new(&name)?
        }
        Err(e) => return Err(e),
    };
    let attrs = Attributes {
        file: &file,
        support,
    };
    let result = attrs
        .set("user.image-cache-probe", b"1")
        .and_then(|()| attrs.get("user.image-cache-probe"))
        .and_then(|v| match &v[..] {
            b"1" => Ok(()),
            _ => Err(unsupported("the cache root")),
        });
    let _ = root.remove_file(&name);
    // The guest learns that the root lacks support, never where it is.
    result.map_err(|e| match e.code {
        ErrorCode::Unsupported | ErrorCode::NotFound => unsupported("the cache root"),
        _ => e,
    })
}

/// What the `xattr` host functions borrow from a store.
pub struct XattrView<'a> {
    pub root: &'a RootFs,
    pub table: &'a mut ResourceTable,
    pub support: XattrSupport,
}

impl XattrView<'_> {
    fn attrs(&self, f: &Resource<OpenFile>) -> wasmtime::Result<Attributes<'_>> {
        Ok(Attributes {
            file: self.table.get(f)?,
            support: self.support,
        })
    }
}

impl wit::Host for XattrView<'_> {
    fn get(&mut self, f: Resource<OpenFile>, name: String) -> wasmtime::Result<Result<Vec<u8>>> {
        Ok(self.attrs(&f)?.get(&name))
    }

    fn set(
        &mut self,
        f: Resource<OpenFile>,
        name: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<()>> {
        Ok(self.attrs(&f)?.set(&name, &value))
    }

    fn remove(&mut self, f: Resource<OpenFile>, name: String) -> wasmtime::Result<Result<()>> {
        Ok(self.attrs(&f)?.remove(&name))
    }

    fn list_names(&mut self, f: Resource<OpenFile>) -> wasmtime::Result<Result<Vec<String>>> {
        Ok(self.attrs(&f)?.list())
    }

    fn probe(&mut self) -> wasmtime::Result<Result<()>> {
        Ok(probe(self.root, self.support))
    }
}

struct HasXattr;

impl HasData for HasXattr {
    type Data<'a> = XattrView<'a>;
}

/// Add the `xattr` interface to a linker; `view` borrows it from the store.
pub fn add_to_linker<T: 'static>(
    linker: &mut Linker<T>,
    view: fn(&mut T) -> XattrView<'_>,
) -> wasmtime::Result<()> {
    wit::add_to_linker::<T, HasXattr>(linker, view)?;
    // Contract 0.2.0's names, served by the same functions.
    crate::compat::v0_2::link_xattr(linker, view)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_user_names_pass() {
        for name in [
            "trusted.x",
            "security.selinux",
            "system.posix_acl_access",
            "user.",
            "hits",
            "USER.x",
        ] {
            assert_eq!(
                check_name(name).unwrap_err().code,
                ErrorCode::AccessDenied,
                "{name}"
            );
        }
        check_name("user.hits").unwrap();
        assert!(check_name(&format!("user.{}", "x".repeat(300))).is_err());
    }

    #[test]
    fn attributes_live_on_the_open_file() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path()).unwrap();
        root.create_dir("incomplete").unwrap();
        let file = root.create_new("incomplete/img").unwrap();
        let attrs = Attributes {
            file: &file,
            support: XattrSupport::FileSystem,
        };
        assert_eq!(
            attrs.get("user.hits").unwrap_err().code,
            ErrorCode::NotFound
        );
        attrs.set("user.hits", b"3").unwrap();
        assert_eq!(attrs.get("user.hits").unwrap(), b"3");
        assert_eq!(attrs.list().unwrap(), ["user.hits"]);
        // Renaming does not matter: the attribute follows the open file.
        root.rename("incomplete/img", "img").unwrap();
        attrs.set("user.hits", b"4").unwrap();
        let reopened = root.open("img").unwrap();
        let again = Attributes {
            file: &reopened,
            support: XattrSupport::FileSystem,
        };
        assert_eq!(again.get("user.hits").unwrap(), b"4");
        attrs.remove("user.hits").unwrap();
        attrs.remove("user.hits").unwrap();
        assert_eq!(
            attrs.set("trusted.hits", b"1").unwrap_err().code,
            ErrorCode::AccessDenied
        );
        assert_eq!(
            attrs
                .set("user.big", &vec![0u8; MAX_VALUE + 1])
                .unwrap_err()
                .code,
            ErrorCode::LimitExceeded
        );
    }

    #[test]
    fn probe_reports_support_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let root = RootFs::new(dir.path()).unwrap();
        probe(&root, XattrSupport::FileSystem).unwrap();
        let e = probe(&root, XattrSupport::Disabled).unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported);
        assert!(
            !e.message.contains(&dir.path().display().to_string()),
            "the guest never learns where the root is: {}",
            e.message
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "scratch files removed"
        );
    }
}
