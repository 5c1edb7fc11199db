//! The image store behind the cache: a Glance API or a directory, and
//! what the server asks of it (an image's record, its bytes, its size).
//!
//! Both are confined:
//!
//! - A **directory** upstream opens only regular files directly beneath
//!   it, never following a symlink (`O_NOFOLLOW`), never blocking on a
//!   FIFO or device (`O_NONBLOCK`, then a regular-file check).
//! - A **Glance** upstream's redirects are followed by hand: within the
//!   upstream's own origin (scheme, host, port) with the token; to an
//!   origin the operator allowed (`--upstream-allow-redirect`) without
//!   it; anywhere else never (502). No token ever leaves for an origin the
//!   operator did not name.
//!
//! Fills (see [`fill`](super::fill)) read the bytes through [`Body`].

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use image_cache::{Algorithm, Checksum};
use reqwest::Url;
use tracing::warn;

/// How many redirects within allowed origins a request follows.
const MAX_REDIRECTS: usize = 3;
/// Largest image record (`GET /v2/images/{id}`) read from Glance.
const MAX_RECORD_BYTES: usize = 1 << 20;
/// Largest read of a directory upstream's file per chunk.
const FILE_CHUNK: usize = 1 << 20;

/// Where misses come from.
pub enum Upstream {
    /// A Glance API: `GET {base}/v2/images/{id}` and `.../file`.
    Glance(Glance),
    /// A directory holding one file per image id.
    Dir(PathBuf),
}

pub struct Glance {
    /// The API's base URL, without a trailing slash.
    pub base: String,
    /// The base's origin, `scheme://host:port`.
    origin: String,
    /// Other origins a redirect may lead to (without the token).
    allowed: Vec<String>,
    /// Whether an image must have a record (Glance's authorization needs
    /// one). When not, an upstream that answers 404 for records (a plain
    /// file server under Glance's paths) is read without one: its
    /// `Content-Length` and `Content-MD5` are what the fill verifies.
    records_required: bool,
    pub client: reqwest::Client,
}

/// What an upstream says of an image before its first byte: what the
/// fill verifies.
#[derive(Clone, Debug, Default)]
pub struct Start {
    /// The image size, if the upstream said (`Content-Length`, Glance's
    /// `size`, the file's size).
    pub size: Option<u64>,
    /// MD5 (hex): Glance's `checksum`, or `Content-MD5`.
    pub md5: Option<String>,
    /// Glance's `os_hash_algo`/`os_hash_value`, when it is one we know.
    pub hash: Option<Checksum>,
}

/// Why the upstream produced no image.
#[derive(Clone, Debug)]
pub struct FetchError {
    pub status: StatusCode,
    pub message: String,
    /// For a 503: seconds a client should wait (`Retry-After`).
    pub retry_after: Option<u32>,
}

impl FetchError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> FetchError {
        FetchError {
            status,
            message: message.into(),
            retry_after: None,
        }
    }

    fn gateway(message: impl Into<String>) -> FetchError {
        FetchError::new(StatusCode::BAD_GATEWAY, message)
    }
}

/// An image's bytes as they come.
pub enum Body {
    Http(reqwest::Response),
    File(Option<File>),
}

impl Body {
    /// The next piece; `None` at the end.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        match self {
            Body::Http(r) => r
                .chunk()
                .await
                .map_err(|e| io::Error::other(format!("the upstream connection failed: {e}"))),
            Body::File(slot) => {
                let Some(mut file) = slot.take() else {
                    return Ok(None);
                };
                let (file, read) = tokio::task::spawn_blocking(move || {
                    let mut buf = Vec::with_capacity(FILE_CHUNK);
                    let r = (&mut file).take(FILE_CHUNK as u64).read_to_end(&mut buf);
                    (file, r.map(|_| buf))
                })
                .await
                .map_err(|e| io::Error::other(format!("upstream read task: {e}")))?;
                let buf = read?;
                if buf.is_empty() {
                    return Ok(None);
                }
                *slot = Some(file);
                Ok(Some(Bytes::from(buf)))
            }
        }
    }
}

/// What the client's token may do with an image, as the upstream said.
#[derive(Clone, Debug)]
pub enum Verdict {
    /// The upstream showed the image to the token: this is its record.
    Allowed(Start),
    /// The upstream refused: 401 (no or bad token) or 404 (not there, or
    /// not visible to the token; Glance does not tell them apart).
    Refused(FetchError),
}

impl Upstream {
    /// `URL` (http:// or https://) or an existing directory. `allow` lists
    /// origins redirects may lead to (without the token).
    pub fn parse(spec: &str, timeout: Duration, allow: &[String]) -> Result<Upstream, String> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let base = spec.trim_end_matches('/').to_string();
            let url = Url::parse(&base).map_err(|e| format!("upstream URL {spec:?}: {e}"))?;
            let mut allowed = Vec::new();
            for a in allow {
                let u = Url::parse(a.trim())
                    .map_err(|e| format!("--upstream-allow-redirect {a:?}: {e}"))?;
                allowed.push(origin(&u));
            }
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10).min(timeout))
                .read_timeout(timeout)
                // Followed by hand: see `send`.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("upstream HTTP client: {e}"))?;
            return Ok(Upstream::Glance(Glance {
                base,
                origin: origin(&url),
                allowed,
                records_required: true,
                client,
            }));
        }
        if !allow.is_empty() {
            return Err("--upstream-allow-redirect applies to an http(s) upstream only".into());
        }
        let path = PathBuf::from(spec);
        match std::fs::metadata(&path) {
            Ok(m) if m.is_dir() => Ok(Upstream::Dir(path)),
            Ok(_) => Err(format!(
                "upstream {spec}: not a directory (nor an http(s) URL)"
            )),
            Err(e) => Err(format!("upstream {spec}: {e}")),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Upstream::Glance(g) => g.base.clone(),
            Upstream::Dir(p) => p.display().to_string(),
        }
    }

    pub fn is_glance(&self) -> bool {
        matches!(self, Upstream::Glance(_))
    }

    /// See [`Glance::records_required`](Glance).
    pub fn require_records(&mut self, required: bool) {
        if let Upstream::Glance(g) = self {
            g.records_required = required;
        }
    }

    /// Start reading image `id` (already validated): what the upstream
    /// says of it, and its bytes. For Glance the record comes first
    /// (`GET /v2/images/{id}`: the size and checksums to verify), then
    /// the data.
    pub async fn open(&self, id: &str, token: Option<&str>) -> Result<(Start, Body), FetchError> {
        match self {
            Upstream::Dir(dir) => {
                let (file, size) = open_in_dir(dir, id).await?;
                let start = Start {
                    size: Some(size),
                    ..Start::default()
                };
                Ok((start, Body::File(Some(file))))
            }
            Upstream::Glance(g) => {
                let record = g.record_if_any(id, token).await?.unwrap_or_default();
                let url = g.file_url(id);
                let response = g.send(reqwest::Method::GET, &url, token, id).await?;
                let status = response.status();
                if !status.is_success() {
                    return Err(status_error(id, status.as_u16()));
                }
                let start = merge(
                    id,
                    record,
                    response.content_length(),
                    content_md5(&response),
                )?;
                Ok((start, Body::Http(response)))
            }
        }
    }

    /// Read image `id` from byte `offset` on (a fill resumed after a
    /// sibling failed mid-stream): what the upstream says of the whole
    /// image, its bytes from `offset`, and how many bytes of the body to
    /// skip first (an upstream that ignores `Range` sends them all).
    pub async fn open_at(
        &self,
        id: &str,
        token: Option<&str>,
        offset: u64,
    ) -> Result<(Start, Body, u64), FetchError> {
        if offset == 0 {
            let (start, body) = self.open(id, token).await?;
            return Ok((start, body, 0));
        }
        match self {
            Upstream::Dir(dir) => {
                let (mut file, size) = open_in_dir(dir, id).await?;
                use std::io::Seek;
                file.seek(std::io::SeekFrom::Start(offset))
                    .map_err(|e| internal(format!("seeking image {id:?}: {e}")))?;
                let start = Start {
                    size: Some(size),
                    ..Start::default()
                };
                Ok((start, Body::File(Some(file)), 0))
            }
            Upstream::Glance(g) => {
                let record = g.record_if_any(id, token).await?.unwrap_or_default();
                let url = g.file_url(id);
                let response = g
                    .send_range(&url, token, id, &format!("bytes={offset}-"))
                    .await?;
                let status = response.status();
                match status.as_u16() {
                    206 => {
                        // `Content-Range: bytes A-B/TOTAL`: the whole size.
                        let total = response
                            .headers()
                            .get(reqwest::header::CONTENT_RANGE)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.rsplit_once('/'))
                            .and_then(|(range, total)| {
                                let first = range.strip_prefix("bytes ")?.split_once('-')?.0;
                                (first.parse::<u64>().ok()? == offset).then_some(())?;
                                total.parse::<u64>().ok()
                            })
                            .ok_or_else(|| {
                                FetchError::gateway(format!(
                                    "the upstream answered a range of image {id:?} without \
                                     the Content-Range asked for"
                                ))
                            })?;
                        let start = merge(id, record, Some(total), None)?;
                        Ok((start, Body::Http(response), 0))
                    }
                    200 => {
                        let md5 = content_md5(&response);
                        let start = merge(id, record, response.content_length(), md5)?;
                        Ok((start, Body::Http(response), offset))
                    }
                    other => Err(status_error(id, other)),
                }
            }
        }
    }

    /// What the upstream says of image `id` before any byte (Glance's
    /// record: size and checksums), to check bytes from elsewhere (a
    /// sibling) against; `None` for a directory, or a Glance without
    /// records.
    pub async fn describe_image(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<Option<Start>, FetchError> {
        match self {
            Upstream::Dir(_) => Ok(None),
            Upstream::Glance(g) => g.record_if_any(id, token).await,
        }
    }

    /// HEAD for an uncached image: its size, without fetching.
    pub async fn size(&self, id: &str, token: Option<&str>) -> Result<Option<u64>, FetchError> {
        match self {
            Upstream::Dir(dir) => Ok(Some(open_in_dir(dir, id).await?.1)),
            Upstream::Glance(g) => match g.record_if_any(id, token).await? {
                Some(start) => Ok(start.size),
                None => {
                    let url = g.file_url(id);
                    let response = g.send(reqwest::Method::HEAD, &url, token, id).await?;
                    match response.status().as_u16() {
                        // A HEAD's body is empty whatever its header says:
                        // read the header itself.
                        200..=299 => Ok(response
                            .headers()
                            .get(reqwest::header::CONTENT_LENGTH)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse().ok())),
                        other => Err(status_error(id, other)),
                    }
                }
            },
        }
    }

    /// Whether the upstream has image `id` (a queued image must exist).
    pub async fn has(&self, id: &str, token: Option<&str>) -> Result<bool, FetchError> {
        match self.size(id, token).await {
            Ok(_) => Ok(true),
            Err(e) if e.status == StatusCode::NOT_FOUND => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Glance {
    /// `{base}/v2/images/{id}/file`.
    fn file_url(&self, id: &str) -> String {
        format!("{}/v2/images/{}/file", self.base, url_segment(id))
    }

    /// The image's record; `None` when the upstream has no records (404)
    /// and none are required (see `records_required`). A refusal is an
    /// error.
    async fn record_if_any(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<Option<Start>, FetchError> {
        match self.record(id, token).await? {
            Verdict::Allowed(start) => Ok(Some(start)),
            Verdict::Refused(e) if e.status == StatusCode::NOT_FOUND && !self.records_required => {
                Ok(None)
            }
            Verdict::Refused(e) => Err(e),
        }
    }

    /// `GET {base}/v2/images/{id}` with `token`: whether the token may see
    /// the image, and its size and checksums.
    pub async fn record(&self, id: &str, token: Option<&str>) -> Result<Verdict, FetchError> {
        let url = format!("{}/v2/images/{}", self.base, url_segment(id));
        let mut response = self.send(reqwest::Method::GET, &url, token, id).await?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            401 | 403 | 404 => return Ok(Verdict::Refused(status_error(id, status))),
            _ => return Err(status_error(id, status)),
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| {
            FetchError::gateway(format!("reading the upstream's record of {id:?}: {e}"))
        })? {
            if body.len() + chunk.len() > MAX_RECORD_BYTES {
                return Err(FetchError::gateway(format!(
                    "the upstream's record of image {id:?} is larger than {MAX_RECORD_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let record: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
            FetchError::gateway(format!(
                "the upstream's record of image {id:?} is not JSON: {e}"
            ))
        })?;
        Ok(Verdict::Allowed(parse_record(&record)))
    }

    /// Send a request, following redirects by hand (see the module doc).
    pub async fn send(
        &self,
        method: reqwest::Method,
        url: &str,
        token: Option<&str>,
        id: &str,
    ) -> Result<reqwest::Response, FetchError> {
        self.send_with(method, url, token, id, None).await
    }

    /// A GET of `range` (`bytes=N-`), following redirects as `send` does.
    pub async fn send_range(
        &self,
        url: &str,
        token: Option<&str>,
        id: &str,
        range: &str,
    ) -> Result<reqwest::Response, FetchError> {
        self.send_with(reqwest::Method::GET, url, token, id, Some(range))
            .await
    }

    async fn send_with(
        &self,
        method: reqwest::Method,
        url: &str,
        token: Option<&str>,
        id: &str,
        range: Option<&str>,
    ) -> Result<reqwest::Response, FetchError> {
        let mut url = Url::parse(url).map_err(|e| internal(format!("upstream URL {url}: {e}")))?;
        for _ in 0..=MAX_REDIRECTS {
            let here = origin(&url);
            let mut request = self.client.request(method.clone(), url.clone());
            if let Some(range) = range {
                request = request.header(reqwest::header::RANGE, range);
            }
            if let Some(token) = token
                && here == self.origin
            {
                request = request.header(super::auth::TOKEN_HEADER, token);
            }
            let response = request.send().await.map_err(|e| {
                warn!(image_id = id, error = %e, "upstream request failed");
                FetchError::gateway(format!("the upstream did not answer for image {id:?}"))
            })?;
            if !response.status().is_redirection() {
                return Ok(response);
            }
            let Some(location) = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
            else {
                return Err(status_error(id, response.status().as_u16()));
            };
            let next = url.join(location).map_err(|_| {
                FetchError::gateway(format!(
                    "the upstream redirected image {id:?} to an invalid location"
                ))
            })?;
            let to = origin(&next);
            if to != self.origin && !self.allowed.contains(&to) {
                warn!(image_id = id, to = %to, "refused a redirect to another origin");
                return Err(FetchError::gateway(format!(
                    "the upstream redirected image {id:?} to another origin ({to}), which is \
                     not allowed (--upstream-allow-redirect)"
                )));
            }
            url = next;
        }
        Err(FetchError::gateway(format!(
            "the upstream redirected image {id:?} more than {MAX_REDIRECTS} times"
        )))
    }
}

/// `scheme://host:port` of a URL.
fn origin(url: &Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// The size and checksums of a Glance image record.
fn parse_record(record: &serde_json::Value) -> Start {
    let size = record.get("size").and_then(|v| v.as_u64());
    let md5 = record
        .get("checksum")
        .and_then(|v| v.as_str())
        .and_then(hex_md5);
    let hash = match (
        record.get("os_hash_algo").and_then(|v| v.as_str()),
        record.get("os_hash_value").and_then(|v| v.as_str()),
    ) {
        (Some(algo), Some(value)) => {
            match format!(
                "{}:{}",
                algo.to_ascii_lowercase(),
                value.to_ascii_lowercase()
            )
            .parse::<Checksum>()
            {
                Ok(c) if c.algorithm != Algorithm::Md5 => Some(c),
                Ok(_) => None,
                Err(e) => {
                    warn!(error = %e, "ignoring an os_hash the cache cannot verify");
                    None
                }
            }
        }
        _ => None,
    };
    Start { size, md5, hash }
}

/// The record and the data response must agree: a record and a
/// `Content-Length` (or `Content-MD5`) that differ mean the upstream is
/// not sending the image it describes.
pub(crate) fn merge(
    id: &str,
    record: Start,
    length: Option<u64>,
    content_md5: Option<String>,
) -> Result<Start, FetchError> {
    let size = match (record.size, length) {
        (Some(a), Some(b)) if a != b => {
            return Err(FetchError::gateway(format!(
                "the upstream describes image {id:?} as {a} bytes but sends {b}; not served"
            )));
        }
        (a, b) => a.or(b),
    };
    let md5 = match (record.md5, content_md5) {
        (Some(a), Some(b)) if a != b => {
            return Err(FetchError::gateway(format!(
                "the upstream's checksum of image {id:?} ({a}) and its Content-MD5 ({b}) differ; not served"
            )));
        }
        (a, b) => a.or(b),
    };
    Ok(Start {
        size,
        md5,
        hash: record.hash,
    })
}

/// A response's `Content-MD5` (hex, as Glance sends it), lower-cased.
pub fn content_md5(response: &reqwest::Response) -> Option<String> {
    response
        .headers()
        .get("content-md5")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| hex_md5(v.trim()))
}

/// Lower-case hex of an MD5 digest, if `v` is one.
fn hex_md5(v: &str) -> Option<String> {
    (v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit())).then(|| v.to_ascii_lowercase())
}

/// Open image `id` of a directory upstream (see `open_regular`).
async fn open_in_dir(dir: &Path, id: &str) -> Result<(File, u64), FetchError> {
    let path = dir.join(id);
    tokio::task::spawn_blocking(move || open_regular(&path))
        .await
        .map_err(|e| internal(format!("upstream open task: {e}")))?
        .map_err(|e| dir_error(id, &e))
}

/// Open `path` if it is a regular file (not through a symlink, never
/// blocking on a FIFO): the file and its size.
fn open_regular(path: &std::path::Path) -> io::Result<(File, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not a regular file",
        ));
    }
    Ok((file, meta.len()))
}

fn dir_error(id: &str, e: &io::Error) -> FetchError {
    let symlink = e.raw_os_error() == Some(libc::ELOOP);
    if symlink {
        warn!(
            image_id = id,
            "the upstream directory holds a symlink for this id: refused"
        );
    }
    if symlink || e.kind() == io::ErrorKind::NotFound {
        return FetchError::new(
            StatusCode::NOT_FOUND,
            format!("image {id:?} is neither cached nor in the upstream"),
        );
    }
    warn!(image_id = id, error = %e, "reading the upstream directory failed");
    FetchError::gateway(format!("the upstream cannot provide image {id:?}"))
}

/// A refusal or failure of the upstream, as the client should see it
/// (Glance's own statuses for 401 and 404).
fn status_error(id: &str, status: u16) -> FetchError {
    match status {
        401 => FetchError::new(
            StatusCode::UNAUTHORIZED,
            "the upstream did not accept the token",
        ),
        // Glance answers 404 for an image the token may not see; 403 is
        // a policy refusal: neither tells the client more.
        403 | 404 => FetchError::new(
            StatusCode::NOT_FOUND,
            format!("image {id:?} not found upstream"),
        ),
        204 => FetchError::new(
            StatusCode::NO_CONTENT,
            format!("image {id:?} has no data upstream"),
        ),
        other => FetchError::gateway(format!("the upstream answered {other} for image {id:?}")),
    }
}

pub fn internal(message: String) -> FetchError {
    warn!("{message}");
    FetchError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
}

/// Percent-encode an image id for a URL path segment.
pub fn url_segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_responses_must_agree() {
        let record = parse_record(&serde_json::json!({
            "size": 10, "checksum": "0123456789abcdef0123456789ABCDEF",
            "os_hash_algo": "sha512", "os_hash_value": "ab".repeat(64),
        }));
        assert_eq!(record.size, Some(10));
        assert_eq!(
            record.md5.as_deref(),
            Some("0123456789abcdef0123456789abcdef")
        );
        assert_eq!(record.hash.as_ref().unwrap().algorithm, Algorithm::Sha512);
        assert!(merge("a", record.clone(), Some(11), None).is_err());
        assert!(merge("a", record.clone(), Some(10), Some("f".repeat(32))).is_err());
        let s = merge("a", record, None, None).unwrap();
        assert_eq!(s.size, Some(10));
        let empty = parse_record(&serde_json::json!({"size": null, "os_hash_algo": "crc"}));
        assert!(empty.size.is_none() && empty.hash.is_none());
    }

    #[test]
    fn origins() {
        let o = |s: &str| origin(&Url::parse(s).unwrap());
        assert_eq!(o("http://a:80/x"), o("http://a/y"));
        assert_ne!(o("http://a/"), o("https://a/"));
        assert_ne!(o("http://a:8080/"), o("http://a/"));
        assert_ne!(o("http://a/"), o("http://b/"));
    }
}
