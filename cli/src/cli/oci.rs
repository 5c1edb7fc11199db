//! Driver components in OCI registries: `drivers pull`, `drivers push` and
//! `--driver oci://...`, in the layout `wkg` (bytecodealliance/wasm-pkg-tools)
//! uses for components, so either tool reads what the other publishes.
//!
//! A pulled component is kept in a local content-addressed store,
//! `STORE/sha256/<hex>.wasm` (its SHA-256, the value `--driver-sha256`
//! pins), with the manifest that named it in
//! `STORE/manifests/sha256/<hex>.json` (the manifest's digest), so a
//! reference pinned by digest is served from the store without the network.
//! Everything is checked against its digest on the way in and again when it
//! is read from the store.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use image_cache::signature::{self, TrustedKeys};
use oci_client::client::{ClientConfig, ClientProtocol, Config, ImageLayer};
use oci_client::manifest::{OCI_IMAGE_MEDIA_TYPE, OciDescriptor, OciImageManifest};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde_json::json;

use super::Failure;

/// wkg's (oci-wasm's) config media type for a component.
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.wasm.config.v0+json";
/// The media type of the one layer: the component's bytes.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/wasm";
/// The layer annotation that names the file.
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// The most a manifest or a component may weigh when pulled.
const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// The scheme of a driver in a registry.
pub const SCHEME: &str = "oci://";

/// A parsed `oci://REGISTRY/REPO[:TAG][@sha256:HEX]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OciRef {
    pub registry: String,
    pub repository: String,
    pub tag: Option<String>,
    /// The manifest's digest, `sha256:<64 lowercase hex>`.
    pub digest: Option<String>,
}

impl std::fmt::Display for OciRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Whether a driver setting names a component in a registry.
pub fn is_oci(driver: &str) -> bool {
    driver.starts_with(SCHEME)
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parse `oci://REGISTRY/REPO[:TAG][@sha256:HEX]`; a reference without a
/// tag or digest means the tag `latest`.
pub fn parse(text: &str) -> Result<OciRef, Failure> {
    let bad = |why: &str| {
        Failure::Usage(format!(
            "{text:?} is not an OCI reference (oci://REGISTRY/REPOSITORY[:TAG][@sha256:HEX]): {why}"
        ))
    };
    let rest = text
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("it must start with oci://"))?;
    let (name, digest) = match rest.split_once('@') {
        Some((name, digest)) => {
            let hex = digest
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("the digest must be sha256:HEX"))?;
            if !is_hex64(hex) {
                return Err(bad(
                    "the digest must be sha256: and 64 lowercase hex digits",
                ));
            }
            (name, Some(digest.to_string()))
        }
        None => (rest, None),
    };
    let (registry, path) = name
        .split_once('/')
        .ok_or_else(|| bad("it names no repository after the registry"))?;
    let registry_ok = !registry.is_empty()
        && registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b));
    if !registry_ok {
        return Err(bad("the registry must be HOST or HOST:PORT"));
    }
    let (repository, tag) = match path.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => (repo, Some(tag.to_string())),
        _ => (path, None),
    };
    let repo_ok = !repository.is_empty()
        && repository.split('/').all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && part.as_bytes()[0].is_ascii_alphanumeric()
        });
    if !repo_ok {
        return Err(bad(
            "the repository must be lowercase letters, digits, '.', '_', '-' and '/'",
        ));
    }
    if let Some(tag) = &tag {
        let tag_ok = !tag.is_empty()
            && tag.len() <= 128
            && tag.as_bytes()[0] != b'.'
            && tag.as_bytes()[0] != b'-'
            && tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(bad(
                "the tag must be up to 128 letters, digits, '.', '_', '-', not starting with '.' or '-'",
            ));
        }
    }
    let tag = if tag.is_none() && digest.is_none() {
        Some("latest".to_string())
    } else {
        tag
    };
    Ok(OciRef {
        registry: registry.to_string(),
        repository: repository.to_string(),
        tag,
        digest,
    })
}

impl OciRef {
    fn reference(&self) -> Reference {
        let (r, p) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(t), Some(d)) => Reference::with_tag_and_digest(r, p, t.clone(), d.clone()),
            (None, Some(d)) => Reference::with_digest(r, p, d.clone()),
            (Some(t), None) => Reference::with_tag(r, p, t.clone()),
            (None, None) => Reference::with_tag(r, p, "latest".into()),
        }
    }

    /// The same repository, pinned to `digest`.
    fn pinned(&self, digest: &str) -> OciRef {
        OciRef {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

/// The store's default place: `$XDG_CACHE_HOME/image-cache/drivers`, else
/// `~/.cache/image-cache/drivers`.
pub fn default_store() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".cache"))
        })?;
    Some(base.join("image-cache").join("drivers"))
}

/// SHA-256 (sha2, through the library), lowercase hex.
fn sha256_hex(bytes: &[u8]) -> String {
    image_cache::runtime::sha256_hex(bytes)
}

fn component_path(store: &Path, hex: &str) -> PathBuf {
    store.join("sha256").join(format!("{hex}.wasm"))
}

fn manifest_path(store: &Path, hex: &str) -> PathBuf {
    store
        .join("manifests")
        .join("sha256")
        .join(format!("{hex}.json"))
}

/// Write `bytes` to `path` through a temporary file beside it, renamed when
/// complete (content-addressed: an existing file already holds them).
fn store_file(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    let dir = path.parent().expect("store paths have a parent");
    let failed = |e: std::io::Error| Failure::op("io", format!("storing {}: {e}", path.display()));
    fs::create_dir_all(dir).map_err(failed)?;
    let temp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        failed(e)
    })
}

/// A stored file whose SHA-256 is `hex`, if the store holds it intact.
fn read_stored(path: &Path, hex: &str) -> Option<Vec<u8>> {
    let bytes = fs::read(path).ok()?;
    if sha256_hex(&bytes) == hex {
        Some(bytes)
    } else {
        log::warn!(
            "{}: its content does not match its digest; fetching it again",
            path.display()
        );
        None
    }
}

/// What a pull gave.
pub struct Pulled {
    /// The component in the store.
    pub path: PathBuf,
    /// The manifest's digest (`sha256:HEX`).
    pub manifest_digest: String,
    /// The component's SHA-256 (hex), what `--driver-sha256` pins.
    pub sha256: String,
    /// The reference pinned by the manifest's digest.
    pub pinned: String,
    /// Whether the store already held it (no network).
    pub from_store: bool,
}

/// The one wasm layer of a wkg-layout manifest.
fn wasm_layer(reference: &OciRef, manifest: &OciImageManifest) -> Result<OciDescriptor, Failure> {
    let refuse = |why: String| {
        Failure::op(
            "oci",
            format!("{reference}: not a WebAssembly component artifact: {why}"),
        )
    };
    if manifest.config.media_type != WASM_CONFIG_MEDIA_TYPE {
        return Err(refuse(format!(
            "its config's media type is {:?}, not {WASM_CONFIG_MEDIA_TYPE}",
            manifest.config.media_type
        )));
    }
    let wasm: Vec<&OciDescriptor> = manifest
        .layers
        .iter()
        .filter(|l| l.media_type == WASM_LAYER_MEDIA_TYPE)
        .collect();
    match (wasm.as_slice(), manifest.layers.len()) {
        ([layer], 1) => {
            let hex = layer.digest.strip_prefix("sha256:").unwrap_or_default();
            if !is_hex64(hex) {
                return Err(refuse(format!(
                    "its layer's digest {:?} is not sha256:HEX",
                    layer.digest
                )));
            }
            if layer.size < 0 || layer.size as u64 > MAX_COMPONENT_BYTES {
                return Err(refuse(format!(
                    "its layer's size {} is out of bounds",
                    layer.size
                )));
            }
            Ok((*layer).clone())
        }
        _ => Err(refuse(format!(
            "it has {} layers, {} of them {WASM_LAYER_MEDIA_TYPE}; exactly one is expected",
            manifest.layers.len(),
            wasm.len()
        ))),
    }
}

fn parse_manifest(reference: &OciRef, raw: &[u8]) -> Result<OciImageManifest, Failure> {
    serde_json::from_slice(raw).map_err(|e| {
        Failure::op(
            "oci",
            format!("{reference}: the manifest is not an OCI image manifest ({e})"),
        )
    })
}

/// A component pinned by a manifest digest the store holds, with no
/// network: both the manifest and the component are checked against their
/// digests.
fn from_store(reference: &OciRef, store: &Path) -> Option<Pulled> {
    let digest = reference.digest.as_deref()?;
    let hex = digest.strip_prefix("sha256:")?;
    let raw = read_stored(&manifest_path(store, hex), hex)?;
    let manifest = parse_manifest(reference, &raw).ok()?;
    let layer = wasm_layer(reference, &manifest).ok()?;
    let layer_hex = layer.digest.strip_prefix("sha256:")?;
    let path = component_path(store, layer_hex);
    read_stored(&path, layer_hex)?;
    Some(Pulled {
        path,
        manifest_digest: digest.to_string(),
        sha256: layer_hex.to_string(),
        pinned: reference.pinned(digest).to_string(),
        from_store: true,
    })
}

/// One tokio runtime and one client per operation: the CLI makes one.
fn client(
    reference: &OciRef,
    plain_http: bool,
) -> Result<(Client, tokio::runtime::Runtime), Failure> {
    // reqwest with rustls-no-provider needs a process-wide crypto provider;
    // an Err means one is installed already.
    #[allow(deprecated)]
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if plain_http {
        ClientProtocol::HttpsExcept(vec![reference.registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        ..Default::default()
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::op("io", format!("starting the network runtime: {e}")))?;
    Ok((client, runtime))
}

fn network(reference: &OciRef, what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::op("oci", format!("{reference}: {what}: {e}"))
}

/// A failed request, with the hint a plain-HTTP registry needs.
fn request_failed(
    reference: &OciRef,
    plain_http: bool,
    what: &str,
    e: impl std::fmt::Display,
) -> Failure {
    let text = e.to_string();
    if !plain_http && text.contains("https://") && text.contains("error sending request") {
        network(
            reference,
            what,
            format!("{text} (a registry that speaks plain HTTP needs --plain-http)"),
        )
    } else {
        network(reference, what, text)
    }
}

/// Pull `reference` into `store` (or find it there, when pinned by a
/// digest it holds) and return where the component is. With `trusted`, the
/// component must carry a signature by one of those keys (embedded: a
/// registry has no place for a detached one), checked before it is stored.
pub fn pull(
    reference: &OciRef,
    plain_http: bool,
    store: &Path,
    trusted: Option<&TrustedKeys>,
) -> Result<Pulled, Failure> {
    if let Some(found) = from_store(reference, store) {
        if let Some(keys) = trusted {
            let bytes = fs::read(&found.path)
                .map_err(|e| Failure::op("io", format!("{}: {e}", found.path.display())))?;
            check_signature(reference, &bytes, keys)?;
        }
        return Ok(found);
    }
    let (client, runtime) = client(reference, plain_http)?;
    let oci = reference.reference();
    let auth = RegistryAuth::Anonymous;
    let (raw, bytes) = runtime.block_on(async {
        let (raw, _) = client
            .pull_manifest_raw(&oci, &auth, &[OCI_IMAGE_MEDIA_TYPE])
            .await
            .map_err(|e| request_failed(reference, plain_http, "fetching the manifest", e))?;
        if raw.len() as u64 > 4 << 20 {
            return Err(network(reference, "the manifest", "larger than 4 MiB"));
        }
        let manifest_hex = sha256_hex(&raw);
        if let Some(pinned) = &reference.digest
            && *pinned != format!("sha256:{manifest_hex}")
        {
            return Err(Failure::op(
                "oci",
                format!(
                    "{reference}: the registry's manifest has digest sha256:{manifest_hex}, \
                     not the pinned {pinned}; refused"
                ),
            ));
        }
        let manifest = parse_manifest(reference, &raw)?;
        let layer = wasm_layer(reference, &manifest)?;
        let mut bytes: Vec<u8> = Vec::with_capacity(layer.size as usize);
        client
            .pull_blob(&oci, &layer, &mut bytes)
            .await
            .map_err(|e| network(reference, "fetching the component", e))?;
        let got = format!("sha256:{}", sha256_hex(&bytes));
        if got != layer.digest || bytes.len() as i64 != layer.size {
            return Err(Failure::op(
                "oci",
                format!(
                    "{reference}: the component fetched ({} bytes, {got}) is not the one the \
                     manifest names ({} bytes, {}); refused",
                    bytes.len(),
                    layer.size,
                    layer.digest
                ),
            ));
        }
        Ok((raw.to_vec(), bytes))
    })?;
    if let Some(keys) = trusted {
        check_signature(reference, &bytes, keys)?;
    }
    let manifest_hex = sha256_hex(&raw);
    let sha256 = sha256_hex(&bytes);
    let path = component_path(store, &sha256);
    store_file(&path, &bytes)?;
    store_file(&manifest_path(store, &manifest_hex), &raw)?;
    let manifest_digest = format!("sha256:{manifest_hex}");
    Ok(Pulled {
        path,
        pinned: reference.pinned(&manifest_digest).to_string(),
        manifest_digest,
        sha256,
        from_store: false,
    })
}

fn check_signature(reference: &OciRef, bytes: &[u8], keys: &TrustedKeys) -> Result<(), Failure> {
    signature::check(&reference.to_string(), bytes, None, keys)
        .map(|_| ())
        .map_err(|e| {
            let message = match e {
                image_cache::Error::Load { message, .. } => message,
                other => other.to_string(),
            };
            Failure::op("signature", format!("{reference}: {message}; not stored"))
        })
}

/// What a push gave.
pub struct Pushed {
    pub manifest_digest: String,
    pub sha256: String,
    pub pinned: String,
}

/// The current time, RFC 3339 in UTC (`2026-01-31T12:34:56Z`).
fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    super::format::iso_utc(now as f64)
}

/// Push the component file `path` to `reference` (a tag) in wkg's layout.
pub fn push(path: &Path, reference: &OciRef, plain_http: bool) -> Result<Pushed, Failure> {
    if reference.digest.is_some() {
        return Err(Failure::Usage(format!(
            "{reference}: push to a tag (oci://REGISTRY/REPOSITORY:TAG), not a digest; the \
             registry computes the digest"
        )));
    }
    let bytes =
        fs::read(path).map_err(|e| Failure::op("io", format!("{}: {e}", path.display())))?;
    let declared = image_cache::contract::declared(&bytes)
        .map_err(|e| Failure::op("contract", format!("{}: {e}", path.display())))?;
    let sha256 = sha256_hex(&bytes);
    let layer_digest = format!("sha256:{sha256}");
    let config = json!({
        "created": now_rfc3339(),
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer_digest],
        "component": {
            "exports": declared.exports,
            "imports": declared.imports,
            "target": null,
        },
    });
    let config = Config {
        data: serde_json::to_vec(&config)
            .expect("JSON values serialize")
            .into(),
        media_type: WASM_CONFIG_MEDIA_TYPE.to_string(),
        annotations: None,
    };
    let title = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "component.wasm".into());
    let layers = vec![ImageLayer {
        data: bytes.into(),
        media_type: WASM_LAYER_MEDIA_TYPE.to_string(),
        annotations: Some(BTreeMap::from([(TITLE_ANNOTATION.to_string(), title)])),
    }];
    let mut manifest = OciImageManifest::build(&layers, &config, None);
    manifest.media_type = Some(OCI_IMAGE_MEDIA_TYPE.to_string());
    let (client, runtime) = client(reference, plain_http)?;
    let oci = reference.reference();
    runtime
        .block_on(client.push(
            &oci,
            &layers,
            config,
            &RegistryAuth::Anonymous,
            Some(manifest),
        ))
        .map_err(|e| request_failed(reference, plain_http, "pushing", e))?;
    // The digest of the manifest as the registry holds it (oci-client
    // sends its own canonical serialization of the value built here).
    let (raw, _) = runtime
        .block_on(client.pull_manifest_raw(&oci, &RegistryAuth::Anonymous, &[OCI_IMAGE_MEDIA_TYPE]))
        .map_err(|e| network(reference, "reading the pushed manifest back", e))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&raw));
    Ok(Pushed {
        pinned: reference.pinned(&manifest_digest).to_string(),
        manifest_digest,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let hex = "a".repeat(64);
        let r = parse("oci://127.0.0.1:5000/drivers/sqlite:1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "drivers/sqlite");
        assert_eq!(r.tag.as_deref(), Some("1"));
        assert_eq!(r.digest, None);
        let r = parse(&format!("oci://ghcr.io/a/b@sha256:{hex}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.digest, Some(format!("sha256:{hex}")));
        assert_eq!(r.to_string(), format!("oci://ghcr.io/a/b@sha256:{hex}"));
        let r = parse(&format!("oci://ghcr.io/a/b:v1@sha256:{hex}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(
            parse("oci://ghcr.io/a").unwrap().tag.as_deref(),
            Some("latest")
        );
        for bad in [
            "ghcr.io/a/b:1",
            "oci://ghcr.io",
            "oci:///a",
            "oci://ghcr.io/A/b",
            "oci://ghcr.io/a//b",
            "oci://ghcr.io/a/b:",
            "oci://ghcr.io/a/b@sha256:abc",
            "oci://ghcr.io/a/b@md5:abc",
            "oci://ghcr.io/a/b:-x",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
