//! Image downloads over `sendfile(2)`: the front of every connection.
//!
//! hyper writes a body from buffers in user space, so an image served
//! through it is read into memory and copied out again. The front reads
//! each request head itself (`httparse`, the parser hyper uses); when it
//! is a plain HTTP/1.1 `GET /v2/images/{id}/file`, it answers it: a cached
//! image's pages go from the page cache to the socket with `sendfile`,
//! and a miss joins (or starts) the image's fetch and sends the spool's
//! bytes the same way as they arrive. It then keeps the connection for
//! the next request. Anything else (other paths and methods, `HEAD`,
//! HTTP/1.0, percent-encoded ids, a missing or refused token, no upstream,
//! an unsatisfiable range, a malformed or oversized head) goes to hyper
//! and the router with the bytes read so far, and hyper keeps the
//! connection from then on.
//!
//! What holds on this path as on hyper's: the token check, id
//! validation, one `open-for-read` per download (its hit batched), the
//! hit counted only when every byte went to the socket, the fetch shared
//! by every client and never stopped by one leaving, a failed fetch
//! cutting the response short, the client timeout on reads and writes,
//! graceful shutdown (an idle connection is closed, a download in
//! progress completes), the metrics and the request log.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use image_cache::Error;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::fill::Outcome;
use super::images;
use super::metrics::{InFlight, add, inc};
use super::{ApiError, App, IdleTimeout, MAX_HEAD_BYTES, MAX_HEADERS, validate_id};

/// What every connection needs from the server.
pub struct Front {
    pub app: Arc<App>,
    pub router: Router,
    pub http: hyper::server::conn::http1::Builder,
    pub client_timeout: Duration,
}

/// Serve one connection: downloads of cached images here, the rest by
/// hyper.
pub async fn connection(
    front: Arc<Front>,
    stream: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    mut stop: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        // Read until a whole request head is in `buf`, within the client
        // timeout for the whole head (a client dripping bytes cannot hold
        // the connection longer).
        let deadline = tokio::time::Instant::now() + front.client_timeout;
        let head = loop {
            if !buf.is_empty() {
                match parse(&buf) {
                    Parsed::Ours(head) => break Some(head),
                    Parsed::Partial if buf.len() < MAX_HEAD_BYTES => {}
                    // Too large: hyper answers it.
                    Parsed::Partial | Parsed::NotOurs => break None,
                }
            }
            if *stop.borrow() && buf.is_empty() {
                return;
            }
            let read = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.readable()) => r,
                _ = stop.changed(), if buf.is_empty() => return,
            };
            match read {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return,
            }
            buf.reserve(4096);
            match stream.try_read_buf(&mut buf) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        };
        let Some(head) = head else {
            return hand_over(&front, stream, buf, peer, watcher).await;
        };
        let opened = open_hit(&front.app, &head).await;
        if let Opened::NotOurs = opened {
            return hand_over(&front, stream, buf, peer, watcher).await;
        }
        buf.advance(head.len);
        let close = head.close || front.app.shutting_down();
        let app = &front.app;
        inc(&app.metrics.requests);
        let _in_flight = InFlight::new(&app.metrics);
        let started = Instant::now();
        let (status, result) = match opened {
            Opened::Hit(hit) => send(&front, &stream, hit, close).await,
            Opened::Miss(token) => miss(&front, &stream, &head, token, close).await,
            Opened::NotModified(checksum) => not_modified(&front, &stream, &checksum, close).await,
            Opened::NotOurs => unreachable!("handed over above"),
        };
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match &result {
            Ok(()) if status >= 500 => {
                warn!(method = "GET", path = %head.path, status, ms, "request")
            }
            Ok(()) => {
                debug!(method = "GET", path = %head.path, status, ms, sendfile = true, "request")
            }
            Err(e) => {
                debug!(path = %head.path, status, error = %e, ms, "download over sendfile ended early")
            }
        }
        if result.is_err() || close {
            return;
        }
    }
}

/// A request head the front may answer.
struct Head {
    /// Bytes of the head in the buffer.
    len: usize,
    id: String,
    path: String,
    headers: HeaderMap,
    range: Option<String>,
    if_none_match: Option<String>,
    close: bool,
}

enum Parsed {
    /// A whole head of a download the front may answer.
    Ours(Box<Head>),
    /// Not yet a whole head.
    Partial,
    /// Anything else, malformed heads included: hyper's.
    NotOurs,
}

fn parse(buf: &[u8]) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::NotOurs,
    };
    if req.method != Some("GET") || req.version != Some(1) {
        return Parsed::NotOurs;
    }
    let Some(path) = req.path else {
        return Parsed::NotOurs;
    };
    let bare = path.split_once('?').map_or(path, |(p, _)| p);
    let Some(id) = bare
        .strip_prefix("/v2/images/")
        .and_then(|rest| rest.strip_suffix("/file"))
    else {
        return Parsed::NotOurs;
    };
    if id.contains('%') || id.contains('/') {
        return Parsed::NotOurs;
    }
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut close = false;
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::NotOurs;
        };
        match name.as_str() {
            // A request with a body, or one that asks for something other
            // than a plain response, is hyper's.
            "content-length" if h.value != b"0" => return Parsed::NotOurs,
            "transfer-encoding" | "expect" | "upgrade" => return Parsed::NotOurs,
            "connection" => {
                close |= value
                    .to_str()
                    .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
            }
            _ => {}
        }
        headers.append(name, value);
    }
    let range = images::header_text(&headers, axum::http::header::RANGE);
    let if_none_match = images::header_text(&headers, axum::http::header::IF_NONE_MATCH);
    Parsed::Ours(Box::new(Head {
        len,
        id: id.to_string(),
        path: bare.to_string(),
        headers,
        range,
        if_none_match,
        close,
    }))
}

/// An open cached image and the answer's head.
struct Hit {
    id: String,
    file: std::fs::File,
    start: u64,
    end: u64,
    status: u16,
    headers: HeaderMap,
}

/// What the front makes of a request for it.
enum Opened {
    /// Cached: send it.
    Hit(Box<Hit>),
    /// Cached, and the client has it (`If-None-Match`): 304, with the tag.
    NotModified(String),
    /// Not cached, and there is an upstream: fetch it with this token.
    Miss(Option<String>),
    /// Anything else (a refused token, a bad id, no upstream, an
    /// unsatisfiable range): hyper answers it.
    NotOurs,
}

/// Open the image for a download the front answers.
async fn open_hit(app: &Arc<App>, head: &Head) -> Opened {
    if validate_id(&head.id).is_err() {
        return Opened::NotOurs;
    }
    // Refused (or the upstream cannot say): hyper's path answers, from
    // the decision remembered here.
    // A sibling's request (the peer token) is answered from the cache
    // only: a miss goes to hyper's path, which says 404.
    let peer = app
        .siblings
        .as_ref()
        .is_some_and(|s| s.is_peer(&head.headers));
    let grant = match peer {
        true => {
            super::metrics::inc(&app.metrics.peer_requests);
            super::access::Grant {
                upstream_token: None,
            }
        }
        false => match super::access::authorize(app, &head.headers, &head.id).await {
            Ok(grant) => grant,
            Err(_) => return Opened::NotOurs,
        },
    };
    // The driver call runs here, on the event loop, as nginx's `open`
    // does, when it need not wait (no lock held elsewhere, no database
    // round trip) and within a short deadline; else here too, but with
    // tokio moving this worker's other tasks to another thread meanwhile.
    let opened = match app
        .cache
        .without_waiting(|| images::open_cached(app, &head.id, head.range.clone()))
    {
        Some(opened) => opened,
        None => {
            inc(&app.metrics.hit_opens_deferred);
            let range = head.range.clone();
            tokio::task::block_in_place(|| images::open_cached(app, &head.id, range))
        }
    };
    let opened = match opened {
        Ok(o) => o,
        Err(Error::NotFound(_)) if app.upstream.is_some() && !peer => {
            return Opened::Miss(grant.upstream_token);
        }
        Err(Error::NotFound(_)) => return Opened::NotOurs,
        Err(e) => {
            // hyper's path asks again, and falls back to the upstream.
            app.note_driver_error(&e, "open-for-read");
            return Opened::NotOurs;
        }
    };
    if let Some(c) = opened.checksum.as_deref()
        && images::not_modified(head.if_none_match.as_deref(), Some(c))
    {
        // No body, no hit.
        return Opened::NotModified(c.to_string());
    }
    let Some((start, end)) = opened.range.span(opened.size) else {
        return Opened::NotOurs;
    };
    let status = opened.range.status().as_u16();
    let headers = images::hit_headers(&opened);
    Opened::Hit(Box::new(Hit {
        id: opened.id,
        file: opened.file,
        start,
        end,
        status,
        headers,
    }))
}

/// The response head: status line, `headers`, `Date`, and `Connection:
/// close` when the connection ends after it.
fn response_head(status: u16, headers: &HeaderMap, close: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(format!("HTTP/1.1 {status} {reason}\r\n").as_bytes());
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"date: ");
    out.extend_from_slice(httpdate::fmt_http_date(std::time::SystemTime::now()).as_bytes());
    out.extend_from_slice(b"\r\n");
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// A miss: join or start the image's fetch, and send the spool's bytes
/// with `sendfile` as they arrive (chunked when the upstream gave no
/// size). A fetch that fails cuts the response (the client sees a short
/// body, never a complete-looking one).
async fn miss(
    front: &Front,
    stream: &TcpStream,
    head: &Head,
    token: Option<String>,
    close: bool,
) -> (u16, io::Result<()>) {
    let app = &front.app;
    inc(&app.metrics.misses);
    let (flight, start) = match images::start_miss(app, &head.id, token, false).await {
        Ok(images::Miss::Fetching(flight, start)) => (flight, start),
        Ok(images::Miss::AlreadyCached) => {
            return match open_hit(app, head).await {
                Opened::Hit(hit) => send(front, stream, hit, close).await,
                Opened::NotModified(checksum) => {
                    not_modified(front, stream, &checksum, close).await
                }
                _ => error(front, stream, images::not_cached(&head.id), close).await,
            };
        }
        Err(e) => return error(front, stream, e, close).await,
    };
    let range = images::miss_range(&start, head.range.as_deref());
    let Some((from, to)) = range.bounds() else {
        let e = images::unsatisfiable(start.size.unwrap_or(0));
        return error(front, stream, e, close).await;
    };
    let status = range.status().as_u16();
    let mut headers = images::miss_headers(&start, &range);
    let chunked = start.size.is_none();
    if chunked {
        headers.insert(
            axum::http::header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let result = async {
        write_all(
            stream,
            &response_head(status, &headers, close),
            true,
            front.client_timeout,
        )
        .await?;
        let mut progress = flight.progress.clone();
        let mut pos = from;
        loop {
            if to.is_some_and(|to| pos >= to) {
                // The part asked for is sent; the fetch goes on for others.
                return Ok(());
            }
            let (written, outcome) = {
                let p = progress.borrow_and_update();
                (p.readable(to), p.outcome.clone())
            };
            if pos < written {
                let n = written - pos;
                if let Some(size) = start.size
                    && written > size
                {
                    return Err(io::Error::other("the upstream sent more than its size"));
                }
                if chunked {
                    write_all(
                        stream,
                        format!("{n:x}\r\n").as_bytes(),
                        true,
                        front.client_timeout,
                    )
                    .await?;
                }
                send_file(
                    front,
                    stream,
                    &flight.spool,
                    pos,
                    written,
                    &app.metrics.bytes_from_upstream,
                )
                .await?;
                if chunked {
                    write_all(stream, b"\r\n", false, front.client_timeout).await?;
                }
                pos = written;
                continue;
            }
            match outcome {
                Some(Outcome::Complete) => {
                    if start.size.is_some_and(|size| size != pos) {
                        return Err(io::Error::other("the fetch ended short of its size"));
                    }
                    if chunked {
                        write_all(stream, b"0\r\n\r\n", false, front.client_timeout).await?;
                    }
                    return Ok(());
                }
                Some(Outcome::Failed(e)) => {
                    return Err(io::Error::other(e.message));
                }
                Some(Outcome::AlreadyCached) => return Ok(()),
                None => {}
            }
            if progress.changed().await.is_err() {
                return Err(io::Error::other("the fetch ended without a result"));
            }
        }
    }
    .await;
    if result.is_err() {
        inc(&app.metrics.responses_aborted);
    }
    (status, result)
}

/// 304: the client has the image; its tag, no body.
async fn not_modified(
    front: &Front,
    stream: &TcpStream,
    checksum: &str,
    close: bool,
) -> (u16, io::Result<()>) {
    let out = response_head(304, &images::not_modified_headers(checksum), close);
    (
        304,
        write_all(stream, &out, false, front.client_timeout).await,
    )
}

/// An error answer, as hyper's path gives it (JSON).
async fn error(
    front: &Front,
    stream: &TcpStream,
    e: ApiError,
    close: bool,
) -> (u16, io::Result<()>) {
    let status = e.status.as_u16();
    let body = serde_json::to_vec(&e.body()).unwrap_or_default();
    let mut headers = HeaderMap::with_capacity(4);
    for (k, v) in e.extra_headers() {
        headers.insert(k, v);
    }
    headers.insert(
        axum::http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        axum::http::header::CONTENT_LENGTH,
        HeaderValue::from(body.len()),
    );
    let mut out = response_head(status, &headers, close);
    out.extend_from_slice(&body);
    (
        status,
        write_all(stream, &out, false, front.client_timeout).await,
    )
}

/// Write the head, `sendfile` the body, count the hit.
async fn send(
    front: &Front,
    stream: &TcpStream,
    hit: Box<Hit>,
    close: bool,
) -> (u16, io::Result<()>) {
    let app = &front.app;
    let Hit {
        id,
        file,
        start,
        end,
        status,
        headers,
    } = *hit;
    let head = response_head(status, &headers, close);
    let result = async {
        write_all(stream, &head, end > start, front.client_timeout).await?;
        send_file(
            front,
            stream,
            &file,
            start,
            end,
            &app.metrics.bytes_from_cache,
        )
        .await
    }
    .await;
    match &result {
        Ok(()) => {
            inc(&app.metrics.sendfile_responses);
            // Every byte went to the socket: the read is complete, and
            // its hit goes to the batch recorder.
            app.hits.completed(&id);
            inc(&app.metrics.hits);
        }
        // The client went away or stalled: no hit.
        Err(_) => inc(&app.metrics.responses_aborted),
    }
    (status, result)
}

/// Write `bytes` to the socket within the client timeout; `more` tells
/// the kernel a body follows (one segment for a small image's head and
/// body).
async fn write_all(
    stream: &TcpStream,
    mut bytes: &[u8],
    more: bool,
    timeout: Duration,
) -> io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !bytes.is_empty() {
        writable(stream, timeout).await?;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: the pointer and length describe `bytes`, which
            // outlives the call; the descriptor is the stream's.
            let n = unsafe {
                libc::send(
                    stream.as_raw_fd(),
                    bytes.as_ptr().cast(),
                    bytes.len(),
                    flags,
                )
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        }) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn writable(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    match tokio::time::timeout(timeout, stream.writable()).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not read for the client timeout",
        )),
    }
}

/// Largest `sendfile` per call: the call returns when the socket buffer is
/// full anyway; this keeps one call's page-cache reads short.
const SENDFILE_MAX: u64 = 4 << 20;

/// Bytes `start..end` of `file` to the socket, in the kernel.
async fn send_file(
    front: &Front,
    stream: &TcpStream,
    file: &std::fs::File,
    mut pos: u64,
    end: u64,
    counter: &AtomicU64,
) -> io::Result<()> {
    while pos < end {
        writable(stream, front.client_timeout).await?;
        let want = (end - pos).min(SENDFILE_MAX) as usize;
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut offset = pos as libc::off_t;
            // SAFETY: both descriptors are open for the call; `offset` is
            // a valid out-parameter.
            let n =
                unsafe { libc::sendfile(stream.as_raw_fd(), file.as_raw_fd(), &mut offset, want) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as u64)
            }
        }) {
            Ok(0) => {
                warn!("a file is shorter than when it was opened; aborting the response");
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file is shorter than when it was opened",
                ));
            }
            Ok(n) => {
                pos += n;
                add(counter, n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        // A connection with a fast client must not keep its worker thread
        // from every other connection.
        tokio::task::coop::consume_budget().await;
    }
    Ok(())
}

/// Give the connection to hyper, with the bytes already read in front of
/// the socket's.
async fn hand_over(
    front: &Front,
    stream: TcpStream,
    buf: BytesMut,
    peer: SocketAddr,
    watcher: Watcher,
) {
    let busy = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let io = TokioIo::new(IdleTimeout::new(
        stream,
        buf,
        front.client_timeout,
        busy.clone(),
    ));
    let service = super::CountBusy {
        inner: hyper_util::service::TowerToHyperService::new(front.router.clone()),
        busy,
    };
    let conn = front.http.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Option<Head> {
        match parse(raw.as_bytes()) {
            Parsed::Ours(h) => Some(*h),
            _ => None,
        }
    }

    #[test]
    fn the_front_takes_only_plain_downloads() {
        let h = head("GET /v2/images/abc/file HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n\r\n")
            .expect("a download");
        assert_eq!(h.id, "abc");
        assert_eq!(h.range.as_deref(), Some("bytes=0-1"));
        assert!(!h.close);
        let h =
            head("GET /v2/images/abc/file?x=1 HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n")
                .expect("a download with a query");
        assert!(h.close);
        for raw in [
            "HEAD /v2/images/abc/file HTTP/1.1\r\n\r\n",
            "GET /v2/images/abc/file HTTP/1.0\r\n\r\n",
            "GET /v2/images/a%2Fb/file HTTP/1.1\r\n\r\n",
            "GET /v2/images/a/b/file HTTP/1.1\r\n\r\n",
            "GET /v2/cache HTTP/1.1\r\n\r\n",
            "GET /v2/images/abc/file HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "GET /v2/images/abc/file HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /v2/images/abc/file HTTP/1.1\r\nUpgrade: h2c\r\n\r\n",
            "GARBAGE\r\n\r\n",
        ] {
            assert!(head(raw).is_none(), "{raw:?}");
        }
        assert!(matches!(
            parse(b"GET /v2/images/abc/file HTTP/1.1\r\nHost"),
            Parsed::Partial
        ));
    }
}
