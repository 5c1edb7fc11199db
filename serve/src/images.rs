//! `GET` and `HEAD /v2/images/{id}/file`: the cached file if there is
//! one, else the upstream through a shared fetch (see `upstream`).
//!
//! Plain HTTP/1.1 `GET`s of cached images are answered with `sendfile` by
//! the connection front ([`sendfile`](super::sendfile)) before they reach
//! here; this module answers the rest (`HEAD`, HTTP/1.0, misses, errors):
//! cached bodies are read with large reads on the blocking pool and
//! handed to hyper as `Bytes`. The read session ends as soon as the file
//! is open; the hit is counted once the last byte went out (and recorded
//! by the driver in a batch, see `hits`); a client that goes away earlier
//! counts nothing.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::stream;
use image_cache::Error;
use tracing::{debug, warn};

use super::fill::{self, FillFor, Flight, Outcome, Progress};
use super::metrics::{InFlight, add, inc};
use super::upstream;
use super::{ApiError, App, RawId, access, validate_id};

/// Largest read per chunk of a cached body on hyper's path. hyper holds
/// one chunk per connection until the socket takes it: this is what a
/// client that does not read costs (the sendfile path holds none).
const CHUNK: u64 = 256 << 10;
/// Largest positioned read per chunk of a spooled (miss) body.
const SPOOL_CHUNK: u64 = 256 << 10;

pub async fn image_file(
    State(app): State<Arc<App>>,
    RawId(id): RawId,
    method: Method,
    version: axum::http::Version,
    headers: HeaderMap,
) -> Response {
    match serve(app, id, method, version, headers).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn serve(
    app: Arc<App>,
    id: String,
    method: Method,
    version: axum::http::Version,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    validate_id(&id)?;
    // A sibling node (the peer token) is answered from the cache only:
    // never a fetch from the upstream for a peer, so fills cannot bounce
    // between nodes.
    let peer = app.siblings.as_ref().is_some_and(|s| s.is_peer(&headers));
    let grant = match peer {
        true => {
            inc(&app.metrics.peer_requests);
            access::Grant {
                upstream_token: None,
            }
        }
        false => access::authorize(&app, &headers, &id).await?,
    };
    let head = method == Method::HEAD;
    let range = header_text(&headers, header::RANGE);
    let if_none_match = header_text(&headers, header::IF_NONE_MATCH);
    let around = match try_cached(&app, &id, range.as_deref(), if_none_match.as_deref(), head)
        .await?
    {
        Cached::Found(r) => return Ok(r),
        Cached::Miss | Cached::DriverFailing if peer => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "image {id:?} is not cached on this node (a sibling's request is answered from the cache only)"
                ),
            ));
        }
        Cached::Miss => false,
        Cached::DriverFailing => true,
    };
    inc(&app.metrics.misses);
    let token = grant.upstream_token;
    if head {
        let Some(up) = app.upstream.as_ref() else {
            return Err(not_cached(&id));
        };
        let size = up
            .size(&id, token.as_deref())
            .await
            .map_err(ApiError::from)?;
        if around {
            inc(&app.metrics.fail_open);
        }
        let mut r = Response::new(Body::empty());
        set_common(r.headers_mut());
        if let Some(size) = size {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        return Ok(r);
    }
    let (flight, mut start) = match start_miss(&app, &id, token, around).await? {
        Miss::Fetching(flight, start) => (flight, start),
        Miss::AlreadyCached => {
            // Cached between our look and the fetch: read the cache.
            return match try_cached(&app, &id, range.as_deref(), if_none_match.as_deref(), false)
                .await?
            {
                Cached::Found(r) => Ok(r),
                Cached::Miss | Cached::DriverFailing => Err(not_cached(&id)),
            };
        }
    };
    if start.size.is_none() && version < axum::http::Version::HTTP_11 {
        // HTTP/1.0 has no chunked encoding: a body of unknown length ends
        // when the connection closes, and a cut one would look complete.
        // Wait for the verdict and send the verified length.
        start.size = Some(verified_size(&flight).await?);
    }
    let range = miss_range(&start, range.as_deref());
    let Some((from, to)) = range.bounds() else {
        return Err(unsatisfiable(start.size.unwrap_or(0)));
    };
    let mut response = Response::new(Body::from_stream(spool_stream(
        app.clone(),
        flight,
        from,
        to,
    )));
    *response.headers_mut() = miss_headers(&start, &range);
    *response.status_mut() = range.status();
    Ok(response)
}

/// Wait for a fill's verdict: its verified size, or its failure.
async fn verified_size(flight: &Flight) -> Result<u64, ApiError> {
    let verdict = flight
        .wait_for(|p| matches!(p.outcome, Some(Outcome::Complete | Outcome::Failed(_))))
        .await;
    match verdict {
        Some(Progress {
            outcome: Some(Outcome::Failed(e)),
            ..
        }) => Err(e.into()),
        Some(p) => Ok(p.written),
        None => Err(ended_without_result()),
    }
}

fn ended_without_result() -> ApiError {
    ApiError::internal("the fetch ended without a result".into())
}

/// What a `Range` asks of a miss: a part once the upstream gave the size
/// (sent as soon as the fetch has reached it), else the whole image (RFC
/// 9110 lets a server ignore Range).
pub fn miss_range(start: &upstream::Start, range: Option<&str>) -> RangeRequest {
    match start.size {
        Some(size) => parse_range(range, size),
        None => RangeRequest::Full,
    }
}

/// 416 for an image of `size` bytes.
pub fn unsatisfiable(size: u64) -> ApiError {
    ApiError::new(
        StatusCode::RANGE_NOT_SATISFIABLE,
        format!("the image has {size} bytes"),
    )
    .with_content_range(size)
}

/// The head of a download through a fetch: the upstream's size (else the
/// body is chunked), `Content-MD5` for the whole image, `Content-Range`
/// for a part.
pub fn miss_headers(start: &upstream::Start, range: &RangeRequest) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(6);
    set_common(&mut h);
    match (range, start.size) {
        (RangeRequest::Part(a, b), Some(size)) => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(b - a + 1));
            h.insert(header::CONTENT_RANGE, content_range(*a, *b, size));
        }
        (_, Some(size)) => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        (_, None) => {}
    }
    if let (Some(md5), RangeRequest::Full) = (start.md5.as_deref(), range)
        && let Ok(v) = HeaderValue::from_str(md5)
    {
        h.insert("content-md5", v);
    }
    h.insert("x-image-cache", HeaderValue::from_static("miss"));
    h
}

/// A miss once its fetch has begun.
pub enum Miss {
    /// Stream the spool of this fetch, which started with this.
    Fetching(Arc<Flight>, upstream::Start),
    /// The image was cached meanwhile: serve it from the cache.
    AlreadyCached,
}

/// Join the image's fetch (or start it) and wait until it has started,
/// ended, or found the image cached. `around`: this request's cache
/// lookup found the driver failing under fail-open, so a fetch it starts
/// goes around the cache. A download served by a fetch around the cache
/// (or whose own lookup failed) counts in `image_cache_fail_open_total`.
pub async fn start_miss(
    app: &Arc<App>,
    id: &str,
    token: Option<String>,
    around: bool,
) -> Result<Miss, ApiError> {
    let purpose = match around {
        true => FillFor::ClientAroundTheCache,
        false => FillFor::Client,
    };
    let (flight, joined) =
        fill::join_or_start(app, id, token, None, purpose).map_err(ApiError::from)?;
    if joined {
        inc(&app.metrics.coalesced);
    }
    let first = flight
        .wait_for(|p| p.start.is_some() || p.outcome.is_some())
        .await
        .ok_or_else(ended_without_result)?;
    if matches!(first.outcome, Some(Outcome::AlreadyCached)) {
        return Ok(Miss::AlreadyCached);
    }
    if first.start.is_none()
        && let Some(Outcome::Failed(e)) = first.outcome
    {
        return Err(e.into());
    }
    if around || first.fail_open {
        inc(&app.metrics.fail_open);
    }
    let start = first.start.unwrap_or_default();
    Ok(Miss::Fetching(flight, start))
}

pub fn not_cached(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("image {id:?} is not cached (and no upstream is configured)"),
    )
}

fn set_common(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
}

/// What a `Range` header asks of an image of `size` bytes.
#[derive(Debug, PartialEq)]
pub enum RangeRequest {
    Full,
    /// First and last byte, inclusive.
    Part(u64, u64),
    Unsatisfiable,
}

impl RangeRequest {
    /// The bytes to send, `start..end` (`end` `None`: to the end of the
    /// image, whatever its size); `None` when the range cannot be
    /// satisfied.
    pub fn bounds(&self) -> Option<(u64, Option<u64>)> {
        match *self {
            RangeRequest::Full => Some((0, None)),
            RangeRequest::Part(a, b) => Some((a, Some(b + 1))),
            RangeRequest::Unsatisfiable => None,
        }
    }

    /// 206 for a part, else 200.
    pub fn status(&self) -> StatusCode {
        match self {
            RangeRequest::Part(..) => StatusCode::PARTIAL_CONTENT,
            _ => StatusCode::OK,
        }
    }

    /// The bytes to send of an image of `size` bytes, `start..end`; `None`
    /// when the range cannot be satisfied.
    pub fn span(&self, size: u64) -> Option<(u64, u64)> {
        self.bounds().map(|(a, end)| (a, end.unwrap_or(size)))
    }
}

/// `Content-Range` of the part `a..=b` of an image of `size` bytes.
fn content_range(a: u64, b: u64, size: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("bytes {a}-{b}/{size}")).expect("ascii")
}

/// A request header as text, if it is there and is text.
pub fn header_text(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// One `bytes=` range; anything else (several ranges, other units,
/// malformed) is ignored and the whole image is sent, as RFC 9110 allows.
pub fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(value) = value else {
        return RangeRequest::Full;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        // Suffix: the last N bytes.
        if !digits(last) {
            return RangeRequest::Full;
        }
        let Ok(n) = last.parse::<u64>() else {
            return RangeRequest::Full;
        };
        if n == 0 || size == 0 {
            return RangeRequest::Unsatisfiable;
        }
        return RangeRequest::Part(size - n.min(size), size - 1);
    }
    if !digits(first) || !(last.is_empty() || digits(last)) {
        return RangeRequest::Full;
    }
    let Ok(a) = first.parse::<u64>() else {
        return RangeRequest::Unsatisfiable;
    };
    let b = if last.is_empty() {
        u64::MAX
    } else {
        last.parse::<u64>().unwrap_or(u64::MAX)
    };
    if b < a {
        return RangeRequest::Full;
    }
    if a >= size {
        return RangeRequest::Unsatisfiable;
    }
    RangeRequest::Part(a, b.min(size - 1))
}

/// A cached image opened for a download.
pub struct Opened {
    pub id: String,
    pub file: File,
    pub size: u64,
    pub range: RangeRequest,
    /// The checksum the driver recorded, for `ETag` and `Content-MD5`.
    pub checksum: Option<String>,
    /// Opened without the driver: its hit cannot be counted.
    pub degraded: bool,
}

/// Open a cached image for a download (blocking: one driver call, two
/// the first time an image file is seen, to learn its checksum), with its
/// size and what the `Range` header asks of it.
pub fn open_cached(app: &App, id: &str, range: Option<String>) -> Result<Opened, Error> {
    let mut reader = app.cache.open_for_read(id)?;
    let io_err = |e: io::Error| Error::io("reading cached image", &e);
    let file = reader
        .file()
        .ok_or_else(|| Error::io_message("read session has no file"))?
        .try_clone()
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    let size = meta.len();
    let checksum = app.checksums.get(id, &meta, || reader.checksum())?;
    // The session ends here, unfinished: the download reads its own
    // descriptor, and the hit goes to the batch recorder once every byte
    // is out (`record-reads`). The driver instance is free at once.
    drop(reader);
    let range = parse_range(range.as_deref(), size);
    if let Some((start, end)) = range.span(size)
        && end - start > READAHEAD_FROM
    {
        // Start reading the pages in now, so the sends that follow (on
        // the event loop with sendfile) find them in memory.
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; advice only.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                start as libc::off_t,
                (end - start) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
    Ok(Opened {
        id: id.to_string(),
        file,
        size,
        range,
        checksum,
        degraded: false,
    })
}

/// A cached image opened without the driver (see
/// `ImageCache::open_sealed`): no checksum, and no hit is counted.
pub fn open_degraded(app: &App, id: &str, range: Option<String>) -> Result<Opened, Error> {
    let file = app.cache.open_sealed(id)?;
    let size = file
        .metadata()
        .map_err(|e| Error::io("reading cached image", &e))?
        .len();
    Ok(Opened {
        id: id.to_string(),
        file,
        size,
        range: parse_range(range.as_deref(), size),
        checksum: None,
        degraded: true,
    })
}

/// Bodies at least this large get `POSIX_FADV_WILLNEED`.
const READAHEAD_FROM: u64 = 1 << 20;

/// Checksums of image files already seen, keyed by id and checked against
/// the file (device, inode, size, modification time): a published image
/// file never changes, and an image cached again is a new file. Serving a
/// cached image then takes only `open-for-read` (and its hit a share of one
/// batched `record-reads`).
#[derive(Default)]
pub struct Checksums {
    known: std::sync::Mutex<Known>,
}

type FileKey = (u64, u64, u64, i64, i64);
/// Image id -> the file it was learnt from, and its checksum.
type Known = std::collections::HashMap<String, (FileKey, Option<String>)>;

/// Entries kept before the map starts over.
const CHECKSUMS_KEPT: usize = 100_000;

impl Checksums {
    fn get(
        &self,
        id: &str,
        meta: &std::fs::Metadata,
        ask: impl FnOnce() -> Result<Option<String>, Error>,
    ) -> Result<Option<String>, Error> {
        use std::os::unix::fs::MetadataExt;
        let key = (
            meta.dev(),
            meta.ino(),
            meta.size(),
            meta.mtime(),
            meta.mtime_nsec(),
        );
        if let Some((k, c)) = self.lock().get(id)
            && *k == key
        {
            return Ok(c.clone());
        }
        let checksum = ask()?;
        let mut known = self.lock();
        if known.len() >= CHECKSUMS_KEPT {
            known.clear();
        }
        known.insert(id.to_string(), (key, checksum.clone()));
        Ok(checksum)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `If-None-Match` names the image's entity tag (weak comparison, RFC
/// 9110 13.1.2) or is `*`: the client has the image already, and gets 304.
/// An image without a recorded checksum has no tag and never matches.
pub fn not_modified(if_none_match: Option<&str>, checksum: Option<&str>) -> bool {
    let (Some(inm), Some(c)) = (if_none_match, checksum) else {
        return false;
    };
    let tag = format!("\"{c}\"");
    inm.split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == tag)
}

/// The head of a 304 for a cached image: its `ETag`, no body.
pub fn not_modified_headers(checksum: &str) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(2);
    if let Ok(v) = HeaderValue::from_str(&format!("\"{checksum}\"")) {
        h.insert(header::ETAG, v);
    }
    h.insert("x-image-cache", HeaderValue::from_static("hit"));
    h
}

/// The head of a download from the cache (200 or 206), without `Date`
/// (hyper adds it; the sendfile front writes its own). The recorded
/// checksum is the `ETag`, and Glance's `Content-MD5` (hex, as Glance and
/// python-glanceclient use it) when it is an MD5 digest.
pub fn hit_headers(opened: &Opened) -> HeaderMap {
    let mut h = HeaderMap::with_capacity(8);
    set_common(&mut h);
    let (start, end) = opened.range.span(opened.size).unwrap_or((0, opened.size));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert("x-image-cache", HeaderValue::from_static("hit"));
    if let RangeRequest::Part(a, b) = opened.range {
        h.insert(header::CONTENT_RANGE, content_range(a, b, opened.size));
    }
    if let Some(c) = opened.checksum.as_deref() {
        // The host checked it is a short token (letters, digits, +/=_:-).
        if let Ok(v) = HeaderValue::from_str(&format!("\"{c}\"")) {
            h.insert(header::ETAG, v);
        }
        if let Ok(parsed) = c.parse::<image_cache::Checksum>()
            && parsed.algorithm == image_cache::Algorithm::Md5
            && matches!(opened.range, RangeRequest::Full)
            && let Ok(v) = HeaderValue::from_str(&parsed.hex)
        {
            h.insert("content-md5", v);
        }
    }
    h
}

/// What the cache made of a download.
enum Cached {
    /// Served from the cache.
    Found(Response),
    /// Not cached: fetch it.
    Miss,
    /// The driver is failing and the fail policy is fail-open: fetch it
    /// around the cache.
    DriverFailing,
}

/// Serve from the cache if the image is there. When the driver fails
/// (and no sealed file stands in): under fail-open (with an upstream) a
/// miss around the cache, else the error.
async fn try_cached(
    app: &Arc<App>,
    id: &str,
    range: Option<&str>,
    if_none_match: Option<&str>,
    head: bool,
) -> Result<Cached, ApiError> {
    let app2 = app.clone();
    let id2 = id.to_string();
    let range = range.map(str::to_string);
    let inm = if_none_match.map(str::to_string);
    // One hop to the blocking pool: open (one driver call), size, and the
    // first chunk, so a small image needs no second hop before sending.
    let opened = tokio::task::spawn_blocking(move || -> Result<(Opened, BytesMut, bool), Error> {
        let mut opened = match open_cached(&app2, &id2, range.clone()) {
            Ok(o) => o,
            Err(e @ (Error::NotFound(_) | Error::InvalidImageId(_))) => return Err(e),
            // The driver cannot answer (its database is down, it faults):
            // a file the host sealed as this image is still this image.
            Err(e) => match open_degraded(&app2, &id2, range) {
                Ok(o) => {
                    app2.note_driver_error(&e, "open-for-read");
                    warn!(image_id = %id2, "serving a sealed image file without the driver");
                    inc(&app2.metrics.served_degraded);
                    o
                }
                Err(_) => return Err(e),
            },
        };
        let fresh = not_modified(inm.as_deref(), opened.checksum.as_deref());
        let mut first = BytesMut::new();
        if !head
            && !fresh
            && let Some((start, end)) = opened.range.span(opened.size)
            && end > start
        {
            let io_err = |e: io::Error| Error::io("reading cached image", &e);
            opened.file.seek(SeekFrom::Start(start)).map_err(io_err)?;
            read_chunk(&mut opened.file, &mut first, (end - start).min(CHUNK)).map_err(io_err)?;
        }
        Ok((opened, first, fresh))
    })
    .await
    .map_err(|e| ApiError::internal(format!("open task: {e}")))?;
    let (opened, first, fresh) = match opened {
        Ok(o) => o,
        Err(Error::NotFound(_)) => return Ok(Cached::Miss),
        Err(Error::InvalidImageId(_)) => return Err(ApiError::bad_id("the driver rejected it")),
        Err(e) if app.fails_open(&e) => {
            // The driver is failing and holds no sealed file: fail-open
            // serves the upstream's bytes around the cache.
            app.note_driver_error(&e, "open-for-read");
            warn!(image_id = %id, error = %e, "the driver is failing: serving from the upstream (fail-open)");
            return Ok(Cached::DriverFailing);
        }
        // The driver is failing: fail-closed (and fail-reload, whose retry
        // failed too) answers the error.
        Err(e) if super::driver_failing(&e) => return Err(app.library_error(e, "open-for-read")),
        Err(e) => {
            // Another error (an I/O error the driver reports) and no
            // sealed file: a miss, which the upstream serves.
            app.note_driver_error(&e, "open-for-read");
            return Ok(Cached::Miss);
        }
    };
    if let (true, Some(c)) = (fresh, opened.checksum.as_deref()) {
        // The client has it: no body, no hit.
        let mut r = Response::new(Body::empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        *r.headers_mut() = not_modified_headers(c);
        return Ok(Cached::Found(r));
    }
    let Some((start, end)) = opened.range.span(opened.size) else {
        return Err(unsatisfiable(opened.size));
    };
    let headers = hit_headers(&opened);
    let status = opened.range.status();
    let Opened {
        id, file, degraded, ..
    } = opened;
    // A hit the driver cannot record is not counted.
    let id = (!degraded).then_some(id);
    let mut response = if head {
        // No body, no hit.
        Response::new(Body::empty())
    } else {
        Response::new(Body::from_stream(cached_stream(
            app.clone(),
            id,
            file,
            first,
            start,
            end,
        )))
    };
    *response.headers_mut() = headers;
    *response.status_mut() = status;
    Ok(Cached::Found(response))
}

/// Read `n` bytes at the file's offset onto the end of `buf`; fewer is
/// an error (the file was cut since it was opened).
fn read_chunk(file: &mut File, buf: &mut BytesMut, n: u64) -> io::Result<()> {
    let at = buf.len();
    buf.resize(at + n as usize, 0);
    file.read_exact(&mut buf[at..]).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the cached file is shorter than when it was opened",
        ),
        _ => e,
    })
}

struct CachedState {
    app: Arc<App>,
    /// The image, until its hit is counted or the download failed.
    id: Option<String>,
    file: Option<File>,
    /// This response's buffer: the first chunk until it is sent, then
    /// each chunk read. A chunk handed to hyper shares it; once hyper has
    /// written and dropped that chunk the next read reuses the memory, so a
    /// reader holds about one chunk however slowly it reads, and the
    /// allocator sees one allocation per response, not one per chunk.
    buf: BytesMut,
    pos: u64,
    end: u64,
    _in_flight: InFlight,
}

/// hyper stops polling a body once `Content-Length` bytes went out and
/// drops it: the hit is counted then, when every byte was handed to hyper.
/// Dropped earlier (the client left, a read failed), there is no hit.
impl Drop for CachedState {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else {
            return;
        };
        if self.pos < self.end || !self.buf.is_empty() {
            return;
        }
        self.app.hits.completed(&id);
        inc(&self.app.metrics.hits);
    }
}

fn cached_stream(
    app: Arc<App>,
    id: Option<String>,
    file: File,
    first: BytesMut,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = CachedState {
        _in_flight: InFlight::new(&app.metrics),
        app,
        id,
        file: Some(file),
        buf: first,
        pos: start,
        end,
    };
    stream::unfold(state, |mut s| async move {
        if !s.buf.is_empty() {
            // The first chunk, read when the file was opened.
            let first = s.buf.split().freeze();
            s.pos += first.len() as u64;
            add(&s.app.metrics.bytes_from_cache, first.len() as u64);
            return Some((Ok(first), s));
        }
        if s.pos < s.end {
            let n = (s.end - s.pos).min(CHUNK);
            let mut file = s.file.take()?;
            let mut buf = std::mem::take(&mut s.buf);
            // Takes the memory back when the last chunk handed out from
            // it is gone (hyper wrote and dropped it).
            buf.reserve(n as usize);
            let read = tokio::task::spawn_blocking(move || {
                let r = read_chunk(&mut file, &mut buf, n);
                (file, buf, r)
            })
            .await;
            return match read {
                Ok((file, mut buf, Ok(()))) => {
                    s.file = Some(file);
                    s.pos += n;
                    add(&s.app.metrics.bytes_from_cache, n);
                    let chunk = buf.split().freeze();
                    s.buf = buf;
                    Some((Ok(chunk), s))
                }
                Ok((_, _, Err(e))) => {
                    inc(&s.app.metrics.responses_aborted);
                    warn!(error = %e, "reading a cached image failed; aborting the response");
                    s.pos = s.end;
                    s.id = None;
                    Some((Err(e), s))
                }
                Err(e) => {
                    inc(&s.app.metrics.responses_aborted);
                    s.pos = s.end;
                    s.id = None;
                    Some((Err(io::Error::other(e.to_string())), s))
                }
            };
        }
        None
    })
}

struct SpoolState {
    app: Arc<App>,
    flight: Arc<Flight>,
    progress: tokio::sync::watch::Receiver<Progress>,
    pos: u64,
    end: Option<u64>,
    done: bool,
    /// Reused from chunk to chunk, as [`CachedState::buf`].
    buf: BytesMut,
    _in_flight: InFlight,
}

/// A client's view of a fetch: the spool's bytes `from..to` (to the end
/// when `to` is `None`) as they arrive; an error (which aborts the
/// response) if the fetch fails.
fn spool_stream(
    app: Arc<App>,
    flight: Arc<Flight>,
    from: u64,
    to: Option<u64>,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = SpoolState {
        _in_flight: InFlight::new(&app.metrics),
        progress: flight.progress.clone(),
        app,
        flight,
        pos: from,
        end: to,
        done: false,
        buf: BytesMut::new(),
    };
    stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if s.end.is_some_and(|end| s.pos >= end) {
                return None;
            }
            let p = s.progress.borrow_and_update().clone();
            let available = p.readable(s.end);
            if s.pos < available {
                let n = (available - s.pos).min(SPOOL_CHUNK);
                let spool = s.flight.spool.clone();
                let pos = s.pos;
                let mut buf = std::mem::take(&mut s.buf);
                buf.reserve(n as usize);
                let read = tokio::task::spawn_blocking(move || {
                    use std::os::unix::fs::FileExt;
                    buf.resize(n as usize, 0);
                    spool.read_exact_at(&mut buf, pos).map(|()| buf)
                })
                .await
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|r| r);
                return match read {
                    Ok(mut buf) => {
                        s.pos += n;
                        add(&s.app.metrics.bytes_from_upstream, n);
                        let chunk = buf.split().freeze();
                        s.buf = buf;
                        Some((Ok(chunk), s))
                    }
                    Err(e) => {
                        s.done = true;
                        inc(&s.app.metrics.responses_aborted);
                        Some((Err(e), s))
                    }
                };
            }
            match p.outcome {
                Some(Outcome::Complete) => return None,
                Some(Outcome::Failed(e)) => {
                    s.done = true;
                    inc(&s.app.metrics.responses_aborted);
                    debug!(error = %e.message, "aborting a response: the fetch failed");
                    return Some((Err(io::Error::other(e.message)), s));
                }
                Some(Outcome::AlreadyCached) => return None,
                None => {}
            }
            if s.progress.changed().await.is_err() {
                // The fetch task is gone without an outcome (it panicked).
                s.done = true;
                return Some((Err(io::Error::other("the fetch ended without a result")), s));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match() {
        let c = Some("md5:abc");
        assert!(not_modified(Some("\"md5:abc\""), c));
        assert!(not_modified(Some("W/\"md5:abc\""), c));
        assert!(not_modified(Some("\"x\", \"md5:abc\""), c));
        assert!(not_modified(Some("*"), c));
        assert!(!not_modified(Some("\"md5:abd\""), c));
        assert!(!not_modified(Some("md5:abc"), c));
        assert!(!not_modified(None, c));
        assert!(!not_modified(Some("*"), None));
    }

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-3"), 10), Part(0, 3));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Part(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Part(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Part(0, 9));
        assert_eq!(parse_range(Some("bytes=8-100"), 10), Part(8, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=3-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-1,4-5"), 10), Full);
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=a-b"), 10), Full);
    }
}
