//! `image-cache serve`: the cache as an HTTP service in front of an image
//! store (Glance's `GET /v2/images/{id}/file` with its local cache, and
//! Glance's cache management API), with the periodic jobs built in.
//!
//! | module | does |
//! | --- | --- |
//! | `mod` (here) | settings, router, listener, signals, shutdown, swap |
//! | [`sendfile`] | each connection's front: cached downloads over `sendfile(2)` |
//! | [`images`] | image downloads: cached files, ranges, misses |
//! | [`image_records`] | Glance's image records (`GET /v2/images[/{id}]`) |
//! | [`access`] | who may download which image (Glance, token, public) |
//! | [`fill`] | single-flight fills: spooled, verified, then cached |
//! | [`upstream`] | the image store: Glance or a directory, confined |
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
mod upstream;

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
use clap::Args;
use hyper_util::rt::TokioTimer;
use image_cache::config::{parse_duration, parse_size};
use image_cache::{DriverSource, Error, ImageCache};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio::time::Sleep;
use tracing::{debug, error, info, warn};

use crate::cli::{Failure, Settings};
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

/// Serve the cache over HTTP: image downloads with pull-through caching
/// from an upstream (a Glance API or a directory), Glance's cache
/// management API, and the prefetcher, pruner and cleaner on intervals.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Tokens: the admin token (cache API, driver swap) comes from \
--admin-token-file or IMAGE_CACHE_ADMIN_TOKEN; without one the management API answers 403. \
Clients send tokens as X-Auth-Token.\n\n\
The --config file's [DEFAULT] section may also give bind_host, bind_port and \
cache_prefetcher_interval (glance-api.conf names). SIGHUP re-reads the configuration \
and swaps the driver; SIGTERM stops gracefully."
)]
pub struct ServeArgs {
    /// Address to listen on (default 127.0.0.1:9292, or bind_host:bind_port
    /// from the --config file). Port 0 picks a free port; the address is
    /// printed on stdout.
    #[arg(long, env = "IMAGE_CACHE_LISTEN", value_name = "ADDR")]
    listen: Option<SocketAddr>,

    /// Where misses are fetched: a Glance API base URL (GET
    /// URL/v2/images/ID/file, passing the client's X-Auth-Token) or a
    /// directory with one file per image id. Without it, misses are 404.
    #[arg(long, env = "IMAGE_CACHE_UPSTREAM", value_name = "URL|DIR")]
    upstream: Option<String>,

    /// File holding the admin token (else IMAGE_CACHE_ADMIN_TOKEN).
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,

    /// File holding a token image downloads must carry (the admin token is
    /// accepted too); else IMAGE_CACHE_IMAGE_TOKEN. Unset, with a Glance
    /// upstream: the upstream authorizes each download with the client's
    /// token.
    #[arg(long, value_name = "FILE")]
    image_token_file: Option<PathBuf>,

    /// Serve every image to anyone, without a token (needed, or
    /// --image-token-file, when the upstream is a directory or there is
    /// none).
    #[arg(long)]
    public_downloads: bool,

    /// How long the upstream's answer to "may this token download this
    /// image" is remembered (0: ask for every download).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    auth_cache_ttl: Duration,

    /// File holding the token sent to a Glance upstream by the prefetcher,
    /// and for clients when downloads are protected by --image-token-file
    /// (else IMAGE_CACHE_UPSTREAM_TOKEN).
    #[arg(long, value_name = "FILE")]
    upstream_token_file: Option<PathBuf>,

    /// Prune target (default: image_cache_max_size, or 10 GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    max_size: Option<u64>,

    /// Stall time for clean (default: image_cache_stall_time, or 1 day).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stall_time: Option<Duration>,

    /// Hard ceiling: an image that would push the cache over it is served
    /// but not cached. Default: none.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_ceiling: Option<u64>,

    /// How often the prefetcher runs (0 = never; default
    /// cache_prefetcher_interval, or 300s). Queuing an image through the
    /// API also wakes it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    prefetch_interval: Option<Duration>,

    /// How often the cache is pruned to the max size (0 = never).
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = parse_duration)]
    prune_interval: Duration,

    /// How often invalid and stalled files are cleaned (0 = never).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    clean_interval: Duration,

    /// A client connection with no byte read or written for this long is
    /// closed (also the keep-alive and request-head timeout).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    client_timeout: Duration,

    /// An upstream that sends nothing for this long fails the fetch.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    upstream_timeout: Duration,

    /// A fetch must average at least this many bytes per second over each
    /// --upstream-timeout window, or it fails (0: no minimum).
    #[arg(long, value_name = "SIZE", default_value = "16KiB", value_parser = parse_size)]
    upstream_min_rate: u64,

    /// An origin (scheme://host[:port]) the Glance upstream may redirect
    /// downloads to; the token is never sent there. Repeatable. Redirects
    /// to any other origin fail the fetch.
    #[arg(long, value_name = "URL")]
    upstream_allow_redirect: Vec<String>,

    /// Most images fetched from the upstream at once; a miss past it is a
    /// 503 with Retry-After (clients of fetches under way still join them).
    #[arg(long, value_name = "N", default_value = "64")]
    max_fetches: usize,

    /// Most client connections at once; past it a new connection gets a
    /// 503 and is closed. Default: 4096, or less when the open-files
    /// limit is lower.
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,

    /// Free space kept on the cache's file system: an image that would
    /// leave less is served but not cached (room for the database).
    #[arg(long, value_name = "SIZE", default_value = "128MiB", value_parser = parse_size)]
    disk_reserve: u64,

    /// On SIGTERM, how long in-flight responses and fetches may take to
    /// finish before they are cut (fetches then abort: no partial image).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,

    /// Directory for the spool files misses are streamed through (unnamed
    /// temporary files). Default: the system's temporary directory.
    #[arg(long, value_name = "DIR")]
    spool_dir: Option<PathBuf>,

    /// Logs as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,

    /// A driver swapped in that faults more than this many times within
    /// --rollback-window of the swap is rolled back to the previous driver
    /// by itself (0: never).
    #[arg(
        long,
        env = "IMAGE_CACHE_ROLLBACK_MAX_FAULTS",
        value_name = "N",
        default_value = "5"
    )]
    rollback_max_faults: u64,

    /// How long after a swap faults count towards an automatic rollback.
    #[arg(long, env = "IMAGE_CACHE_ROLLBACK_WINDOW", value_name = "DURATION", default_value = "5m", value_parser = parse_duration)]
    rollback_window: Duration,
}

impl ServeArgs {
    pub fn log_json(&self) -> bool {
        self.log_json
    }
}

/// An error answer: status and a JSON body `{"error": {...}}`. Messages
/// name images by id, never a file path.
#[derive(Debug)]
pub struct ApiError {
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

/// The image id rule (the `image-id` crate's, as everywhere), checked
/// before anything reaches the driver or the upstream.
pub fn validate_id(id: &str) -> Result<(), ApiError> {
    match image_cache::validate_image_id(id) {
        Ok(()) => Ok(()),
        Err(e) => Err(ApiError::new(StatusCode::BAD_REQUEST, e.to_string())),
    }
}

/// The `{id}` path segment, with a JSON 400 (not axum's text) when it
/// cannot be decoded.
pub struct RawId(pub String);

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
pub struct Tokens {
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
pub struct FillLimits {
    /// Bytes per second a fetch must average over each window.
    pub min_rate: u64,
    pub rate_window: Duration,
    /// Free bytes kept on the cache's file system.
    pub disk_reserve: u64,
}

/// What SIGHUP may change.
#[derive(Clone, Copy, Debug)]
pub struct Tunables {
    pub max_size: u64,
    pub stall_time: Duration,
}

#[derive(Clone, Copy, Debug)]
pub struct Intervals {
    pub prefetch: Duration,
    pub prune: Duration,
    pub clean: Duration,
}

/// Everything a request handler reaches.
pub struct App {
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
    pub spool_dir: PathBuf,
    /// Prune and clean: one at a time on the root.
    pub maintenance: AsyncMutex<()>,
    /// One prefetch run at a time (it takes no maintenance lock).
    pub prefetching: AsyncMutex<()>,
    pub prefetch_backoff: background::Backoff,
    /// One swap at a time.
    pub swap_lock: AsyncMutex<()>,
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

    /// Log a failed driver call that the server works around.
    pub fn note_driver_error(&self, e: &Error, call: &str) {
        if matches!(e, Error::DriverFault { .. }) {
            inc(&self.metrics.driver_errors);
        }
        warn!(call, kind = e.kind(), error = %e, "cache call failed");
    }

    /// A library error as an answer: client mistakes keep their meaning,
    /// everything else is a 500 with the detail in the log.
    pub fn library_error(&self, e: Error, call: &str) -> ApiError {
        match e {
            Error::InvalidImageId(_) => ApiError::bad_id("the driver rejected it"),
            Error::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, "not found in the cache"),
            Error::AlreadyCached(_) => ApiError::new(StatusCode::CONFLICT, "already cached"),
            Error::BeingCached(_) => ApiError::new(StatusCode::CONFLICT, "being cached now"),
            // A full disk is the operator's to fix, and says so.
            Error::Io {
                code: image_cache::error::IoCode::NoSpace,
                ..
            } => {
                self.note_driver_error(&e, call);
                ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "the cache's disk is full; see the server log",
                )
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

/// A driver named by an operator or the swap endpoint.
pub fn driver_source(spec: &str) -> Result<DriverSource, String> {
    DriverSource::named(spec)
}

/// Swap the driver while serving; the old one stays if the new one
/// cannot be used.
pub async fn swap(app: &Arc<App>, source: DriverSource) -> Result<String, ApiError> {
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
/// served, by their seals, and misses go to the upstream); 503
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
            axum::Json(json!({
                "status": "degraded",
                "driver": driver,
                "error": e.kind(),
                "serving": "cached images (without their checksums) and misses; no hits are recorded",
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
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(&app.cache, &driver),
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

pub fn router(app: Arc<App>) -> Router {
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

/// A token from a file or, failing that, an environment variable.
fn load_token(file: Option<&PathBuf>, env: &str) -> Result<Option<auth::Token>, Failure> {
    if let Some(path) = file {
        return auth::Token::from_file(path)
            .map(Some)
            .map_err(Failure::Usage);
    }
    match std::env::var(env) {
        Ok(v) => auth::Token::new(&v)
            .map(Some)
            .map_err(|e| Failure::Usage(format!("{env}: {e}"))),
        Err(_) => Ok(None),
    }
}

fn load_secret(file: Option<&PathBuf>, env: &str) -> Result<Option<String>, Failure> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("token file {}: {e}", path.display())))?;
        let t = text.trim().to_string();
        if t.is_empty() {
            return Err(Failure::Usage(format!(
                "token file {}: empty",
                path.display()
            )));
        }
        return Ok(Some(t));
    }
    Ok(std::env::var(env)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty()))
}

/// glance-api.conf keys the server reads from the `--config` file.
#[derive(Default)]
struct ServerOptions {
    bind_host: Option<String>,
    bind_port: Option<u16>,
    prefetch_interval: Option<Duration>,
}

fn server_options(settings: &Settings) -> Result<ServerOptions, Failure> {
    let Some(path) = settings.config_file() else {
        return Ok(ServerOptions::default());
    };
    let ini = ini::Ini::load_from_file_noescape(path)
        .map_err(|e| Failure::Usage(format!("config file {}: {e}", path.display())))?;
    let mut o = ServerOptions::default();
    let Some(section) = ini.section(Some("DEFAULT")) else {
        return Ok(o);
    };
    let bad = |key: &str, value: &str, e: String| {
        Failure::Usage(format!(
            "config file {}: [DEFAULT] {key} = {value:?}: {e}",
            path.display()
        ))
    };
    for (key, value) in section.iter() {
        let value = value.trim();
        match key.trim() {
            "bind_host" => o.bind_host = Some(value.to_string()),
            "bind_port" => {
                o.bind_port = Some(
                    value
                        .parse()
                        .map_err(|_| bad(key, value, "not a port number".into()))?,
                )
            }
            "cache_prefetcher_interval" => {
                o.prefetch_interval = Some(parse_duration(value).map_err(|e| bad(key, value, e))?)
            }
            _ => {}
        }
    }
    Ok(o)
}

/// Run the server until SIGTERM or SIGINT. `reload` re-resolves the
/// settings (flags, environment, config file) for SIGHUP.
pub fn run(
    settings: &Settings,
    args: &ServeArgs,
    reload: Box<dyn Fn() -> Result<Settings, Failure> + Send + Sync>,
) -> Result<(), Failure> {
    let options = server_options(settings)?;
    let listen = match args.listen {
        Some(a) => a,
        None => {
            let host = options.bind_host.as_deref().unwrap_or("127.0.0.1");
            let port = options.bind_port.unwrap_or(9292);
            let text = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            text.parse().map_err(|_| {
                Failure::Usage(format!(
                    "bind_host/bind_port {text:?} is not an address (default {DEFAULT_LISTEN})"
                ))
            })?
        }
    };
    let upstream = match &args.upstream {
        Some(spec) if !spec.trim().is_empty() => Some(
            Upstream::parse(
                spec.trim(),
                args.upstream_timeout,
                &args.upstream_allow_redirect,
            )
            .map_err(Failure::Usage)?,
        ),
        _ if !args.upstream_allow_redirect.is_empty() => {
            return Err(Failure::Usage(
                "--upstream-allow-redirect needs an http(s) --upstream".into(),
            ));
        }
        _ => None,
    };
    let tokens = Tokens {
        admin: load_token(args.admin_token_file.as_ref(), "IMAGE_CACHE_ADMIN_TOKEN")?,
        image: load_token(args.image_token_file.as_ref(), "IMAGE_CACHE_IMAGE_TOKEN")?,
    };
    let access = access::Mode::choose(
        upstream.as_ref(),
        tokens.image.is_some(),
        args.public_downloads,
    )
    .map_err(Failure::Usage)?;
    let mut upstream = upstream;
    if let Some(u) = upstream.as_mut() {
        u.require_records(access == access::Mode::Glance);
    }
    if args.max_fetches == 0 {
        return Err(Failure::Usage("--max-fetches must be at least 1".into()));
    }
    if args.max_connections == Some(0) {
        return Err(Failure::Usage(
            "--max-connections must be at least 1".into(),
        ));
    }
    let upstream_token = load_secret(
        args.upstream_token_file.as_ref(),
        "IMAGE_CACHE_UPSTREAM_TOKEN",
    )?;
    let spool_dir = args.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
    fill::spool_dir_usable(&spool_dir).map_err(Failure::Usage)?;
    for (name, d) in [
        ("--client-timeout", args.client_timeout),
        ("--upstream-timeout", args.upstream_timeout),
    ] {
        if d.is_zero() {
            return Err(Failure::Usage(format!("{name} must be more than 0")));
        }
    }
    let cache = Arc::new(settings.open_for_server()?);
    if args.rollback_max_faults > 0 {
        cache.set_rollback_policy(Some(image_cache::RollbackPolicy {
            max_faults: args.rollback_max_faults,
            window: args.rollback_window,
        }));
    }
    let metrics = Arc::new(Metrics::default());
    let app = Arc::new(App {
        hits: Arc::new(hits::Hits::new(cache.clone(), metrics.clone())),
        metrics,
        cache,
        upstream,
        upstream_token,
        access,
        decisions: access::Decisions::new(args.auth_cache_ttl),
        flights: fill::Flights::new(args.max_fetches),
        limits: FillLimits {
            min_rate: args.upstream_min_rate,
            rate_window: args.upstream_timeout,
            disk_reserve: args.disk_reserve,
        },
        checksums: Default::default(),
        tokens,
        tunables: RwLock::new(Tunables {
            max_size: args.max_size.unwrap_or(settings.max_size),
            stall_time: args.stall_time.unwrap_or(settings.stall_time),
        }),
        intervals: Intervals {
            prefetch: args
                .prefetch_interval
                .or(options.prefetch_interval)
                .unwrap_or(Duration::from_secs(300)),
            prune: args.prune_interval,
            clean: args.clean_interval,
        },
        ceiling: args.cache_ceiling,
        spool_dir,
        maintenance: AsyncMutex::new(()),
        prefetching: AsyncMutex::new(()),
        prefetch_backoff: Default::default(),
        swap_lock: AsyncMutex::new(()),
        prefetch_now: Notify::new(),
        stopping: AtomicBool::new(false),
        abort_fetches: AtomicBool::new(false),
        abort_now: Notify::new(),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("image-cache-serve")
        .build()
        .map_err(|e| Failure::op("io", format!("starting the async runtime: {e}")))?;
    let args = args.clone();
    let fixed = (args.max_size, args.stall_time);
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| Failure::op("io", format!("cannot listen on {listen}: {e}")))?;
        let local = listener
            .local_addr()
            .map_err(|e| Failure::op("io", format!("listening socket: {e}")))?;
        serve(app, listener, local, &args, reload, fixed).await
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
    args: &ServeArgs,
    reload: Box<dyn Fn() -> Result<Settings, Failure> + Send + Sync>,
    fixed: (Option<u64>, Option<Duration>),
) -> Result<(), Failure> {
    use tokio::signal::unix::{SignalKind, signal};
    let sig = |k: SignalKind| {
        signal(k).map_err(|e| Failure::op("io", format!("installing a signal handler: {e}")))
    };
    let mut sigterm = sig(SignalKind::terminate())?;
    let mut sigint = sig(SignalKind::interrupt())?;
    let mut sighup = sig(SignalKind::hangup())?;

    if app.tokens.admin.is_none() {
        warn!(
            "no admin token (--admin-token-file or IMAGE_CACHE_ADMIN_TOKEN): the cache management API answers 403"
        );
    }
    let max_connections = args.max_connections.unwrap_or_else(default_max_connections);
    info!(
        listen = %local,
        root = %app.cache.root().display(),
        driver = app.cache.driver().name(),
        upstream = app.upstream.as_ref().map(|u| u.describe()).unwrap_or_else(|| "none".into()),
        downloads = app.access.name(),
        max_fetches = app.flights.max(),
        max_connections,
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
        .map_err(|e| Failure::op("io", format!("starting the hit recorder: {e}")))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    background::spawn(&app, stop_rx.clone());

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
                reload_settings(&app, &reload, fixed).await;
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
    reload: &(dyn Fn() -> Result<Settings, Failure> + Send + Sync),
    fixed: (Option<u64>, Option<Duration>),
) {
    let settings = match reload() {
        Ok(s) => s,
        Err(e) => {
            warn!(error = ?e, "SIGHUP: the configuration cannot be used; nothing changed");
            return;
        }
    };
    if settings.dir.as_deref() != Some(app.cache.root()) {
        warn!("SIGHUP: the cache directory cannot change while serving; restart for that");
    }
    {
        let mut t = app.tunables.write().unwrap();
        t.max_size = fixed.0.unwrap_or(settings.max_size);
        t.stall_time = fixed.1.unwrap_or(settings.stall_time);
        info!(
            max_size = t.max_size,
            stall_seconds = t.stall_time.as_secs(),
            "SIGHUP: settings reloaded"
        );
    }
    match driver_source(&settings.driver) {
        Ok(source) => {
            if let Err(e) = swap(app, source).await {
                warn!(error = %e.message, "SIGHUP: driver swap failed");
            }
        }
        Err(e) => warn!(error = %e, "SIGHUP: driver not swapped"),
    }
}
