//! What a driver component says about itself before any of it is compiled:
//! the contract version it speaks and the interfaces it imports, read from
//! the component's binary (its top-level import and export names).
//!
//! Version policy: the contract is the WIT package `image-cache:driver`.
//! While it is `0.x`, a minor bump (0.2 -> 0.3) may break drivers, so the
//! host runs exactly one minor line (`>=0.3.0, <0.4.0`) and a patch bump
//! only adds (a new optional import, a documented detail). From `1.0` on, a
//! minor bump only adds and a major bump breaks. A component of another
//! line is refused before compilation, with a message naming its version
//! and the supported range.

use std::fmt;

use crate::error::{Error, Result};
use crate::limits::printable;

/// The WIT package of the contract.
pub const PACKAGE: &str = "image-cache:driver";
/// The interface every driver exports.
pub const EXPORT: &str = "cache-driver";
/// The contract version this host implements.
pub const VERSION: Version = Version {
    major: 0,
    minor: 3,
    patch: 0,
};
/// The contract versions this host runs, for messages: the current line,
/// and 0.2.0 through an adapter (host/src/compat).
pub const SUPPORTED: &str = ">=0.3.0, <0.4.0, and 0.2.0 through an adapter";

/// What a driver author must change to move a driver of an older contract
/// line to this one, for the refusal message.
fn upgrade_advice(version: Version) -> &'static str {
    match (version.major, version.minor) {
        (0, 2) => {
            "contract 0.3.0 retired the host-side `sqlite` import (link SQLite into the \
             driver over the `fs` import's read-at, write-at and set-range-lock, as the \
             built-in sqlite driver does: guest/sqlite-vfs), carries the fs error code in \
             the `io` error and adds clock.sleep; rebuild the driver against wit/ of this \
             release"
        }
        (0, 1) => {
            "contract 0.1 drivers imported WASI; rebuild the driver against wit/ of this \
             release for wasm32-unknown-unknown"
        }
        _ => "rebuild the driver against wit/ of this release",
    }
}

/// A contract version (semver, no pre-release).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(s: &str) -> Option<Version> {
        let mut parts = s.split('.');
        let mut next = || parts.next()?.parse::<u64>().ok();
        let v = Version {
            major: next()?,
            minor: next()?,
            patch: next()?,
        };
        parts.next().is_none().then_some(v)
    }

    /// Whether this host runs components of contract `self`, natively or
    /// through an adapter.
    pub fn is_supported(&self) -> bool {
        self.is_current() || self.is_adapted()
    }

    /// Whether `self` is an earlier contract linked through an adapter
    /// (0.2.0, less its retired `sqlite` import).
    pub fn is_adapted(&self) -> bool {
        *self
            == Version {
                major: 0,
                minor: 2,
                patch: 0,
            }
    }

    /// Whether `self` is of the contract line this host implements.
    pub fn is_current(&self) -> bool {
        if VERSION.major == 0 {
            (self.major, self.minor) == (0, VERSION.minor) && *self <= VERSION
        } else {
            self.major == VERSION.major && *self <= VERSION
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A host interface a driver can be granted. `fs`, `clock` and `types`
/// (which holds only types) come with every driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    Xattr,
    Database,
}

impl Capability {
    pub const ALL: [Capability; 2] = [Capability::Xattr, Capability::Database];

    pub fn name(self) -> &'static str {
        match self {
            Capability::Xattr => "xattr",
            Capability::Database => "database",
        }
    }

    pub fn parse(s: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == s)
    }
}

/// Interfaces every driver is linked with.
pub const ALWAYS_LINKED: &[&str] = &["fs", "clock", "types"];

/// Grants of earlier contracts that name nothing any more: accepted in an
/// operator's list (with a warning) so a configuration keeps working.
/// `sqlite` was the host-side SQLite import of contract 0.2; SQLite now
/// runs inside the driver, over `fs`.
pub const RETIRED: &[&str] = &["sqlite"];

/// A grant in an operator's list that names no capability.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown capability {word:?}: grant any of xattr, database (fs and clock come with every driver)"
)]
pub struct UnknownCapability {
    /// The word as the operator wrote it.
    pub word: String,
}

/// Why a binary's top-level names cannot be read: it is no component.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotAComponent {
    /// The parser's complaint.
    #[error("it is not a valid WebAssembly component: {0}")]
    Invalid(String),
    #[error(
        "it is a core WebAssembly module, not a component (turn it into one with `wasm-tools component new`)"
    )]
    CoreModule,
    #[error("unreadable import: {0}")]
    UnreadableImport(String),
    #[error("unreadable export: {0}")]
    UnreadableExport(String),
    #[error("it is truncated")]
    Truncated,
}

/// A set of granted capabilities.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Grants {
    pub xattr: bool,
    pub database: bool,
}

impl Grants {
    /// Only `fs` (and the clock): what a third-party driver gets by default.
    pub const NONE: Grants = Grants {
        xattr: false,
        database: false,
    };

    pub fn of(capabilities: &[Capability]) -> Grants {
        let mut g = Grants::NONE;
        for c in capabilities {
            g = g.with(*c);
        }
        g
    }

    pub fn with(mut self, c: Capability) -> Grants {
        match c {
            Capability::Xattr => self.xattr = true,
            Capability::Database => self.database = true,
        }
        self
    }

    pub fn allows(&self, c: Capability) -> bool {
        match c {
            Capability::Xattr => self.xattr,
            Capability::Database => self.database,
        }
    }

    /// `xattr,database` (Glance-style list option); empty means none.
    pub fn parse(list: &str) -> std::result::Result<Grants, UnknownCapability> {
        let mut g = Grants::NONE;
        for word in list
            .split([',', ' '])
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            match Capability::parse(word) {
                Some(c) => g = g.with(c),
                None if ALWAYS_LINKED.contains(&word) => {}
                None if RETIRED.contains(&word) => log::warn!(
                    "the grant {word:?} is retired (contract 0.3.0 runs SQLite inside the \
                     driver, over fs) and grants nothing; remove it from the list"
                ),
                None => {
                    return Err(UnknownCapability {
                        word: word.to_string(),
                    });
                }
            }
        }
        Ok(g)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut names = vec!["fs", "clock"];
        names.extend(
            Capability::ALL
                .into_iter()
                .filter(|c| self.allows(*c))
                .map(Capability::name),
        );
        names
    }
}

impl fmt::Display for Grants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.names().join(","))
    }
}

/// What a component binary declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// The contract version of its exported `cache-driver` interface.
    pub version: Version,
    /// Every import name, as in the binary (`image-cache:driver/fs@0.2.0`).
    pub imports: Vec<String>,
    /// The capabilities its imports need beyond `fs` and `clock`.
    pub needs: Vec<Capability>,
}

/// What a component binary says, whatever this host makes of it (for
/// `image-cache drivers inspect`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Declared {
    pub imports: Vec<String>,
    pub exports: Vec<String>,
    /// The version of its `cache-driver` export, if it has one.
    pub version: Option<String>,
    /// The capabilities its imports name (beyond `fs` and `clock`).
    pub needs: Vec<Capability>,
    /// What it says of itself in its `image-cache:driver-info` custom
    /// section (name, version, description; untrusted text), read without
    /// running any of its code.
    pub info: Option<DriverInfoSection>,
}

/// The text of a driver's `image-cache:driver-info` section, each field
/// made printable and cut (it is the driver's word, shown to operators).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverInfoSection {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// The custom section drivers declare themselves in.
pub const INFO_SECTION: &str = "image-cache:driver-info";

impl DriverInfoSection {
    fn parse(data: &[u8]) -> DriverInfoSection {
        let text = String::from_utf8_lossy(&data[..data.len().min(4096)]);
        let mut parts = text.splitn(3, '\n');
        let mut next = |max| printable(parts.next().unwrap_or_default(), max);
        DriverInfoSection {
            name: next(64),
            version: next(64),
            description: next(512),
        }
    }
}

/// Read the import and export names of a component binary, and its
/// `image-cache:driver-info` section.
pub fn declared(bytes: &[u8]) -> std::result::Result<Declared, NotAComponent> {
    let info = info_section(bytes).map(|data| DriverInfoSection::parse(&data));
    let (imports, exports) = top_level_names(bytes)?;
    let prefix = format!("{PACKAGE}/{EXPORT}@");
    let version = exports
        .iter()
        .find_map(|e| e.strip_prefix(&prefix))
        .map(str::to_string);
    let mut needs: Vec<Capability> = imports
        .iter()
        .filter_map(|i| split_import(i).and_then(|(name, _)| Capability::parse(name)))
        .collect();
    needs.sort();
    needs.dedup();
    let shown =
        |names: Vec<String>| -> Vec<String> { names.iter().map(|n| printable(n, 256)).collect() };
    Ok(Declared {
        imports: shown(imports),
        exports: shown(exports),
        version: version.map(|v| printable(&v, 64)),
        needs,
        info,
    })
}

/// The first `image-cache:driver-info` custom section anywhere in the
/// binary (a driver's core module keeps it inside the component).
fn info_section(bytes: &[u8]) -> Option<Vec<u8>> {
    use wasmparser::{Parser, Payload};
    for payload in Parser::new(0).parse_all(bytes) {
        match payload {
            Ok(Payload::CustomSection(section)) if section.name() == INFO_SECTION => {
                return Some(section.data().to_vec());
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    None
}

/// Read a component's contract version and imports without compiling it.
/// A core module, a component that exports no `cache-driver`, or one that
/// imports anything outside the contract is refused here, by name.
pub fn read_manifest(driver: &str, bytes: &[u8]) -> Result<Manifest> {
    let refuse = |message: String| Error::Load {
        driver: driver.to_string(),
        message,
    };
    let (imports, exports) = top_level_names(bytes).map_err(|e| refuse(e.to_string()))?;
    // The names are the component's words: printable before any message.
    let shown =
        |names: Vec<String>| -> Vec<String> { names.iter().map(|n| printable(n, 256)).collect() };
    let (imports, exports) = (shown(imports), shown(exports));
    let prefix = format!("{PACKAGE}/{EXPORT}@");
    let exported = exports
        .iter()
        .find_map(|e| e.strip_prefix(&prefix))
        .ok_or_else(|| {
            refuse(format!(
                "it exports no {PACKAGE}/{EXPORT} interface (exports: {}); it is not an image-cache driver",
                if exports.is_empty() { "none".to_string() } else { exports.join(", ") }
            ))
        })?;
    let version = Version::parse(exported).ok_or_else(|| {
        refuse(format!(
            "its contract version {exported:?} is not a version"
        ))
    })?;
    if !version.is_supported() {
        return Err(refuse(format!(
            "it speaks contract {PACKAGE}@{version}; this host runs {SUPPORTED} ({})",
            upgrade_advice(version)
        )));
    }
    let mut needs = Vec::new();
    for import in &imports {
        if version.is_adapted() && split_import(import).is_some_and(|(i, _)| i == "sqlite") {
            return Err(refuse(format!(
                "it imports {import}, which contract 0.3.0 retired: this host runs contract \
                 {version} drivers through an adapter, but not that import ({})",
                upgrade_advice(version)
            )));
        }
        let (interface, import_version) = split_import(import).ok_or_else(|| {
            refuse(format!(
                "it imports {import}, which is not part of the driver contract"
            ))
        })?;
        if import_version != version.to_string() {
            return Err(refuse(format!(
                "it imports {import} but exports contract {version}: one component speaks one contract version"
            )));
        }
        match Capability::parse(interface) {
            Some(c) => needs.push(c),
            None if ALWAYS_LINKED.contains(&interface) => {}
            None => {
                return Err(refuse(format!(
                    "it imports {import}, which is not an interface of the driver contract"
                )));
            }
        }
    }
    needs.sort();
    needs.dedup();
    Ok(Manifest {
        version,
        imports,
        needs,
    })
}

/// `image-cache:driver/fs@0.3.0` -> (`fs`, `0.3.0`).
fn split_import(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix(PACKAGE)?.strip_prefix('/')?;
    rest.split_once('@')
}

/// The component's top-level import and export names.
fn top_level_names(bytes: &[u8]) -> std::result::Result<(Vec<String>, Vec<String>), NotAComponent> {
    use wasmparser::{Encoding, Parser, Payload};
    let mut imports = Vec::new();
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| NotAComponent::Invalid(e.to_string()))?;
        match payload {
            Payload::Version { encoding, .. } => {
                if depth == 0 && encoding != Encoding::Component {
                    return Err(NotAComponent::CoreModule);
                }
                depth += 1;
            }
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ComponentImportSection(section) if depth == 1 => {
                for import in section {
                    let import =
                        import.map_err(|e| NotAComponent::UnreadableImport(e.to_string()))?;
                    imports.push(import.name.name.to_string());
                }
            }
            Payload::ComponentExportSection(section) if depth == 1 => {
                for export in section {
                    let export =
                        export.map_err(|e| NotAComponent::UnreadableExport(e.to_string()))?;
                    exports.push(export.name.name.to_string());
                }
            }
            _ => {}
        }
    }
    if depth != 0 && imports.is_empty() && exports.is_empty() {
        return Err(NotAComponent::Truncated);
    }
    Ok((imports, exports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_in_the_supported_line_only() {
        assert!(Version::parse("0.3.0").unwrap().is_supported());
        assert!(!Version::parse("0.1.0").unwrap().is_supported());
        assert!(Version::parse("0.2.0").unwrap().is_supported());
        assert!(Version::parse("0.2.0").unwrap().is_adapted());
        assert!(!Version::parse("0.2.1").unwrap().is_supported());
        assert!(!Version::parse("0.4.0").unwrap().is_supported());
        assert!(!Version::parse("1.0.0").unwrap().is_supported());
        assert!(
            !Version::parse("0.3.1").unwrap().is_supported(),
            "newer than the host"
        );
        assert_eq!(Version::parse("0.2"), None);
        assert_eq!(Version::parse("0.2.0.1"), None);
        assert_eq!(Version::parse("a.b.c"), None);
    }

    #[test]
    fn grants_parse_operator_lists() {
        assert_eq!(Grants::parse("").unwrap(), Grants::NONE);
        assert_eq!(
            Grants::parse("xattr, database").unwrap(),
            Grants::of(&[Capability::Xattr, Capability::Database])
        );
        assert_eq!(
            Grants::parse("xattr,sqlite").unwrap(),
            Grants::of(&[Capability::Xattr]),
            "the retired grant is accepted and grants nothing"
        );
        assert_eq!(Grants::parse("fs,clock").unwrap(), Grants::NONE);
        let e = Grants::parse("network").unwrap_err();
        assert_eq!(e.word, "network");
        assert_eq!(
            e.to_string(),
            "unknown capability \"network\": grant any of xattr, database (fs and clock come with every driver)"
        );
        assert_eq!(
            Grants::of(&[Capability::Database]).to_string(),
            "fs,clock,database"
        );
    }

    #[test]
    fn a_core_module_or_garbage_is_refused_by_name() {
        let core = b"\0asm\x01\0\0\0";
        let e = read_manifest("x.wasm", core).unwrap_err().to_string();
        assert!(
            e.contains("core WebAssembly module, not a component"),
            "{e}"
        );
        let e = read_manifest("x.wasm", b"not wasm at all")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a valid WebAssembly component"), "{e}");
        assert_eq!(declared(core), Err(NotAComponent::CoreModule));
        assert!(matches!(
            declared(b"not wasm at all"),
            Err(NotAComponent::Invalid(_))
        ));
    }
}
