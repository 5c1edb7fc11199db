//! Sibling fill: a node whose driver shares its metadata with other nodes
//! (the centralized driver) fills a miss from a sibling that holds the
//! image before it asks the upstream, as peer-to-peer distributors
//! (Dragonfly, Kraken, Spegel) do.
//!
//! - **Who holds it**: the driver's `get-cached-nodes` (each node's
//!   `worker_self_reference_url`), this node left out, the nodes whose URL
//!   starts with a `--prefer-peer` prefix first (same zone or rack), then
//!   the driver's order.
//! - **Node to node**: `GET {node}/v2/images/{id}/file` with the shared
//!   peer token in `X-Image-Cache-Peer-Token`. A node answers a peer from
//!   its cache only (404 if it does not hold the image, never a fetch from
//!   its upstream for a peer), so a fill cannot bounce between nodes.
//! - **Verified as any fill**: the sibling's `Content-Length` and
//!   `Content-MD5` (the checksum it recorded when it cached the image) are
//!   what the fill checks; if the fill goes on from the upstream, the
//!   upstream's size must agree.
//! - **Resumed, not restarted**: a sibling that fails mid-stream leaves
//!   its bytes in the spool; the fill asks the upstream for the rest
//!   (`Range: bytes=N-`), and the checksum covers both parts.

use std::time::Duration;

use axum::http::HeaderMap;
use tracing::{debug, warn};

use super::App;
use super::auth::{Secret, Token};
use super::upstream::{Body, Start, url_segment};

/// The header a node sends its peer token in.
pub const PEER_HEADER: &str = "x-image-cache-peer-token";

/// This node's part in the fleet.
pub struct Siblings {
    /// What this node sends.
    token: Secret,
    /// What it accepts (the same token, kept as a digest).
    accepted: Token,
    /// This node's own URL, left out of the holders.
    self_url: Option<String>,
    /// URL prefixes of the siblings asked first.
    prefer: Vec<String>,
    client: reqwest::Client,
}

impl Siblings {
    pub fn new(
        token: Secret,
        self_url: Option<String>,
        prefer: Vec<String>,
        timeout: Duration,
    ) -> Result<Siblings, String> {
        let accepted = Token::new(token.expose()).map_err(|e| format!("the peer token: {e}"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            .read_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("the sibling client: {e}"))?;
        Ok(Siblings {
            token,
            accepted,
            self_url: self_url.map(|u| u.trim_end_matches('/').to_string()),
            prefer,
            client,
        })
    }

    /// Whether a request comes from a sibling (carries the peer token).
    pub fn is_peer(&self, headers: &HeaderMap) -> bool {
        headers
            .get(PEER_HEADER)
            .is_some_and(|v| self.accepted.matches(v.as_bytes()))
    }

    /// The siblings that hold `id`, in the order to ask them; none when
    /// the driver keeps its metadata to itself (or cannot say now).
    pub async fn holders(&self, app: &std::sync::Arc<App>, id: &str) -> Vec<String> {
        let nodes = {
            let app = app.clone();
            let id = id.to_string();
            tokio::task::spawn_blocking(move || app.cache.get_cached_nodes(&id)).await
        };
        let nodes = match nodes {
            Ok(Ok(nodes)) => nodes,
            Ok(Err(image_cache::Error::Unsupported(_))) => return Vec::new(),
            Ok(Err(e)) => {
                debug!(image_id = id, error = %e, "no sibling list");
                return Vec::new();
            }
            Err(_) => return Vec::new(),
        };
        order(nodes, self.self_url.as_deref(), &self.prefer)
    }

    /// Open `id` at the sibling `node`: what it says of the image, and
    /// its bytes; why not otherwise.
    pub async fn open(&self, node: &str, id: &str) -> Result<(Start, Body), String> {
        let url = format!("{node}/v2/images/{}/file", url_segment(id));
        let response = self
            .client
            .get(&url)
            .header(PEER_HEADER, self.token.expose())
            .send()
            .await
            .map_err(|e| format!("{node} did not answer: {e}"))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(format!("{node} answered {}", response.status()));
        }
        let Some(size) = response.content_length() else {
            return Err(format!("{node} sent no Content-Length"));
        };
        let md5 = super::upstream::content_md5(&response);
        let start = Start {
            size: Some(size),
            md5,
            hash: None,
        };
        Ok((start, Body::Http(response)))
    }
}

/// The nodes to ask, in order: this node and anything but an http(s) URL
/// left out, those starting with a preferred prefix first, each group in
/// the driver's order.
fn order(nodes: Vec<String>, self_url: Option<&str>, prefer: &[String]) -> Vec<String> {
    let mut nodes: Vec<String> = nodes
        .into_iter()
        .map(|n| n.trim_end_matches('/').to_string())
        .filter(|n| Some(n.as_str()) != self_url)
        .filter(|n| n.starts_with("http://") || n.starts_with("https://"))
        .collect();
    // Stable: the driver's order within each group.
    nodes.sort_by_key(|n| !prefer.iter().any(|p| n.starts_with(p.as_str())));
    nodes
}

/// Log a sibling that could not be used.
pub fn unusable(id: &str, node: &str, why: &str) {
    warn!(image_id = id, node, error = why, "sibling not used");
}

#[cfg(test)]
mod tests {
    use super::order;

    #[test]
    fn preferred_siblings_first_this_node_left_out() {
        let nodes = [
            "http://rack-b-1:9292/",
            "http://rack-a-1:9292",
            "http://me:9292",
            "file:///etc/passwd",
            "http://rack-b-2:9292",
            "http://rack-a-2:9292",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            order(
                nodes.clone(),
                Some("http://me:9292"),
                &["http://rack-a-".into()]
            ),
            [
                "http://rack-a-1:9292",
                "http://rack-a-2:9292",
                "http://rack-b-1:9292",
                "http://rack-b-2:9292"
            ]
        );
        assert_eq!(order(nodes, None, &[]).len(), 5);
    }
}
