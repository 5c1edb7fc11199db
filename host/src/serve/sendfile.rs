//! Cached downloads over `sendfile(2)`: the front of every connection.
//!
//! hyper writes a body from buffers in user space, so a cached image
//! served through it is read into memory and copied out again. The front
//! reads each request head itself (`httparse`, the parser hyper uses);
//! when it is a plain HTTP/1.1 `GET /v2/images/{id}/file` of an image
//! that is cached, it writes the response head and lets the kernel move
//! the file's pages to the socket with `sendfile`, then keeps the
//! connection for the next request. Anything else (other paths and
//! methods, `HEAD`, HTTP/1.0, percent-encoded ids, a missing or refused
//! token, a miss, an unsatisfiable range, a malformed or oversized head)
//! goes to hyper and the router with the bytes read so far, and hyper
//! keeps the connection from then on: every error answer and every miss
//! has one implementation, in [`images`](super::images) and the router.
//!
//! What holds on this path as on hyper's: the token check, id
//! validation, one `open-for-read` and one `finish` per download, the
//! hit counted only when every byte went to the socket, the client
//! timeout on reads and writes, graceful shutdown (an idle connection is
//! closed, a download in progress completes), the metrics and the
//! request log.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::{Buf, BytesMut};
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use image_cache::{Error, ImageReader};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::images::{self, RangeRequest};
use super::metrics::{InFlight, add, inc};
use super::{App, IdleTimeout, MAX_HEAD_BYTES, MAX_HEADERS, auth, validate_id};

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
        // Read until a whole request head is in `buf`.
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
                r = tokio::time::timeout(front.client_timeout, stream.readable()) => r,
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
        let Some(hit) = open_hit(&front.app, &head).await else {
            return hand_over(&front, stream, buf, peer, watcher).await;
        };
        buf.advance(head.len);
        let close = head.close || front.app.shutting_down();
        if send(&front, &stream, hit, &head, close).await.is_err() || close {
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
    close: bool,
}

enum Parsed {
    /// A whole head of a download the front may answer.
    Ours(Head),
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
    let range = headers
        .get(axum::http::header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Parsed::Ours(Head {
        len,
        id: id.to_string(),
        path: bare.to_string(),
        headers,
        range,
        close,
    })
}

/// An open cached image and the answer's head.
struct Hit {
    reader: ImageReader,
    file: std::fs::File,
    start: u64,
    end: u64,
    status: u16,
    headers: HeaderMap,
}

/// Open the image for a download the front answers, or `None` to leave
/// the request to hyper (which also gives every refusal its answer).
async fn open_hit(app: &Arc<App>, head: &Head) -> Option<Hit> {
    if let Some(image_token) = app.tokens.image.as_ref() {
        let mut accepted = vec![image_token];
        accepted.extend(app.tokens.admin.as_ref());
        auth::check(&head.headers, &accepted).ok()?;
    }
    validate_id(&head.id).ok()?;
    let app2 = app.clone();
    let id = head.id.clone();
    let range = head.range.clone();
    let opened = tokio::task::spawn_blocking(move || images::open_cached(&app2, &id, range))
        .await
        .ok()?;
    let opened = match opened {
        Ok(o) => o,
        Err(Error::NotFound(_)) => return None,
        Err(e) => {
            app.note_driver_error(&e, "open-for-read");
            return None;
        }
    };
    let (start, end, status) = match opened.range {
        RangeRequest::Unsatisfiable => return None,
        RangeRequest::Full => (0, opened.size, 200),
        RangeRequest::Part(a, b) => (a, b + 1, 206),
    };
    let headers = images::hit_headers(&opened);
    Some(Hit {
        reader: opened.reader,
        file: opened.file,
        start,
        end,
        status,
        headers,
    })
}

/// Write the head, `sendfile` the body, count the hit.
async fn send(
    front: &Front,
    stream: &TcpStream,
    hit: Hit,
    head: &Head,
    close: bool,
) -> io::Result<()> {
    let app = &front.app;
    inc(&app.metrics.requests);
    let _in_flight = InFlight::new(&app.metrics);
    let started = Instant::now();
    let Hit {
        mut reader,
        file,
        start,
        end,
        status,
        headers,
    } = hit;
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(match status {
        206 => b"HTTP/1.1 206 Partial Content\r\n".as_slice(),
        _ => b"HTTP/1.1 200 OK\r\n".as_slice(),
    });
    for (name, value) in &headers {
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
    let more = end > start;
    let result = async {
        write_all(stream, &out, more, front.client_timeout).await?;
        send_file(front, stream, &file, start, end).await
    }
    .await;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    match &result {
        Ok(()) => {
            inc(&app.metrics.sendfile_responses);
            // Every byte went to the socket: the read is complete.
            let app2 = app.clone();
            let _ = tokio::task::spawn_blocking(move || match reader.finish() {
                Ok(()) => inc(&app2.metrics.hits),
                Err(e) => app2.note_driver_error(&e, "finish-read"),
            })
            .await;
            debug!(method = "GET", path = %head.path, status, ms, sendfile = true, "request");
        }
        Err(e) => {
            // The client went away or stalled: no hit.
            inc(&app.metrics.responses_aborted);
            debug!(path = %head.path, error = %e, ms, "download over sendfile ended early");
        }
    }
    result
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
                warn!("a cached image is shorter than when it was opened; aborting the response");
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the cached file is shorter than when it was opened",
                ));
            }
            Ok(n) => {
                pos += n;
                add(&front.app.metrics.bytes_from_cache, n);
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
    let io = TokioIo::new(IdleTimeout::new(
        Rewind {
            prefix: buf,
            io: stream,
        },
        front.client_timeout,
    ));
    let service = hyper_util::service::TowerToHyperService::new(front.router.clone());
    let conn = front.http.serve_connection(io, service);
    if let Err(e) = watcher.watch(conn).await {
        debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A socket with bytes already read from it put back in front.
pub struct Rewind {
    prefix: BytesMut,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Option<Head> {
        match parse(raw.as_bytes()) {
            Parsed::Ours(h) => Some(h),
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
