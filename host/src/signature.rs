//! Driver signatures: who vouched for a component file, checked before it
//! is compiled.
//!
//! **The format** is the WebAssembly tool-conventions signature format
//! (`tool-conventions/Signatures.md`), as the `wasmsign2` crate and tool
//! implement it: Ed25519 over the SHA-256 of the component's top-level
//! sections, in a custom section named `signature` placed first. A
//! component carries any number of signatures (by different keys): signing
//! adds one and keeps the others. The wasmtime host loads a signed
//! component unchanged (a custom section is no code).
//!
//! **Embedded or detached.** The embedded signature is the primary form: it
//! travels with the component through every copy, package and OCI registry,
//! and cannot be separated from it by accident. The same signature bytes may
//! instead sit in a file beside a component file, `<component>.sig`
//! ([`detached_path`]), for a component that must stay byte-identical
//! (another tool's checksum, a read-only store); it is read only when the
//! component carries no embedded signature.
//!
//! **Key ids** are `wasmsign2`'s default: the first 12 bytes of
//! HMAC-SHA256 keyed with `key_id` over the public key, in hex. [`sign`]
//! stores it with the signature, so a refusal can name who signed a
//! component; a signature without one (`wasmsign2 sign` without
//! `--public-key`) still verifies.
//!
//! **Key files**: `wasmsign2`'s raw format (what [`generate_key_pair`] and
//! `wasmsign2 keygen` write: a type byte, then the key), DER, or PEM (as
//! `openssl genpkey -algorithm ed25519` writes), for public and secret keys
//! alike.
//!
//! **What is checked where**: with trusted keys configured
//! (`LoadPolicy::trusted_keys`), the runtime calls [`check`] on a component
//! file's bytes (and its `.sig`, if any) before anything else is done with
//! them, a memoized compiled component included. Built-in drivers are not
//! checked: their bytes are part of the host binary, trusted as it is.
//!
//! This module uses nothing of the crate but its error type.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use wasmsign2::{KeyPair, Module, PublicKey, PublicKeySet, SecretKey, WSError};

use crate::error::Error;

/// What a detached signature's file name adds to its component's:
/// `driver.wasm` is signed by `driver.wasm.sig`.
pub const DETACHED_SUFFIX: &str = ".sig";

/// Where the detached signature of the component file `component` is.
pub fn detached_path(component: &Path) -> PathBuf {
    let mut name = OsString::from(component.as_os_str());
    name.push(DETACHED_SUFFIX);
    PathBuf::from(name)
}

/// Why a key, a component or its signature cannot be used. Messages name
/// the file involved.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A key file cannot be read or holds no usable key.
    #[error("key file {}: {reason}", path.display())]
    KeyFile { path: PathBuf, reason: String },
    /// Key bytes of no file are no usable key.
    #[error("{0}")]
    Key(String),
    /// A key set was asked for with no key in it.
    #[error("no public key given")]
    NoKeys,
    /// The bytes are no component, or its signature cannot be read.
    #[error("{0}")]
    Component(String),
    /// The key already signed these bytes.
    #[error("it is already signed by key id {0}")]
    AlreadySigned(String),
    /// A detached signature for a component that carries embedded ones
    /// would never verify (it would cover the embedded section).
    #[error(
        "it carries an embedded signature: add yours to it (embedded) rather than in a detached file"
    )]
    DetachedOverEmbedded,
}

/// The key id of a public key (hex).
fn key_id_of(pk: &PublicKey) -> String {
    let with_id = PublicKey {
        pk: pk.pk,
        key_id: None,
    }
    .attach_default_key_id();
    hex::encode(with_id.key_id().map(Vec::as_slice).unwrap_or_default())
}

/// A public key from a key file's bytes, any format; `what` names it.
fn public_key(bytes: &[u8]) -> Result<PublicKey, String> {
    match PublicKey::from_any(bytes) {
        Ok(pk) => Ok(PublicKey {
            pk: pk.pk,
            key_id: None,
        }),
        Err(_) if SecretKey::from_any(bytes).is_ok() => Err(
            "it is a secret key: trust the public key instead (the secret key stays with whoever signs)"
                .into(),
        ),
        Err(_) => Err(
            "not an Ed25519 public key (wasmsign2's raw format, DER or PEM)".into(),
        ),
    }
}

/// One key a driver may be signed by.
#[derive(Clone)]
struct TrustedKey {
    /// Without a key id: a signature by this key verifies whatever key id
    /// (or none) it names.
    key: PublicKey,
    id: String,
    /// The file it came from (or what the embedder called it).
    source: String,
}

/// The public keys a driver component file must be signed by, one of them
/// at least: the operator's trust setting (`--driver-trust`,
/// `image_cache_driver_trusted_keys`).
#[derive(Clone, Default)]
pub struct TrustedKeys {
    keys: Vec<TrustedKey>,
}

impl TrustedKeys {
    /// The keys in `paths` (one public key a file, any format). Fails on
    /// no paths, on a file that cannot be read and on one that holds no
    /// public key (a secret key included), naming the file.
    pub fn from_files(paths: &[PathBuf]) -> Result<TrustedKeys, SignatureError> {
        if paths.is_empty() {
            return Err(SignatureError::NoKeys);
        }
        let mut keys = TrustedKeys::default();
        for path in paths {
            let key_file = |reason: String| SignatureError::KeyFile {
                path: path.clone(),
                reason,
            };
            let bytes = std::fs::read(path).map_err(|e| key_file(e.to_string()))?;
            let key = public_key(&bytes).map_err(key_file)?;
            keys.insert(key, path.display().to_string());
        }
        Ok(keys)
    }

    /// Add the public key in `bytes` (any format), called `source` in
    /// messages.
    pub fn add(&mut self, source: &str, bytes: &[u8]) -> Result<(), SignatureError> {
        let key =
            public_key(bytes).map_err(|why| SignatureError::Key(format!("{source}: {why}")))?;
        self.insert(key, source.to_string());
        Ok(())
    }

    fn insert(&mut self, key: PublicKey, source: String) {
        if self.keys.iter().any(|k| k.key == key) {
            return;
        }
        self.keys.push(TrustedKey {
            id: key_id_of(&key),
            key,
            source,
        });
    }

    /// The keys' ids (hex), in the order given.
    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Where the key with this id came from.
    pub fn source(&self, id: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|k| k.id == id)
            .map(|k| k.source.as_str())
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    fn contains_id(&self, id: &str) -> bool {
        self.keys.iter().any(|k| k.id == id)
    }
}

impl fmt::Debug for TrustedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("TrustedKeys").field(&self.ids()).finish()
    }
}

/// The same keys, whatever their order or files.
impl PartialEq for TrustedKeys {
    fn eq(&self, other: &Self) -> bool {
        let keys =
            |t: &TrustedKeys| -> HashSet<[u8; 32]> { t.keys.iter().map(|k| *k.key.pk).collect() };
        keys(self) == keys(other)
    }
}

impl Eq for TrustedKeys {}

/// A secret key to sign drivers with.
pub struct SigningKey {
    sk: SecretKey,
    /// Its public key's id, raw and hex.
    id: Vec<u8>,
    id_hex: String,
}

impl SigningKey {
    /// The secret key in `path` (any format).
    pub fn from_file(path: &Path) -> Result<SigningKey, SignatureError> {
        let key_file = |reason: String| SignatureError::KeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| key_file(e.to_string()))?;
        SigningKey::parse(&bytes).map_err(key_file)
    }

    /// The secret key in `bytes` (any format).
    pub fn from_bytes(bytes: &[u8]) -> Result<SigningKey, SignatureError> {
        SigningKey::parse(bytes).map_err(SignatureError::Key)
    }

    fn parse(bytes: &[u8]) -> Result<SigningKey, String> {
        let sk = match SecretKey::from_any(bytes) {
            Ok(sk) => sk,
            Err(_) if PublicKey::from_any(bytes).is_ok() => {
                return Err("it is a public key: signing needs the secret key".into());
            }
            Err(_) => {
                return Err(
                    "not an Ed25519 secret key (wasmsign2's raw format, DER or PEM)".into(),
                );
            }
        };
        let pk = PublicKey {
            pk: sk.sk.public_key(),
            key_id: None,
        };
        let id_hex = key_id_of(&pk);
        Ok(SigningKey {
            id: hex::decode(&id_hex).unwrap_or_default(),
            id_hex,
            sk,
        })
    }

    /// Its public key's id (hex), the one its signatures name.
    pub fn key_id(&self) -> &str {
        &self.id_hex
    }

    /// Its public key, in `wasmsign2`'s raw format.
    pub fn public_key(&self) -> Vec<u8> {
        PublicKey {
            pk: self.sk.sk.public_key(),
            key_id: None,
        }
        .to_bytes()
    }
}

impl fmt::Debug for SigningKey {
    /// The key id, never the secret.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.id_hex)
            .finish_non_exhaustive()
    }
}

/// A new key pair, in `wasmsign2`'s raw format (what its `keygen` writes).
pub struct GeneratedKeys {
    pub secret_key: Vec<u8>,
    pub public_key: Vec<u8>,
    /// The public key's id (hex).
    pub key_id: String,
}

impl fmt::Debug for GeneratedKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GeneratedKeys")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

/// A new Ed25519 key pair, from the system's random source.
pub fn generate_key_pair() -> GeneratedKeys {
    let kp = KeyPair::generate();
    GeneratedKeys {
        secret_key: kp.sk.to_bytes(),
        public_key: kp.pk.to_bytes(),
        key_id: key_id_of(&kp.pk),
    }
}

/// Where a component's signatures are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Form {
    /// In its `signature` custom section.
    Embedded,
    /// In a detached signature (`<component>.sig`).
    Detached,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Form::Embedded => "embedded",
            Form::Detached => "detached",
        })
    }
}

/// The signatures a component carries, as read (not verified).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signatures {
    pub form: Form,
    /// How many signatures.
    pub count: usize,
    /// The key ids they name (hex), each once, in order.
    pub key_ids: Vec<String>,
    /// How many name no key id.
    pub anonymous: usize,
}

impl Signatures {
    /// `an embedded signature by key id X`, `detached signatures by key
    /// ids X, Y and 1 without a key id`.
    pub fn describe(&self) -> String {
        let article = match (self.count, self.form) {
            (1, Form::Embedded) => "an embedded signature",
            (1, Form::Detached) => "a detached signature",
            (_, Form::Embedded) => "embedded signatures",
            (_, Form::Detached) => "detached signatures",
        };
        let mut parts = Vec::new();
        match self.key_ids.len() {
            0 => {}
            1 => parts.push(format!("by key id {}", self.key_ids[0])),
            _ => parts.push(format!("by key ids {}", self.key_ids.join(", "))),
        }
        if self.anonymous > 0 {
            let without = if self.key_ids.is_empty() {
                "without a key id".to_string()
            } else {
                format!("and {} without a key id", self.anonymous)
            };
            parts.push(without);
        }
        format!("{article} {}", parts.join(" "))
    }
}

/// What verifying a component against keys found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Its signatures (embedded, else detached), none if it carries none.
    pub signatures: Option<Signatures>,
    /// The ids (hex) of the given keys whose signature verifies it.
    pub verified_by: Vec<String>,
}

impl Verification {
    /// Whether one of the keys verifies it.
    pub fn verified(&self) -> bool {
        !self.verified_by.is_empty()
    }
}

/// The signatures of `bytes` (embedded, else those of `detached`) and which
/// of `keys` verify it. Nothing of the component is compiled or run.
pub fn verify_report(
    bytes: &[u8],
    detached: Option<&[u8]>,
    keys: &TrustedKeys,
) -> Result<Verification, SignatureError> {
    check_layout(bytes)?;
    let (form, payload) = match (embedded_payload(bytes), detached) {
        (Some(payload), _) => (Form::Embedded, payload),
        (None, Some(detached)) => (Form::Detached, detached),
        (None, None) => {
            return Ok(Verification {
                signatures: None,
                verified_by: Vec::new(),
            });
        }
    };
    if !signature_data_in_bounds(payload) {
        return Err(SignatureError::Component(format!(
            "its {form} signature is malformed"
        )));
    }
    let info = wasmsign2::signature_info_from_detached(payload).map_err(|e| {
        SignatureError::Component(format!("its {form} signature cannot be read ({e})"))
    })?;
    let mut key_ids: Vec<String> = Vec::new();
    for id in info.key_ids().iter().map(hex::encode) {
        if !key_ids.contains(&id) {
            key_ids.push(id);
        }
    }
    let signatures = Signatures {
        form,
        count: info.signature_count(),
        anonymous: info.signature_count() - info.key_ids().len(),
        key_ids,
    };
    let set = PublicKeySet::new(keys.keys.iter().map(|k| k.key.clone()).collect());
    let detached = (form == Form::Detached).then_some(payload);
    let verified_by = match set.verify(&mut Cursor::new(bytes), detached) {
        Ok(found) => keys
            .keys
            .iter()
            .filter(|k| found.contains(&k.key))
            .map(|k| k.id.clone())
            .collect(),
        Err(WSError::VerificationFailed | WSError::NoSignatures) => Vec::new(),
        Err(e) => {
            return Err(SignatureError::Component(format!(
                "its {form} signature cannot be checked ({e})"
            )));
        }
    };
    Ok(Verification {
        signatures: Some(signatures),
        verified_by,
    })
}

/// Refuse `bytes` (with the detached signature `detached`, if any) unless
/// one of `trusted` signed exactly these bytes: a load error for the
/// driver `name`, naming the key ids found and trusted.
pub fn check(
    name: &str,
    bytes: &[u8],
    detached: Option<&[u8]>,
    trusted: &TrustedKeys,
) -> Result<String, Error> {
    let refuse = |message: String| Error::Load {
        driver: name.to_string(),
        message: format!("{message}; refused before compiling it"),
    };
    let report = verify_report(bytes, detached, trusted).map_err(|e| refuse(e.to_string()))?;
    let trusted_ids = match trusted.ids().as_slice() {
        [] => "none".to_string(),
        [one] => format!("key id {one}"),
        ids => format!("key ids {}", ids.join(", ")),
    };
    let Some(signatures) = &report.signatures else {
        return Err(refuse(format!(
            "it carries no signature (neither embedded nor in a detached {DETACHED_SUFFIX} file \
             beside it); a driver must be signed by one of the trusted keys ({trusted_ids})"
        )));
    };
    if let Some(id) = report.verified_by.first() {
        log::info!(
            "driver {name}: {} verified by trusted key id {id} ({})",
            signatures.describe(),
            trusted.source(id).unwrap_or_default()
        );
        return Ok(format!(
            "{}, verified by trusted key id {id}",
            signatures.describe()
        ));
    }
    let mut message = format!(
        "no trusted key verifies it: it carries {} (trusted: {trusted_ids})",
        signatures.describe()
    );
    let changed: Vec<&str> = signatures
        .key_ids
        .iter()
        .filter(|id| trusted.contains_id(id))
        .map(String::as_str)
        .collect();
    if !changed.is_empty() {
        message.push_str(&format!(
            "; the signature by trusted key id {} does not match its bytes: they changed after \
             it was signed",
            changed.join(", ")
        ));
    }
    Err(refuse(message))
}

/// Sign a component with `key`, adding to the signatures it carries.
/// Embedded: the signed component, no detached signature. Detached: the
/// component unchanged and the signature, for `<component>.sig` (a
/// component that carries embedded signatures is refused: a detached
/// signature of it would not verify).
pub fn sign(
    bytes: &[u8],
    key: &SigningKey,
    detached: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>), SignatureError> {
    sign_with(bytes, None, key, detached)
}

/// A detached signature of `bytes` by `key` that keeps the signatures of
/// the detached signature `previous` (several signers, one `.sig` file).
pub fn sign_detached_adding(
    bytes: &[u8],
    previous: &[u8],
    key: &SigningKey,
) -> Result<Vec<u8>, SignatureError> {
    let (_, signature) = sign_with(bytes, Some(previous), key, true)?;
    Ok(signature.unwrap_or_default())
}

fn sign_with(
    bytes: &[u8],
    previous: Option<&[u8]>,
    key: &SigningKey,
    detached: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>), SignatureError> {
    check_layout(bytes)?;
    let embedded = embedded_payload(bytes);
    if detached && embedded.is_some() {
        return Err(SignatureError::DetachedOverEmbedded);
    }
    for payload in embedded.into_iter().chain(previous) {
        if !signature_data_in_bounds(payload) {
            return Err(SignatureError::Component(
                "its signature is malformed".into(),
            ));
        }
    }
    let unreadable = |e: WSError| SignatureError::Component(format!("it cannot be read ({e})"));
    let mut module = Module::deserialize(&mut Cursor::new(bytes)).map_err(unreadable)?;
    if let Some(previous) = previous {
        module = module.attach_signature(previous).map_err(unreadable)?;
    }
    let (module, signature) = key
        .sk
        .sign_multi(module, Some(&key.id), detached, false)
        .map_err(|e| match e {
            WSError::DuplicateSignature => SignatureError::AlreadySigned(key.id_hex.clone()),
            e => SignatureError::Component(format!("it cannot be signed ({e})")),
        })?;
    if detached {
        return Ok((bytes.to_vec(), Some(signature)));
    }
    let mut out = Vec::with_capacity(bytes.len() + signature.len() + 16);
    module
        .serialize(&mut out)
        .map_err(|e| SignatureError::Component(format!("it cannot be written ({e})")))?;
    Ok((out, None))
}

/// The signatures a component carries (embedded, else in `detached`),
/// without verifying any.
pub fn signatures(
    bytes: &[u8],
    detached: Option<&[u8]>,
) -> Result<Option<Signatures>, SignatureError> {
    Ok(verify_report(bytes, detached, &TrustedKeys::default())?.signatures)
}

/// The header every WebAssembly binary starts with (then a version).
const MAGIC: &[u8; 4] = b"\0asm";

/// Bytes read front to back, every length checked against what is left.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.bytes.split_first()?;
        self.bytes = rest;
        Some(b)
    }

    /// An unsigned LEB128 of at most 5 bytes, read as `wasmsign2` reads it.
    fn u32(&mut self) -> Option<u32> {
        let mut v: u32 = 0;
        for i in 0..5 {
            let b = self.byte()?;
            v |= u32::from(b & 0x7f) << (i * 7);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (taken, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(taken)
    }

    /// A length-prefixed slice.
    fn slice(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// A WebAssembly binary whose top-level sections (and custom sections'
/// names) all lie within it: `wasmsign2` allocates what a length claims
/// before reading it, so no claim may exceed what is there.
fn check_layout(bytes: &[u8]) -> Result<(), SignatureError> {
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err(SignatureError::Component(
            "it is not a WebAssembly component (no \\0asm header)".into(),
        ));
    }
    let mut r = Reader { bytes: &bytes[8..] };
    while !r.bytes.is_empty() {
        let well_formed = (|| {
            let id = r.byte()?;
            if id & 0x80 != 0 {
                return None;
            }
            let payload = r.slice()?;
            if id == 0 {
                Reader { bytes: payload }.slice()?;
            }
            Some(())
        })();
        if well_formed.is_none() {
            return Err(SignatureError::Component(format!(
                "it is not a well-formed WebAssembly component (a section at byte {} runs past \
                 its end)",
                bytes.len() - r.bytes.len()
            )));
        }
    }
    Ok(())
}

/// The payload of the embedded signature section (the first section, a
/// custom one named `signature`), if any. `bytes` passed [`check_layout`].
fn embedded_payload(bytes: &[u8]) -> Option<&[u8]> {
    let mut r = Reader {
        bytes: bytes.get(8..)?,
    };
    if r.byte()? != 0 {
        return None;
    }
    let mut section = Reader { bytes: r.slice()? };
    (section.slice()? == b"signature").then_some(section.bytes)
}

/// Whether every length inside signature data (the embedded section's
/// payload or a detached signature) stays within it, as `wasmsign2` reads
/// it (`SignatureData`, `SignedHashes`, `SignatureForHashes`).
fn signature_data_in_bounds(data: &[u8]) -> bool {
    const MAX_HASHES: u32 = 64;
    const MAX_SIGNATURES: u32 = 256;
    let mut r = Reader { bytes: data };
    let checked = (|| {
        r.take(3)?; // version, content type, hash function
        let sets = r.u32()?;
        if sets > MAX_HASHES {
            return None;
        }
        for _ in 0..sets {
            let mut set = Reader { bytes: r.slice()? };
            let hashes = set.u32()?;
            if hashes > MAX_HASHES {
                return None;
            }
            set.take(hashes as usize * 32)?;
            let signatures = set.u32()?;
            if signatures > MAX_SIGNATURES {
                return None;
            }
            for _ in 0..signatures {
                let mut signature = Reader {
                    bytes: set.slice()?,
                };
                signature.slice()?; // key id
                signature.byte()?; // algorithm
                signature.slice()?; // signature
            }
        }
        Some(())
    })();
    checked.is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A component as far as signatures go: the header and two sections.
    fn component() -> Vec<u8> {
        let mut bytes = b"\0asm\x0d\0\x01\0".to_vec();
        // A custom section "name-ish" and a type section of no types.
        bytes.extend_from_slice(&[0, 5, 4, b'n', b'o', b't', b'e']);
        bytes.extend_from_slice(&[1, 1, 0]);
        bytes
    }

    fn keys() -> (SigningKey, TrustedKeys) {
        let generated = generate_key_pair();
        let signer = SigningKey::from_bytes(&generated.secret_key).unwrap();
        assert_eq!(signer.key_id(), generated.key_id);
        assert_eq!(signer.public_key(), generated.public_key);
        let mut trusted = TrustedKeys::default();
        trusted.add("test.pub", &generated.public_key).unwrap();
        assert_eq!(trusted.ids(), [generated.key_id.as_str()]);
        (signer, trusted)
    }

    fn refusal(result: Result<String, Error>) -> String {
        match result {
            Err(Error::Load { driver, message }) => {
                assert_eq!(driver, "d.wasm");
                assert!(
                    message.ends_with("; refused before compiling it"),
                    "{message}"
                );
                message
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn signed_components_pass_and_others_are_refused_naming_key_ids() {
        let (signer, trusted) = keys();
        let (other, _) = keys();
        let id = signer.key_id().to_string();
        let unsigned = component();

        let (signed, none) = sign(&unsigned, &signer, false).unwrap();
        assert!(none.is_none());
        assert!(signed.len() > unsigned.len());
        check("d.wasm", &signed, None, &trusted).unwrap();
        let report = verify_report(&signed, None, &trusted).unwrap();
        assert_eq!(report.verified_by, std::slice::from_ref(&id));
        assert_eq!(
            report.signatures.unwrap(),
            Signatures {
                form: Form::Embedded,
                count: 1,
                key_ids: vec![id.clone()],
                anonymous: 0
            }
        );

        let message = refusal(check("d.wasm", &unsigned, None, &trusted));
        assert!(
            message.starts_with("it carries no signature")
                && message.contains(&format!("trusted keys (key id {id})")),
            "{message}"
        );

        let (by_other, _) = sign(&unsigned, &other, false).unwrap();
        let message = refusal(check("d.wasm", &by_other, None, &trusted));
        assert!(
            message.starts_with(
                "no trusted key verifies it: it carries an embedded signature by key id "
            ) && message.contains(other.key_id())
                && message.contains(&format!("(trusted: key id {id})"))
                && !message.contains("changed"),
            "{message}"
        );

        let mut tampered = signed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        let message = refusal(check("d.wasm", &tampered, None, &trusted));
        assert!(
            message.starts_with("no trusted key verifies it")
                && message.contains(&format!(
                    "the signature by trusted key id {id} does not match its bytes"
                )),
            "{message}"
        );

        // Signing again adds: both keys' signatures verify.
        let (both, _) = sign(&by_other, &signer, false).unwrap();
        check("d.wasm", &both, None, &trusted).unwrap();
        let mut everyone = trusted.clone();
        everyone.add("other.pub", &other.public_key()).unwrap();
        assert_eq!(
            verify_report(&both, None, &everyone)
                .unwrap()
                .verified_by
                .len(),
            2
        );
        assert_eq!(
            sign(&both, &signer, false).unwrap_err(),
            SignatureError::AlreadySigned(id.clone())
        );
    }

    #[test]
    fn a_detached_signature_counts_only_without_an_embedded_one() {
        let (signer, trusted) = keys();
        let (other, _) = keys();
        let unsigned = component();
        let (same, signature) = sign(&unsigned, &signer, true).unwrap();
        assert_eq!(same, unsigned);
        let signature = signature.unwrap();
        check("d.wasm", &unsigned, Some(&signature), &trusted).unwrap();
        assert_eq!(
            signatures(&unsigned, Some(&signature))
                .unwrap()
                .unwrap()
                .form,
            Form::Detached
        );
        let mut changed = unsigned.clone();
        *changed.last_mut().unwrap() ^= 1;
        refusal(check("d.wasm", &changed, Some(&signature), &trusted));

        // Two signers in one .sig file.
        let by_other = sign(&unsigned, &other, true).unwrap().1.unwrap();
        let both = sign_detached_adding(&unsigned, &by_other, &signer).unwrap();
        check("d.wasm", &unsigned, Some(&both), &trusted).unwrap();
        assert_eq!(
            signatures(&unsigned, Some(&both)).unwrap().unwrap().count,
            2
        );

        // An embedded signature wins: the .sig beside it is not read.
        let (embedded_by_other, _) = sign(&unsigned, &other, false).unwrap();
        let message = refusal(check(
            "d.wasm",
            &embedded_by_other,
            Some(&signature),
            &trusted,
        ));
        assert!(
            message.contains("an embedded signature by key id"),
            "{message}"
        );
        assert_eq!(
            sign(&embedded_by_other, &signer, true).unwrap_err(),
            SignatureError::DetachedOverEmbedded
        );
    }

    #[test]
    fn key_files_in_every_format_and_clear_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let generated = generate_key_pair();
        let pk = PublicKey::from_bytes(&generated.public_key).unwrap();
        let raw = dir.path().join("raw.pub");
        let pem = dir.path().join("key.pem");
        let der = dir.path().join("key.der");
        std::fs::write(&raw, &generated.public_key).unwrap();
        std::fs::write(&pem, pk.to_pem()).unwrap();
        std::fs::write(&der, pk.to_der()).unwrap();
        let keys = TrustedKeys::from_files(&[raw.clone(), pem, der]).unwrap();
        assert_eq!(
            keys.ids(),
            [generated.key_id.as_str()],
            "one key, three files"
        );
        assert_eq!(
            keys.source(&generated.key_id),
            Some(raw.display().to_string().as_str())
        );
        assert_eq!(keys, TrustedKeys::from_files(&[raw]).unwrap());

        let secret = dir.path().join("key.sec");
        std::fs::write(&secret, &generated.secret_key).unwrap();
        let e = TrustedKeys::from_files(std::slice::from_ref(&secret)).unwrap_err();
        assert!(
            e.to_string().starts_with(&format!(
                "key file {}: it is a secret key",
                secret.display()
            )),
            "{e}"
        );
        let signer = SigningKey::from_file(&secret).unwrap();
        assert_eq!(signer.key_id(), generated.key_id);
        assert!(!format!("{signer:?}").contains(&hex::encode(&generated.secret_key[1..])));

        let missing = dir.path().join("missing.pub");
        let e = TrustedKeys::from_files(std::slice::from_ref(&missing)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&format!("key file {}: ", missing.display())),
            "{e}"
        );
        let junk = dir.path().join("junk.pub");
        std::fs::write(&junk, b"not a key").unwrap();
        let e = TrustedKeys::from_files(&[junk]).unwrap_err();
        assert!(e.to_string().contains("not an Ed25519 public key"), "{e}");
        assert_eq!(
            TrustedKeys::from_files(&[]).unwrap_err(),
            SignatureError::NoKeys
        );
        assert!(
            SigningKey::from_bytes(&generated.public_key)
                .unwrap_err()
                .to_string()
                .contains("it is a public key")
        );
    }

    #[test]
    fn lengths_past_the_end_are_refused_before_wasmsign2_allocates_them() {
        let (signer, trusted) = keys();
        // A section claiming 4 GiB.
        let mut huge = component();
        huge.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        let e = verify_report(&huge, None, &trusted).unwrap_err();
        assert!(e.to_string().contains("not a well-formed"), "{e}");
        assert!(sign(&huge, &signer, false).is_err());
        // A signature section whose inner slice claims 4 GiB.
        let mut bad = b"\0asm\x0d\0\x01\0".to_vec();
        let mut payload = vec![9];
        payload.extend_from_slice(b"signature");
        payload.extend_from_slice(&[1, 1, 1, 1, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        bad.push(0);
        bad.push(payload.len() as u8);
        bad.extend_from_slice(&payload);
        let message = refusal(check("d.wasm", &bad, None, &trusted));
        assert!(
            message.contains("embedded signature is malformed"),
            "{message}"
        );
        // Not WebAssembly at all.
        assert!(verify_report(b"hello", None, &trusted).is_err());
        // The bare header: no signature, no error.
        assert_eq!(signatures(b"\0asm\x0d\0\x01\0", None).unwrap(), None);
    }
}
