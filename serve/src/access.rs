//! Who may download which image: the server's authorization model.
//!
//! Glance's own cache serves a cached image only to a request that may
//! download that image. A cache in front of Glance must do no less, or a
//! private image, once cached, is public. Three modes, chosen at start:
//!
//! - **Glance** (default with a Glance upstream): every download, hit or
//!   miss, carries the client's `X-Auth-Token`, and the upstream decides:
//!   `GET /v2/images/{id}` with that token must answer 200 (Glance's
//!   visibility, membership and policy apply). The answer is remembered
//!   per token and image for `--auth-cache-ttl` (refusals too), so a hit
//!   costs no round trip while it is fresh. No token: 401.
//! - **Token** (`--image-token-file`): the image token (or the admin
//!   token) lets a client download any image; fills use the upstream
//!   token.
//! - **Public** (`--public-downloads`): anyone may download any image.
//!
//! With a directory upstream, or none, there is no one to ask: the server
//! refuses to start unless the operator chose token or public.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use sha2::{Digest, Sha256};

use super::upstream::{Upstream, Verdict};
use super::{ApiError, App, auth};

/// How downloads are authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Glance,
    Token,
    Public,
}

impl Mode {
    /// The mode the flags ask for, or why they cannot be used.
    pub fn choose(
        upstream: Option<&Upstream>,
        image_token: bool,
        public: bool,
    ) -> Result<Mode, String> {
        match (image_token, public) {
            (true, true) => Err(
                "--image-token-file (or IMAGE_CACHE_IMAGE_TOKEN) and --public-downloads \
                 contradict each other: choose one"
                    .into(),
            ),
            (true, false) => Ok(Mode::Token),
            (false, true) => Ok(Mode::Public),
            (false, false) if upstream.is_some_and(Upstream::is_glance) => Ok(Mode::Glance),
            (false, false) => Err(
                "image downloads need an authorization: a Glance upstream (--upstream URL, \
                 which authorizes every download with the client's token), \
                 --image-token-file (or IMAGE_CACHE_IMAGE_TOKEN), or --public-downloads \
                 to serve every image to anyone"
                    .into(),
            ),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Glance => "glance",
            Mode::Token => "token",
            Mode::Public => "public",
        }
    }
}

/// A download the server may serve, and the token its fill sends.
pub struct Grant {
    pub upstream_token: Option<String>,
}

/// A token's digest and an image id.
type Key = ([u8; 32], String);
/// When the upstream answered, and what: allowed, or the refusal.
type Decision = (Instant, Result<(), (StatusCode, String)>);

/// Decisions of the upstream, per token digest and image.
pub struct Decisions {
    ttl: Duration,
    known: Mutex<HashMap<Key, Decision>>,
}

/// Decisions kept before the map starts over.
const DECISIONS_KEPT: usize = 100_000;

impl Decisions {
    pub fn new(ttl: Duration) -> Decisions {
        Decisions {
            ttl,
            known: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key: &Key) -> Option<Result<(), ApiError>> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let (at, decision) = known.get(key)?;
        if at.elapsed() >= self.ttl {
            return None;
        }
        Some(
            decision
                .clone()
                .map_err(|(status, message)| ApiError::new(status, message)),
        )
    }

    fn put(&self, key: Key, decision: Result<(), (StatusCode, String)>) {
        if self.ttl.is_zero() {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= DECISIONS_KEPT {
            known.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if known.len() >= DECISIONS_KEPT {
                known.clear();
            }
        }
        known.insert(key, (Instant::now(), decision));
    }
}

/// The client's token, if it sent one.
fn client_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(auth::TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The token a request from these headers sends upstream: the upstream
/// token when the client holds the admin token (or in token and public
/// modes, where the client's token is not the upstream's), else the
/// client's own.
pub fn upstream_token(app: &App, headers: &HeaderMap) -> Option<String> {
    if app.access != Mode::Glance || is_admin(app, headers) {
        return app.upstream_token.clone();
    }
    client_token(headers).map(str::to_string)
}

fn is_admin(app: &App, headers: &HeaderMap) -> bool {
    app.tokens
        .admin
        .as_ref()
        .is_some_and(|admin| auth::check(headers, &[admin]).is_ok())
}

/// Whether this request may download image `id` (validated already).
pub async fn authorize(app: &App, headers: &HeaderMap, id: &str) -> Result<Grant, ApiError> {
    match app.access {
        Mode::Public => Ok(Grant {
            upstream_token: app.upstream_token.clone(),
        }),
        Mode::Token => {
            app.tokens.check_download(headers)?;
            Ok(Grant {
                upstream_token: app.upstream_token.clone(),
            })
        }
        Mode::Glance => {
            let Some(token) = client_token(headers) else {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "image downloads require a token in the X-Auth-Token header",
                ));
            };
            let upstream_token = upstream_token(app, headers);
            let key: Key = (Sha256::digest(token.as_bytes()).into(), id.to_string());
            if let Some(decision) = app.decisions.get(&key) {
                return decision.map(|()| Grant { upstream_token });
            }
            let Some(Upstream::Glance(glance)) = app.upstream.as_ref() else {
                return Err(ApiError::internal(
                    "glance authorization without a Glance upstream".into(),
                ));
            };
            match glance.record(id, upstream_token.as_deref()).await {
                Ok(Verdict::Allowed(_)) => {
                    app.decisions.put(key, Ok(()));
                    Ok(Grant { upstream_token })
                }
                Ok(Verdict::Refused(e)) => {
                    app.decisions.put(key, Err((e.status, e.message.clone())));
                    Err(e.into())
                }
                // The upstream cannot say: nothing served, nothing kept.
                Err(e) => Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        let dir = Upstream::Dir(std::env::temp_dir());
        let glance = Upstream::parse("http://127.0.0.1:1", Duration::from_secs(1), &[]).unwrap();
        assert_eq!(Mode::choose(Some(&glance), false, false), Ok(Mode::Glance));
        assert_eq!(Mode::choose(Some(&glance), true, false), Ok(Mode::Token));
        assert_eq!(Mode::choose(Some(&dir), false, true), Ok(Mode::Public));
        assert!(Mode::choose(Some(&dir), false, false).is_err());
        assert!(Mode::choose(None, false, false).is_err());
        assert!(Mode::choose(None, true, true).is_err());
    }

    #[test]
    fn decisions_expire() {
        let d = Decisions::new(Duration::from_millis(50));
        let key = ([1u8; 32], "a".to_string());
        d.put(key.clone(), Err((StatusCode::NOT_FOUND, "no".into())));
        assert_eq!(
            d.get(&key).unwrap().unwrap_err().status,
            StatusCode::NOT_FOUND
        );
        std::thread::sleep(Duration::from_millis(60));
        assert!(d.get(&key).is_none());
        let off = Decisions::new(Duration::ZERO);
        off.put(key.clone(), Ok(()));
        assert!(off.get(&key).is_none());
    }
}
