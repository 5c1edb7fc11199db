//! The image store behind the cache, and single-flight fetches from it.
//!
//! A miss starts one [`Flight`] per image id: a task, independent of any
//! client, that reads the upstream and runs the library's caching tee
//! (`ImageCache::cache_stream`) with a spool file as the tee's sink. Every
//! client asking for the image meanwhile, the first one included, reads
//! the spool at its own pace: one upstream fetch however many clients,
//! a slow or vanished client never stalls or stops the fetch, and the
//! image is published in the cache only if the whole fetch succeeded
//! (the tee aborts the write session otherwise: no partial image).
//!
//! The spool is an unnamed temporary file (`O_TMPFILE` where supported),
//! released when the last reader drops it.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::Bytes;
use futures_util::StreamExt;
use image_cache::{Checksum, Error};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::App;
use super::metrics::{add, inc};

/// Where misses come from.
pub enum Upstream {
    /// A Glance API: `GET {base}/v2/images/{id}/file`.
    Glance {
        base: String,
        client: reqwest::Client,
    },
    /// A directory holding one file per image id.
    Dir(PathBuf),
}

/// What a fetch reports before its first byte.
#[derive(Clone, Debug, Default)]
pub struct Start {
    /// The image size, if the upstream said.
    pub size: Option<u64>,
    /// The upstream's md5 (Glance's `Content-MD5`, hex), verified by the tee.
    pub md5: Option<String>,
}

/// Why a fetch produced no image for the clients.
#[derive(Clone, Debug)]
pub struct FetchError {
    pub status: StatusCode,
    pub message: String,
}

/// How a fetch ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// All bytes are in the spool (cached unless `cached` is false).
    Complete { cached: bool },
    /// The image was cached already: read it from the cache.
    AlreadyCached,
    /// Failed; clients that got bytes see their response aborted.
    Failed(FetchError),
}

/// A fetch's progress, as its readers see it.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub start: Option<Start>,
    /// Bytes in the spool so far.
    pub written: u64,
    pub outcome: Option<Outcome>,
}

/// One fetch of one image, shared by every request for it.
pub struct Flight {
    pub spool: Arc<File>,
    pub progress: watch::Receiver<Progress>,
}

/// The fetches under way, by image id.
#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
}

impl Flights {
    pub fn active(&self) -> usize {
        self.map.lock().unwrap().len()
    }
}

impl Upstream {
    /// `URL` (http:// or https://) or an existing directory.
    pub fn parse(spec: &str, timeout: Duration) -> Result<Upstream, String> {
        if spec.starts_with("http://") || spec.starts_with("https://") {
            let base = spec.trim_end_matches('/').to_string();
            reqwest::Url::parse(&base).map_err(|e| format!("upstream URL {spec:?}: {e}"))?;
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10).min(timeout))
                .read_timeout(timeout)
                .redirect(reqwest::redirect::Policy::limited(3))
                .build()
                .map_err(|e| format!("upstream HTTP client: {e}"))?;
            return Ok(Upstream::Glance { base, client });
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
            Upstream::Glance { base, .. } => base.clone(),
            Upstream::Dir(p) => p.display().to_string(),
        }
    }

    /// Start reading image `id` (already validated). The reader is
    /// blocking; for HTTP it is fed by a task reading the response.
    async fn open(
        &self,
        id: &str,
        token: Option<&str>,
    ) -> Result<(Start, Box<dyn Read + Send>), FetchError> {
        match self {
            Upstream::Dir(dir) => {
                let path = dir.join(id);
                let opened = tokio::task::spawn_blocking(move || -> io::Result<(File, u64)> {
                    let file = File::open(&path)?;
                    let meta = file.metadata()?;
                    if !meta.is_file() {
                        return Err(io::Error::new(io::ErrorKind::NotFound, "not a file"));
                    }
                    Ok((file, meta.len()))
                })
                .await
                .map_err(|e| internal(format!("upstream open task: {e}")))?;
                match opened {
                    Ok((file, size)) => Ok((
                        Start {
                            size: Some(size),
                            md5: None,
                        },
                        Box::new(file),
                    )),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Err(FetchError {
                        status: StatusCode::NOT_FOUND,
                        message: format!("image {id:?} is neither cached nor in the upstream"),
                    }),
                    Err(e) => {
                        warn!(image_id = id, error = %e, "reading the upstream directory failed");
                        Err(FetchError {
                            status: StatusCode::BAD_GATEWAY,
                            message: format!("the upstream cannot provide image {id:?}"),
                        })
                    }
                }
            }
            Upstream::Glance { base, client } => {
                let url = format!("{base}/v2/images/{}/file", url_segment(id));
                let mut request = client.get(&url);
                if let Some(token) = token {
                    request = request.header(super::auth::TOKEN_HEADER, token);
                }
                let response = request.send().await.map_err(|e| {
                    warn!(image_id = id, error = %e, "upstream request failed");
                    FetchError {
                        status: StatusCode::BAD_GATEWAY,
                        message: format!("the upstream did not answer for image {id:?}"),
                    }
                })?;
                let status = response.status();
                if !status.is_success() {
                    let (status, message) = match status.as_u16() {
                        404 => (
                            StatusCode::NOT_FOUND,
                            format!("image {id:?} not found upstream"),
                        ),
                        401 => (
                            StatusCode::UNAUTHORIZED,
                            "the upstream refused the token".into(),
                        ),
                        403 => (StatusCode::FORBIDDEN, "the upstream refused access".into()),
                        204 => (
                            StatusCode::NO_CONTENT,
                            format!("image {id:?} has no data upstream"),
                        ),
                        other => (
                            StatusCode::BAD_GATEWAY,
                            format!("the upstream answered {other} for image {id:?}"),
                        ),
                    };
                    return Err(FetchError { status, message });
                }
                let md5 = response
                    .headers()
                    .get("content-md5")
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().to_ascii_lowercase())
                    .filter(|v| v.len() == 32 && v.bytes().all(|b| b.is_ascii_hexdigit()));
                let start = Start {
                    size: response.content_length(),
                    md5,
                };
                let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
                let mut body = response.bytes_stream();
                tokio::spawn(async move {
                    while let Some(chunk) = body.next().await {
                        let chunk = chunk.map_err(|e| {
                            io::Error::other(format!("the upstream connection failed: {e}"))
                        });
                        let failed = chunk.is_err();
                        if tx.send(chunk).await.is_err() || failed {
                            break;
                        }
                    }
                });
                Ok((
                    start,
                    Box::new(ChannelReader {
                        rx,
                        chunk: Bytes::new(),
                    }),
                ))
            }
        }
    }

    /// HEAD for an uncached image: the size, without fetching.
    pub async fn size(&self, id: &str, token: Option<&str>) -> Result<Option<u64>, FetchError> {
        match self {
            Upstream::Dir(dir) => {
                let path = dir.join(id);
                match tokio::fs::metadata(&path).await {
                    Ok(m) if m.is_file() => Ok(Some(m.len())),
                    _ => Err(FetchError {
                        status: StatusCode::NOT_FOUND,
                        message: format!("image {id:?} is neither cached nor in the upstream"),
                    }),
                }
            }
            Upstream::Glance { base, client } => {
                let url = format!("{base}/v2/images/{}/file", url_segment(id));
                let mut request = client.head(&url);
                if let Some(token) = token {
                    request = request.header(super::auth::TOKEN_HEADER, token);
                }
                let response = request.send().await.map_err(|_| FetchError {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("the upstream did not answer for image {id:?}"),
                })?;
                match response.status().as_u16() {
                    200..=299 => Ok(response.content_length()),
                    404 => Err(FetchError {
                        status: StatusCode::NOT_FOUND,
                        message: format!("image {id:?} not found upstream"),
                    }),
                    other => Err(FetchError {
                        status: StatusCode::BAD_GATEWAY,
                        message: format!("the upstream answered {other} for image {id:?}"),
                    }),
                }
            }
        }
    }
}

fn internal(message: String) -> FetchError {
    warn!("{message}");
    FetchError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message: "internal error".into(),
    }
}

/// Percent-encode an image id for a URL path segment.
fn url_segment(id: &str) -> String {
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

/// The blocking side of an HTTP body: what the tee reads.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    chunk: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.chunk = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.chunk.len().min(buf.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// Wraps the upstream reader: counts bytes, and fails when the server
/// gives up on fetches (shutdown past its grace period), so the tee
/// aborts the write instead of leaving it half done.
struct Counted<'a> {
    inner: Box<dyn Read + Send>,
    app: &'a App,
}

impl Read for Counted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.app.abort_fetches.load(Ordering::Relaxed) {
            return Err(io::Error::other("the server is shutting down"));
        }
        let n = self.inner.read(buf)?;
        add(&self.app.metrics.upstream_bytes, n as u64);
        Ok(n)
    }
}

/// The tee's sink: appends to the spool and tells the readers.
struct SpoolSink<'a> {
    file: &'a File,
    tx: &'a watch::Sender<Progress>,
    written: u64,
}

impl Write for SpoolSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        self.written += n as u64;
        let written = self.written;
        self.tx.send_modify(|p| p.written = written);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Join the fetch of `id` under way, or start one. Returns the flight and
/// whether it was joined.
pub fn join_or_start(
    app: &Arc<App>,
    id: &str,
    token: Option<String>,
) -> Result<(Arc<Flight>, bool), FetchError> {
    let mut map = app.flights.map.lock().unwrap();
    if let Some(flight) = map.get(id) {
        return Ok((flight.clone(), true));
    }
    if app.upstream.is_none() {
        return Err(FetchError {
            status: StatusCode::NOT_FOUND,
            message: format!("image {id:?} is not cached (and no upstream is configured)"),
        });
    }
    let spool = tempfile::tempfile_in(&app.spool_dir).map_err(|e| {
        internal(format!(
            "cannot create a spool file in {}: {e}",
            app.spool_dir.display()
        ))
    })?;
    let spool = Arc::new(spool);
    let (tx, rx) = watch::channel(Progress::default());
    let tx = Arc::new(tx);
    let flight = Arc::new(Flight {
        spool: spool.clone(),
        progress: rx,
    });
    map.insert(id.to_string(), flight.clone());
    drop(map);
    app.metrics.flights_active.fetch_add(1, Ordering::Relaxed);
    let app = app.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let started = Instant::now();
        let outcome = fetch(&app, &id, token, spool, &tx).await;
        match &outcome {
            Outcome::Complete { cached } => info!(
                image_id = %id,
                bytes = tx.borrow().written,
                cached,
                seconds = started.elapsed().as_secs_f64(),
                "upstream fetch complete"
            ),
            Outcome::AlreadyCached => {}
            Outcome::Failed(e) => {
                inc(&app.metrics.upstream_failures);
                warn!(image_id = %id, status = e.status.as_u16(), error = %e.message, "upstream fetch failed");
            }
        }
        tx.send_modify(|p| p.outcome = Some(outcome));
        // Removed only now: a request either joins this flight or, after
        // the commit, finds the image cached.
        app.flights.map.lock().unwrap().remove(&id);
        app.metrics.flights_active.fetch_sub(1, Ordering::Relaxed);
    });
    Ok((flight, false))
}

async fn fetch(
    app: &Arc<App>,
    id: &str,
    token: Option<String>,
    spool: Arc<File>,
    tx: &Arc<watch::Sender<Progress>>,
) -> Outcome {
    let cached = {
        let app = app.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || app.cache.is_cached(&id)).await
    };
    match cached {
        Ok(Ok(true)) => return Outcome::AlreadyCached,
        Ok(Ok(false)) => {}
        Ok(Err(e)) => app.note_driver_error(&e, "is-cached"),
        Err(e) => warn!("is-cached task: {e}"),
    }
    let Some(upstream) = app.upstream.as_ref() else {
        return Outcome::Failed(FetchError {
            status: StatusCode::NOT_FOUND,
            message: format!("image {id:?} is not cached"),
        });
    };
    inc(&app.metrics.upstream_fetches);
    let (start, source) = match upstream.open(id, token.as_deref()).await {
        Ok(opened) => opened,
        Err(e) => return Outcome::Failed(e),
    };
    let over_ceiling = match (app.ceiling, start.size) {
        (Some(ceiling), Some(size)) => {
            let app2 = app.clone();
            match tokio::task::spawn_blocking(move || app2.cache.get_cache_size()).await {
                Ok(Ok(current)) => current.saturating_add(size) > ceiling,
                Ok(Err(e)) => {
                    app.note_driver_error(&e, "get-cache-size");
                    true
                }
                Err(_) => true,
            }
        }
        _ => false,
    };
    tx.send_modify(|p| p.start = Some(start.clone()));
    let app2 = app.clone();
    let id2 = id.to_string();
    let tx2 = tx.clone();
    let start2 = start.clone();
    let result = tokio::task::spawn_blocking(move || {
        let app = &*app2;
        let tx = &*tx2;
        let start = start2;
        let mut source = Counted { inner: source, app };
        let mut sink = SpoolSink {
            file: &spool,
            tx,
            written: 0,
        };
        if over_ceiling {
            return io::copy(&mut source, &mut sink)
                .map(|_| (false, None))
                .map_err(Error::Source);
        }
        let expected = start
            .md5
            .as_deref()
            .and_then(|hex| format!("md5:{hex}").parse::<Checksum>().ok());
        app.cache
            .cache_stream(&id2, expected.as_ref(), &mut source, &mut sink)
            .map(|report| (report.cached, report.cache_error))
    });
    let result = match result.await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(internal(format!("fetch task: {e}"))),
    };
    match result {
        Ok((cached, cache_error)) => {
            if over_ceiling {
                inc(&app.metrics.not_cached_ceiling);
                info!(image_id = %id, "not cached: it would push the cache over its ceiling");
            }
            if let Some(e) = cache_error {
                inc(&app.metrics.cache_write_failures);
                warn!(image_id = %id, error = %e, "served but not cached");
            }
            if cached {
                inc(&app.metrics.images_cached);
                if let (Some(ceiling), None) = (app.ceiling, start.size) {
                    enforce_ceiling_after(app, id, ceiling).await;
                }
            }
            Outcome::Complete { cached }
        }
        Err(Error::ChecksumMismatch {
            expected, actual, ..
        }) => Outcome::Failed(FetchError {
            status: StatusCode::BAD_GATEWAY,
            message: format!(
                "image {id:?} from the upstream does not match its checksum (expected {expected}, got {actual}); not cached"
            ),
        }),
        Err(Error::Source(e)) => Outcome::Failed(FetchError {
            status: StatusCode::BAD_GATEWAY,
            message: format!("the upstream failed while sending image {id:?}: {e}"),
        }),
        Err(e) => {
            app.note_driver_error(&e, "cache-stream");
            Outcome::Failed(internal(format!("caching image {id:?} failed: {e}")))
        }
    }
}

/// The upstream did not say the size: the image was cached, and is
/// removed again if it pushed the cache over the ceiling.
async fn enforce_ceiling_after(app: &Arc<App>, id: &str, ceiling: u64) {
    let app2 = app.clone();
    let id2 = id.to_string();
    let removed = tokio::task::spawn_blocking(move || -> image_cache::Result<bool> {
        if app2.cache.get_cache_size()? > ceiling {
            app2.cache.delete_cached_image(&id2)?;
            return Ok(true);
        }
        Ok(false)
    })
    .await;
    if let Ok(Ok(true)) = removed {
        inc(&app.metrics.not_cached_ceiling);
        info!(image_id = %id, "removed again: it pushed the cache over its ceiling");
    }
}

/// The spool's `Path`-free description for logs.
pub fn spool_dir_usable(dir: &Path) -> Result<(), String> {
    tempfile::tempfile_in(dir)
        .map(|_| ())
        .map_err(|e| format!("spool directory {}: {e}", dir.display()))
}
