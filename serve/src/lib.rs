//! `image-cache serve` as a library: the cache as an HTTP service in front
//! of an image store (Glance's `GET /v2/images/{id}/file` with its local
//! cache, and Glance's cache management API), with the periodic jobs built
//! in. A [`Config`] and an opened [`ImageCache`] go in, [`run`] serves
//! until SIGTERM, a [`ServeError`] comes out.
//!
//! | module | does |
//! | --- | --- |
//! | `lib` (here) | config, router, listener, signals, shutdown, swap |
//! | [`sendfile`] | each connection's front: cached downloads over `sendfile(2)` |
//! | [`images`] | image downloads: cached files, ranges, misses |
//! | [`image_records`] | Glance's image records (`GET /v2/images[/{id}]`) |
//! | [`access`] | who may download which image (Glance, token, public) |
//! | [`fill`] | single-flight fills: spooled, verified, then cached |
//! | [`upstream`] | the image store: Glance or a directory, confined |
//! | [`siblings`] | sibling fill: misses read from the nodes that hold them |
//! | [`status`] | the status page `/-/status` and its document |
//! | [`warm`] | warming: images filled before they are asked for, on a fleet |
//! | [`cache_api`] | Glance's `/v2/cache` API, `/versions`, driver swap |
//! | [`background`] | prefetcher, prune and clean loops |
//! | [`metrics`] | Prometheus counters |
//! | [`auth`] | tokens |
//!
//! Driver calls are blocking: every one runs on tokio's blocking pool.

mod access;
mod auth;
mod background;
mod cache_api;
mod fill;
mod hits;
mod image_records;
mod images;
mod metrics;
mod sendfile;
mod siblings;
mod status;
mod upstream;
mod warm;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use hyper_util::rt::TokioTimer;
use image_cache::{DriverSource, Error, FailPolicy, ImageCache};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio::time::Sleep;
use tracing::{debug, error, info, warn};

pub use auth::{Secret, Token};
use metrics::{InFlight, Metrics, inc};
use upstream::Upstream;

/// Glance's default bind address for the API.
const DEFAULT_LISTEN: &str = "127.0.0.1:9292";
/// Largest request head (request line and headers) accepted.
pub(crate) const MAX_HEAD_BYTES: usize = 16 << 10;
/// Most request headers accepted.
pub(crate) const MAX_HEADERS: usize = 64;
/// Largest request body accepted (the driver swap's JSON).
const MAX_BODY_BYTES: usize = 16 << 10;

/// An error answer: status and a JSON body `{"error": {...}}`. Messages
/// name images by id, never a file path.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// For a 416: the image's size, sent as `Content-Range: bytes */size`.
    pub content_range_size: Option<u64>,
    /// For a 503: `Retry-After`, in seconds.
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            content_range_size: None,
            retry_after: None,
        }
    }

    /// A 503's `Retry-After`.
    pub fn with_retry_after(mut self, seconds: u32) -> ApiError {
        self.retry_after = Some(seconds);
        self
    }

    /// The headers an error answer carries besides its JSON body.
    pub fn extra_headers(&self) -> Vec<(axum::http::HeaderName, axum::http::HeaderValue)> {
        let mut h = Vec::new();
        if let Some(v) = self.content_range() {
            h.push((axum::http::header::CONTENT_RANGE, v));
        }
        if let Some(s) = self.retry_after {
            h.push((
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(s),
            ));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.push((
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Keystone uri=\"\""),
            ));
        }
        h
    }

    /// A 416's `Content-Range: bytes */size`.
    pub fn with_content_range(mut self, size: u64) -> ApiError {
        self.content_range_size = Some(size);
        self
    }

    /// A 416's `Content-Range` header value.
    fn content_range(&self) -> Option<axum::http::HeaderValue> {
        self.content_range_size.map(|size| {
            axum::http::HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii")
        })
    }

    /// The JSON body every error answer has.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "code": self.status.as_u16(),
            "title": self.status.canonical_reason().unwrap_or(""),
            "message": self.message,
        }})
    }

    /// A server-side failure: the detail goes to the log, not the client.
    pub fn internal(detail: String) -> ApiError {
        error!(error = %detail, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server log",
        )
    }

    pub fn bad_id(why: &str) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, format!("invalid image id: {why}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        for (k, v) in self.extra_headers() {
            r.headers_mut().insert(k, v);
        }
        r
    }
}

impl From<upstream::FetchError> for ApiError {
    fn from(e: upstream::FetchError) -> ApiError {
        let mut a = ApiError::new(e.status, e.message);
        a.retry_after = e.retry_after;
        a
    }
}

impl From<ApiError> for upstream::FetchError {
    fn from(a: ApiError) -> upstream::FetchError {
        upstream::FetchError {
            status: a.status,
            message: a.message,
            retry_after: a.retry_after,
        }
    }
}

/// Whether a failed lookup means the driver is failing (the fail policy
/// applies): it faulted (trap, deadline, broken contract), every instance
/// stayed busy, or its database cannot be reached. Other errors (a bad
/// id, not found, an I/O error it reports) keep their own meaning.
pub(crate) fn driver_failing(e: &Error) -> bool {
    matches!(
        e,
        Error::DriverFault { .. } | Error::Overloaded(_) | Error::Database(_)
    )
}

/// The image id rule (the `image-id` crate's, as everywhere), checked
/// before anything reaches the driver or the upstream.
pub(crate) fn validate_id(id: &str) -> Result<(), ApiError> {
    match image_cache::validate_image_id(id) {
        Ok(()) => Ok(()),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// The `{id}` path segment, with a JSON 400 (not axum's text) when it
/// cannot be decoded.
pub(crate) struct RawId(pub String);

impl<S: Send + Sync> FromRequestParts<S> for RawId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<String>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(id)) => Ok(RawId(id)),
            Err(_) => Err(ApiError::bad_id("it is not valid percent-encoded UTF-8")),
        }
    }
}

/// Tokens the server checks.
pub(crate) struct Tokens {
    pub admin: Option<auth::Token>,
    pub image: Option<auth::Token>,
}

impl Tokens {
    /// Outside Glance mode (see [`access`]): with an image token, it or
    /// the admin token must be sent; without one downloads are public.
    pub fn check_download(&self, headers: &axum::http::HeaderMap) -> Result<(), ApiError> {
        let Some(image) = self.image.as_ref() else {
            return Ok(());
        };
        let mut accepted = vec![image];
        accepted.extend(self.admin.as_ref());
        auth::check(headers, &accepted)
    }
}

/// What a fill must keep to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FillLimits {
    /// Bytes per second a fetch must average over each window.
    pub min_rate: u64,
    pub rate_window: Duration,
    /// Free bytes kept on the cache's file system.
    pub disk_reserve: u64,
}

/// What SIGHUP may change.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tunables {
    pub max_size: u64,
    pub stall_time: Duration,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Intervals {
    pub prefetch: Duration,
    pub prune: Duration,
    pub clean: Duration,
}

/// Everything a request handler reaches.
pub(crate) struct App {
    pub cache: Arc<ImageCache>,
    pub upstream: Option<Upstream>,
    pub upstream_token: Option<String>,
    /// How downloads are authorized, and the upstream's recent answers.
    pub access: access::Mode,
    pub decisions: access::Decisions,
    pub flights: fill::Flights,
    pub limits: FillLimits,
    /// Recorded checksums of the image files served.
    pub checksums: images::Checksums,
    pub metrics: Arc<Metrics>,
    /// Hits of completed downloads, recorded in batches.
    pub hits: Arc<hits::Hits>,
    pub tokens: Tokens,
    pub tunables: RwLock<Tunables>,
    pub intervals: Intervals,
    pub ceiling: Option<u64>,
    /// Fills that make room under the max size (one at a time).
    pub admission: fill::Admission,
    /// Sibling fill, when a peer token is configured.
    pub siblings: Option<siblings::Siblings>,
    /// This node's URL (`worker_self_reference_url`), no trailing slash.
    pub self_url: Option<String>,
    /// Warmings under way and recent.
    pub warmings: warm::Warmings,
    /// The status page's samples.
    pub samples: status::Samples,
    pub spool_dir: PathBuf,
    /// Prune and clean: one at a time on the root.
    pub maintenance: AsyncMutex<()>,
    /// One prefetch run at a time (it takes no maintenance lock).
    pub prefetching: AsyncMutex<()>,
    pub prefetch_backoff: background::Backoff,
    /// One swap at a time.
    pub swap_lock: AsyncMutex<()>,
    /// Names in swap requests to drivers (None: built-in names and paths).
    pub driver_resolver: Option<DriverResolver>,
    pub prefetch_now: Notify,
    stopping: AtomicBool,
    /// Set when shutdown's grace period is over: fetches abort.
    pub abort_fetches: AtomicBool,
    abort_now: Notify,
}

impl App {
    /// Resolves once fetches are to abort (shutdown past its grace).
    pub async fn fetches_aborted(&self) {
        loop {
            let notified = self.abort_now.notified();
            if self.abort_fetches.load(Ordering::Relaxed) {
                return;
            }
            notified.await;
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Whether a download whose cache lookup failed with `e` is served
    /// from the upstream around the cache (fail-open, and there is an
    /// upstream).
    pub fn fails_open(&self, e: &Error) -> bool {
        driver_failing(e) && self.cache.fail_policy() == FailPolicy::Open && self.upstream.is_some()
    }

    /// Log a failed driver call that the server works around.
    pub fn note_driver_error(&self, e: &Error, call: &str) {
        if matches!(e, Error::DriverFault { .. }) {
            inc(&self.metrics.driver_errors);
        }
        match e.io_code() {
            Some(code) => warn!(call, kind = e.kind(), code, error = %e, "cache call failed"),
            None => warn!(call, kind = e.kind(), error = %e, "cache call failed"),
        }
    }

    /// A library error as an answer: client mistakes keep their meaning,
    /// everything else is a 500 with the detail in the log.
    pub fn library_error(&self, e: Error, call: &str) -> ApiError {
        use image_cache::error::IoCode;
        match e {
            Error::InvalidImageId(_) => ApiError::bad_id("the driver rejected it"),
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not found in the cache"),
            Error::AlreadyCached(_) => ApiError::new(StatusCode::CONFLICT, "already cached"),
            Error::BeingCached(_) => ApiError::new(StatusCode::CONFLICT, "being cached now"),
            // The file system's answers keep their meaning.
            Error::Io { code, .. }
                if matches!(
                    code,
                    IoCode::NoSpace
                        | IoCode::NotFound
                        | IoCode::LimitExceeded
                        | IoCode::AccessDenied
                ) =>
            {
                self.note_driver_error(&e, call);
                match code {
                    // A full disk is the operator's to fix, and says so.
                    IoCode::NoSpace => ApiError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "the cache's disk is full; see the server log",
                    ),
                    // A file gone under the driver (deleted meanwhile).
                    IoCode::NotFound => {
                        ApiError::new(StatusCode::NOT_FOUND, "not found in the cache")
                    }
                    // Out of file descriptors: this node cannot now.
                    IoCode::LimitExceeded => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the server is out of open files; try again",
                    )
                    .with_retry_after(1),
                    // A directory this server's user may not write: this
                    // node cannot (another may); the log says which.
                    _ => ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the cache's file system refused access; see the server log",
                    )
                    .with_retry_after(5),
                }
            }
            // The driver's database is down: the server is degraded, not
            // broken (cached images are still served); try again later.
            Error::Database(_) => {
                self.note_driver_error(&e, call);
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the cache's database cannot be used now; see the server log",
                )
                .with_retry_after(5)
            }
            Error::Overloaded(_) => {
                self.note_driver_error(&e, call);
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the cache is busy; try again",
                )
                .with_retry_after(1)
            }
            e => {
                self.note_driver_error(&e, call);
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the cache failed ({}); see the server log", e.kind()),
                )
            }
        }
    }
}

/// Swap the driver while serving; the old one stays if the new one
/// cannot be used.
pub(crate) async fn swap(app: &Arc<App>, source: DriverSource) -> Result<String, ApiError> {
    let _one = app.swap_lock.lock().await;
    let spec = source.name();
    let app2 = app.clone();
    let started = Instant::now();
    let result = tokio::task::spawn_blocking(move || app2.cache.swap_driver(&source))
        .await
        .map_err(|e| ApiError::internal(format!("swap task: {e}")))?;
    match result {
        Ok(()) => {
            inc(&app.metrics.swaps);
            let name = app.cache.driver().name().to_string();
            info!(driver = %name, ms = started.elapsed().as_millis() as u64, "driver swapped");
            Ok(name)
        }
        Err(e) => {
            inc(&app.metrics.swap_failures);
            let root = app.cache.root().display().to_string();
            let message = e.to_string().replace(&root, "<cache root>");
            cache_api::log_swap_failure(&spec, &message);
            Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("driver {spec} cannot be used; the old driver stays: {message}"),
            ))
        }
    }
}

/// `GET /healthz`: 200 `{"status": "ok"}` when the driver answers (a call
/// that reaches its database, if it has one); 200 `{"status": "degraded"}`
/// when it does not but the cache root is there (cached images are still
/// served, by their seals, and under fail-open misses go to the upstream); 503
/// `{"status": "failing"}` when the root itself is gone.
async fn healthz(State(app): State<Arc<App>>) -> Response {
    let app2 = app.clone();
    let probe = tokio::task::spawn_blocking(move || app2.cache.get_cache_size()).await;
    let driver = app.cache.driver().name().to_string();
    let root_ok = std::fs::metadata(app.cache.root()).is_ok_and(|m| m.is_dir());
    match probe {
        Ok(Ok(_)) if root_ok => {
            axum::Json(json!({"status": "ok", "driver": driver})).into_response()
        }
        Ok(Err(e)) if root_ok => {
            app.note_driver_error(&e, "healthz");
            let serving = if app.fails_open(&e) {
                "cached images (without their checksums) and misses from the upstream, not cached (fail-open); no hits are recorded"
            } else if driver_failing(&e) {
                "cached images (without their checksums); misses fail (the fail policy is not fail-open); no hits are recorded"
            } else {
                "cached images (without their checksums) and misses; no hits are recorded"
            };
            axum::Json(json!({
                "status": "degraded",
                "driver": driver,
                "error": e.kind(),
                "fail_policy": app.cache.fail_policy().as_str(),
                "serving": serving,
            }))
            .into_response()
        }
        Ok(r) => {
            let error = match r {
                Err(e) => e.kind().to_string(),
                Ok(_) => "the cache root is gone".to_string(),
            };
            (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(json!({"status": "failing", "driver": driver, "error": error})),
            )
                .into_response()
        }
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn metrics_text(State(app): State<Arc<App>>) -> Response {
    let driver = app.cache.driver().name().to_string();
    let mut text = app.metrics.render(&app.cache, &driver);
    // The cache's size as last sampled (every 5 s; no driver call here).
    let max_size = app.tunables.read().unwrap().max_size;
    if let Some(size) = app.samples.last_size() {
        text.push_str(&format!(
            "# HELP image_cache_size_bytes The cache's size, sampled every 5 s.\n\
             # TYPE image_cache_size_bytes gauge\nimage_cache_size_bytes {size}\n"
        ));
    }
    text.push_str(&format!(
        "# HELP image_cache_max_size_bytes The size prune and admission keep the cache under.\n\
         # TYPE image_cache_max_size_bytes gauge\nimage_cache_max_size_bytes {max_size}\n"
    ));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this endpoint",
    )
}

/// Count, time and log every request; hold an in-flight mark while the
/// handler runs (streaming bodies hold their own).
async fn log_requests(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    inc(&app.metrics.requests);
    let _in_flight = InFlight::new(&app.metrics);
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    if status >= 500 {
        warn!(%method, %path, status, ms, "request");
    } else {
        debug!(%method, %path, status, ms, "request");
    }
    response
}

pub(crate) fn router(app: Arc<App>) -> Router {
    use cache_api as c;
    Router::new()
        .route("/v2/images/{id}/file", get(images::image_file))
        .route("/v2/images/{id}", get(image_records::get_image))
        .route("/v2/images", get(image_records::list_images))
        .route("/v2/cache", get(c::get_cache_state).delete(c::clear_cache))
        .route("/v2/cache/clean", post(c::clean))
        .route("/v2/cache/prune", post(c::prune))
        .route("/v2/cache/driver", get(c::get_driver).post(c::swap_driver))
        .route("/v2/cache/driver/rollback", post(c::rollback_driver))
        .route("/v2/cache/nodes/{id}", get(c::cached_nodes))
        .route("/-/status", get(status::page))
        .route("/-/status.json", get(status::document))
        .route("/v2/cache/warm", post(warm::start))
        .route("/v2/cache/warm/{id}", get(warm::status))
        .route(
            "/v2/cache/{id}",
            put(c::queue_image).delete(c::delete_cache_entry),
        )
        .route("/v2/schemas/image", get(c::image_schema))
        .route("/versions", get(c::versions))
        .route("/", get(c::root))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(app.clone(), log_requests))
        .with_state(app)
}

/// A connection as hyper sees it: the bytes the front already read
/// (`prefix`) come first, then the socket's; it fails when neither a read
/// nor a write makes progress for `timeout` while one is waiting, so slow
/// or stuck clients cannot hold a connection forever.
pub(crate) struct IdleTimeout {
    io: TcpStream,
    prefix: bytes::BytesMut,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    armed: bool,
    /// Requests of this connection whose handler is still working: the
    /// server, not the client, is the one being slow then.
    busy: Arc<std::sync::atomic::AtomicUsize>,
}

impl IdleTimeout {
    fn new(
        io: TcpStream,
        prefix: bytes::BytesMut,
        timeout: Duration,
        busy: Arc<std::sync::atomic::AtomicUsize>,
    ) -> IdleTimeout {
        IdleTimeout {
            io,
            prefix,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            armed: false,
            busy,
        }
    }

    fn progress(&mut self) {
        self.armed = false;
    }

    fn waiting(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            // A handler is working: the client is not idle. The timer
            // starts again once the answer is on its way.
            self.armed = false;
            return Poll::Pending;
        }
        if !self.armed {
            self.armed = true;
            let deadline = tokio::time::Instant::now() + self.timeout;
            self.timer.as_mut().reset(deadline);
        }
        match self.timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client connection was idle too long",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for IdleTimeout {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            use bytes::Buf;
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.progress();
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx).map(Err),
        }
    }
}

impl AsyncWrite for IdleTimeout {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx).map(Err),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write_vectored(cx, bufs) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => this.waiting(cx).map(Err),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// hyper's service for one connection, counting the requests whose
/// handler has not answered yet (see [`IdleTimeout`]).
#[derive(Clone)]
pub(crate) struct CountBusy<S> {
    pub inner: S,
    pub busy: Arc<std::sync::atomic::AtomicUsize>,
}

struct BusyMark(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for BusyMark {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, R> hyper::service::Service<R> for CountBusy<S>
where
    S: hyper::service::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: R) -> Self::Future {
        self.busy.fetch_add(1, Ordering::Relaxed);
        let mark = BusyMark(self.busy.clone());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let r = answer.await;
            drop(mark);
            r
        })
    }
}

/// How the server runs: what `image-cache serve`'s flags and glance-api.conf
/// set, as plain values. `Config::default()` is the CLI's defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on; port 0 picks a free one (printed on stdout).
    pub listen: SocketAddr,
    /// Where misses are fetched: a Glance API base URL or a directory with
    /// one file per image id. `None`: misses are 404.
    pub upstream: Option<String>,
    /// Origins a Glance upstream may redirect downloads to.
    pub upstream_allow_redirect: Vec<String>,
    /// The admin token (cache API, driver swap); without one the
    /// management API answers 403.
    pub admin_token: Option<Token>,
    /// A token image downloads must carry (the admin token is accepted too).
    pub image_token: Option<Token>,
    /// The token sent to a Glance upstream by the prefetcher.
    pub upstream_token: Option<Secret>,
    /// Serve every image to anyone, without a token.
    pub public_downloads: bool,
    /// How long the upstream's "may this token download this image" is kept.
    pub auth_cache_ttl: Duration,
    /// Prune target.
    pub max_size: u64,
    /// Stall time for clean.
    pub stall_time: Duration,
    /// An image that would push the cache over this is served, not cached.
    pub cache_ceiling: Option<u64>,
    /// Admission: a fill that would take the cache over `max_size` first
    /// evicts least recently used images, at most this many; if that is
    /// not enough (or the image alone is larger than `max_size`) the image
    /// is served, not cached. 0: fills do not evict (the pruner alone
    /// brings the cache back under `max_size`).
    pub fill_evict_budget: u32,
    /// The token nodes of one fleet send each other: with it, a miss is
    /// read from a sibling that holds the image (the driver's
    /// `get-cached-nodes`) before the upstream, and siblings' requests are
    /// answered from the cache. `None`: no sibling fill.
    pub peer_token: Option<Secret>,
    /// This node's URL as its siblings reach it (Glance's
    /// `worker_self_reference_url`), left out of the holders.
    pub self_url: Option<String>,
    /// URL prefixes of the siblings to ask first (same zone or rack).
    pub prefer_peers: Vec<String>,
    /// How often the prefetcher, the pruner and the cleaner run (0 = never).
    pub prefetch_interval: Duration,
    pub prune_interval: Duration,
    pub clean_interval: Duration,
    /// A client connection idle this long is closed.
    pub client_timeout: Duration,
    /// An upstream that sends nothing for this long fails the fetch.
    pub upstream_timeout: Duration,
    /// Bytes per second a fetch must average over each upstream-timeout
    /// window (0: no minimum).
    pub upstream_min_rate: u64,
    /// Most images fetched from the upstream at once.
    pub max_fetches: usize,
    /// Most client connections at once (`None`: 4096, or fewer when the
    /// open-files limit is lower).
    pub max_connections: Option<usize>,
    /// Free space kept on the cache's file system.
    pub disk_reserve: u64,
    /// How long in-flight work may take to finish on shutdown.
    pub shutdown_timeout: Duration,
    /// Where misses are spooled (unnamed temporary files).
    pub spool_dir: PathBuf,
    /// A swapped-in driver faulting more than this often within
    /// `rollback_window` is rolled back (0: never).
    pub rollback_max_faults: u64,
    pub rollback_window: Duration,
    /// What a download gets while the driver fails: the error
    /// (fail-closed), the upstream's bytes, not cached (fail-open), or a
    /// rollback to the previous driver and a retry (fail-reload).
    pub fail_policy: FailPolicy,
    /// How `POST /v2/cache/driver` turns the name it is given into a
    /// driver (the CLI's resolves `oci://` references through its store);
    /// `None`: a built-in name or a component file's path only.
    pub driver_resolver: Option<DriverResolver>,
}

/// Resolves a driver named in a swap request; it may block (a registry
/// pull), so it runs on a blocking thread. The error is shown to the
/// caller as a 400.
#[derive(Clone)]
pub struct DriverResolver(pub Arc<ResolveDriver>);

/// A driver's name to the driver, or why not.
pub type ResolveDriver = dyn Fn(&str) -> Result<DriverSource, String> + Send + Sync;

impl std::fmt::Debug for DriverResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DriverResolver")
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: DEFAULT_LISTEN.parse().expect("an address"),
            upstream: None,
            upstream_allow_redirect: Vec::new(),
            admin_token: None,
            image_token: None,
            upstream_token: None,
            public_downloads: false,
            auth_cache_ttl: Duration::from_secs(60),
            max_size: 10 << 30,
            stall_time: Duration::from_secs(86_400),
            cache_ceiling: None,
            fill_evict_budget: 100,
            peer_token: None,
            self_url: None,
            prefer_peers: Vec::new(),
            prefetch_interval: Duration::from_secs(300),
            prune_interval: Duration::from_secs(600),
            clean_interval: Duration::from_secs(3_600),
            client_timeout: Duration::from_secs(60),
            upstream_timeout: Duration::from_secs(60),
            upstream_min_rate: 16 << 10,
            max_fetches: 64,
            max_connections: None,
            disk_reserve: 128 << 20,
            shutdown_timeout: Duration::from_secs(30),
            spool_dir: std::env::temp_dir(),
            rollback_max_faults: 5,
            rollback_window: Duration::from_secs(300),
            // A server goes around a failing driver (earlier releases did
            // so always); the library's own default is fail-closed.
            fail_policy: FailPolicy::Open,
            driver_resolver: None,
        }
    }
}

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting cannot be used; the message names it.
    #[error("{0}")]
    Config(String),
    /// The system refused something the server needs (the listening
    /// socket, signal handlers, threads).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The cache failed (its kind is kept for exit codes).
    #[error(transparent)]
    Cache(#[from] image_cache::Error),
}

impl ServeError {
    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ServeError {
        let context = context.into();
        move |source| ServeError::Io { context, source }
    }
}

/// What SIGHUP re-reads: the cache's root (which cannot change while
/// serving), the driver to swap to and the new tunables.
pub struct Reloaded {
    pub root: PathBuf,
    pub driver: DriverSource,
    pub max_size: u64,
    pub stall_time: Duration,
    pub fail_policy: FailPolicy,
}

/// Re-resolves the configuration on SIGHUP.
pub type Reload = Box<dyn Fn() -> Result<Reloaded, ServeError> + Send + Sync>;

/// Run the server on `cache` until SIGTERM or SIGINT; on SIGHUP, `reload`
/// (if given) names the driver and tunables to take.
pub fn run(cache: ImageCache, config: Config, reload: Option<Reload>) -> Result<(), ServeError> {
    let upstream = match &config.upstream {
        Some(spec) if !spec.trim().is_empty() => Some(
            Upstream::parse(
                spec.trim(),
                config.upstream_timeout,
                &config.upstream_allow_redirect,
            )
            .map_err(ServeError::Config)?,
        ),
        _ if !config.upstream_allow_redirect.is_empty() => {
            return Err(ServeError::Config(
                "--upstream-allow-redirect needs an http(s) --upstream".into(),
            ));
        }
        _ => None,
    };
    let tokens = Tokens {
        admin: config.admin_token.clone(),
        image: config.image_token.clone(),
    };
    let access = access::Mode::choose(
        upstream.as_ref(),
        tokens.image.is_some(),
        config.public_downloads,
    )
    .map_err(ServeError::Config)?;
    let mut upstream = upstream;
    if let Some(u) = upstream.as_mut() {
        u.require_records(access == access::Mode::Glance);
    }
    if config.max_fetches == 0 {
        return Err(ServeError::Config(
            "--max-fetches must be at least 1".into(),
        ));
    }
    if config.max_connections == Some(0) {
        return Err(ServeError::Config(
            "--max-connections must be at least 1".into(),
        ));
    }
    let upstream_token = config
        .upstream_token
        .as_ref()
        .map(|t| t.expose().to_string());
    fill::spool_dir_usable(&config.spool_dir).map_err(ServeError::Config)?;
    for (name, d) in [
        ("--client-timeout", config.client_timeout),
        ("--upstream-timeout", config.upstream_timeout),
    ] {
        if d.is_zero() {
            return Err(ServeError::Config(format!("{name} must be more than 0")));
        }
    }
    let cache = Arc::new(cache);
    if config.rollback_max_faults > 0 {
        cache.set_rollback_policy(Some(image_cache::RollbackPolicy {
            max_faults: config.rollback_max_faults,
            window: config.rollback_window,
        }));
    }
    cache.set_fail_policy(config.fail_policy);
    let siblings = match &config.peer_token {
        Some(token) => Some(
            siblings::Siblings::new(
                token.clone(),
                config.self_url.clone(),
                config.prefer_peers.clone(),
                config.upstream_timeout,
            )
            .map_err(ServeError::Config)?,
        ),
        None => None,
    };
    let metrics = Arc::new(Metrics::default());
    let app = Arc::new(App {
        hits: Arc::new(hits::Hits::new(cache.clone(), metrics.clone())),
        metrics,
        cache,
        upstream,
        upstream_token,
        access,
        decisions: access::Decisions::new(config.auth_cache_ttl),
        flights: fill::Flights::new(config.max_fetches),
        limits: FillLimits {
            min_rate: config.upstream_min_rate,
            rate_window: config.upstream_timeout,
            disk_reserve: config.disk_reserve,
        },
        checksums: Default::default(),
        tokens,
        tunables: RwLock::new(Tunables {
            max_size: config.max_size,
            stall_time: config.stall_time,
        }),
        intervals: Intervals {
            prefetch: config.prefetch_interval,
            prune: config.prune_interval,
            clean: config.clean_interval,
        },
        ceiling: config.cache_ceiling,
        admission: fill::Admission::new(config.fill_evict_budget),
        siblings,
        self_url: config
            .self_url
            .as_ref()
            .map(|u| u.trim_end_matches('/').to_string()),
        warmings: warm::Warmings::new(),
        samples: Default::default(),
        spool_dir: config.spool_dir.clone(),
        maintenance: AsyncMutex::new(()),
        prefetching: AsyncMutex::new(()),
        prefetch_backoff: Default::default(),
        swap_lock: AsyncMutex::new(()),
        driver_resolver: config.driver_resolver.clone(),
        prefetch_now: Notify::new(),
        stopping: AtomicBool::new(false),
        abort_fetches: AtomicBool::new(false),
        abort_now: Notify::new(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("image-cache-serve")
        .build()
        .map_err(ServeError::io("starting the async runtime"))?;
    runtime.block_on(async move {
        let listen = config.listen;
        let max_connections = config
            .max_connections
            .unwrap_or_else(default_max_connections);
        let listener = listen_on(listen, max_connections)
            .map_err(ServeError::io(format!("cannot listen on {listen}")))?;
        let local = listener
            .local_addr()
            .map_err(ServeError::io("listening socket"))?;
        serve(app, listener, local, max_connections, &config, reload).await
    })?;
    // Blocking tasks still running (a driver call past the grace period)
    // are not waited for forever.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

async fn serve(
    app: Arc<App>,
    listener: TcpListener,
    local: SocketAddr,
    max_connections: usize,
    args: &Config,
    reload: Option<Reload>,
) -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k: SignalKind| signal(k).map_err(ServeError::io("installing a signal handler"));
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sighup = sig(SignalKind::hangup())?;

    if app.tokens.admin.is_none() {
        warn!(
            "no admin token (--admin-token-file or IMAGE_CACHE_ADMIN_TOKEN): the cache management API answers 403"
        );
    }
    info!(
        listen = %local,
        root = %app.cache.root().display(),
        driver = app.cache.driver().name(),
        upstream = app.upstream.as_ref().map(|u| u.describe()).unwrap_or_else(|| "none".into()),
        downloads = app.access.name(),
        max_fetches = app.flights.max(),
        max_connections,
        fail_policy = app.cache.fail_policy().as_str(),
        "serving"
    );
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "image-cache serve: listening on http://{local}");
        let _ = out.flush();
    }

    let recorder = app
        .hits
        .spawn()
        .map_err(ServeError::io("starting the hit recorder"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    background::spawn(&app, stop_rx.clone());
    status::spawn_sampler(&app, stop_rx.clone());

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(args.client_timeout)
        .max_buf_size(MAX_HEAD_BYTES.max(8192))
        .max_headers(MAX_HEADERS)
        .writev(true);
    let front = Arc::new(sendfile::Front {
        app: app.clone(),
        router: router(app.clone()),
        http,
        client_timeout: args.client_timeout,
    });
    let connections = Arc::new(tokio::sync::Semaphore::new(max_connections));
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, retry.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let Ok(slot) = connections.clone().try_acquire_owned() else {
                    inc(&app.metrics.connections_refused);
                    tokio::spawn(refuse_connection(stream));
                    continue;
                };
                let connection = sendfile::connection(
                    front.clone(),
                    stream,
                    peer,
                    graceful.watcher(),
                    stop_rx.clone(),
                );
                tokio::spawn(async move {
                    connection.await;
                    drop(slot);
                });
            }
            _ = sighup.recv() => {
                match &reload {
                    Some(reload) => reload_settings(&app, reload.as_ref()).await,
                    None => info!("SIGHUP: nothing to reload"),
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
        }
    }
    drop(listener);
    app.stopping.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + args.shutdown_timeout;
    tokio::select! {
        _ = graceful.shutdown() => info!("all connections finished"),
        _ = tokio::time::sleep_until(deadline) => {
            warn!("shutdown grace period over: cutting the remaining connections");
        }
    }
    // Fetches run on without clients (the prefetcher's, or ones whose
    // clients left); give them the rest of the grace period, then make
    // them abort so no half-written image is left behind.
    while app.flights.active() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if app.flights.active() > 0 {
        warn!(
            fetches = app.flights.active(),
            "aborting unfinished fetches"
        );
        app.abort_fetches.store(true, Ordering::Relaxed);
        app.abort_now.notify_waiters();
        let hard = tokio::time::Instant::now() + Duration::from_secs(10);
        while app.flights.active() > 0 && tokio::time::Instant::now() < hard {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Every hit counted goes to the driver before the process ends.
    app.hits.stop();
    let _ = tokio::task::spawn_blocking(move || recorder.join()).await;
    info!("stopped");
    Ok(())
}

/// The listening socket, with an accept queue as deep as the connection
/// cap (the kernel caps it at `net.core.somaxconn`). The default queue of
/// 128 overflows when a burst of clients connects at once; the kernel then
/// answers with SYN cookies and resets some of them before the server sees
/// them at all, instead of the 503 the cap promises.
fn listen_on(addr: SocketAddr, backlog: usize) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog.min(u32::MAX as usize) as u32)
}

/// Most connections by default: 4096, fewer when the open-files limit
/// would be reached first (each connection holds a socket, a download an
/// image file or a spool too).
fn default_max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct it is given.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    };
    (soft.saturating_sub(128) / 2).clamp(16, 4096) as usize
}

/// A connection past --max-connections: a 503 and close, without reading
/// the request.
async fn refuse_connection(stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let mut stream = stream;
    let body = br#"{"error":{"code":503,"title":"Service Unavailable","message":"too many connections; try again"}}"#;
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await?;
        // Read what the client sent until it closes: closing with its
        // request unread would reset the connection and lose the answer.
        use tokio::io::AsyncReadExt;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    })
    .await;
}

/// SIGHUP: re-read flags/environment/config file; swap to the driver they
/// name (a new component at the same path is picked up too) and take the
/// new max size and stall time (unless given as flags).
async fn reload_settings(
    app: &Arc<App>,
    reload: &(dyn Fn() -> Result<Reloaded, ServeError> + Send + Sync),
) {
    // The reload may block (a driver pulled from a registry): off the
    // event loop's worker while it runs.
    let settings = match tokio::task::block_in_place(reload) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "SIGHUP: the configuration cannot be used; nothing changed");
            return;
        }
    };
    if settings.root != app.cache.root() {
        warn!("SIGHUP: the cache directory cannot change while serving; restart for that");
    }
    {
        let mut t = app.tunables.write().unwrap();
        t.max_size = settings.max_size;
        t.stall_time = settings.stall_time;
        app.cache.set_fail_policy(settings.fail_policy);
        info!(
            max_size = t.max_size,
            stall_seconds = t.stall_time.as_secs(),
            fail_policy = settings.fail_policy.as_str(),
            "SIGHUP: settings reloaded"
        );
    }
    if let Err(e) = swap(app, settings.driver).await {
        warn!(error = %e.message, "SIGHUP: driver swap failed");
    }
}
