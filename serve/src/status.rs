//! The status page: `GET /-/status` (a page whose assets are in the
//! binary, no CDN) and `GET /-/status.json` (what it shows; the admin
//! token). `/` stays Glance's versions document; `/-/` is a prefix Glance
//! does not use.
//!
//! A sampler keeps, every `SAMPLE_EVERY`, the cache size and the hit, miss
//! and byte counters for the last hour, for the charts; the document adds
//! the fills under way with their progress, the top images (and, with a
//! shared driver, the nodes that hold each), the driver with its contract
//! version and signature, and the swaps and rollbacks.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{ApiError, App};

/// The page, its script and style inline.
const PAGE: &str = include_str!("../assets/status.html");
/// How often a sample is taken.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: an hour.
const KEPT: usize = 720;
/// Top images shown.
const TOP: usize = 10;

/// The samples for the charts.
#[derive(Default)]
pub struct Samples {
    ring: Mutex<VecDeque<Value>>,
}

impl Samples {
    fn take(&self, app: &App, size: u64) {
        let m = &app.metrics;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let sample = json!({
            "t": now,
            "size": size,
            "hits": m.hits.load(Ordering::Relaxed),
            "misses": m.misses.load(Ordering::Relaxed),
            "bytes_from_cache": m.bytes_from_cache.load(Ordering::Relaxed),
            "bytes_from_upstream": m.bytes_from_upstream.load(Ordering::Relaxed),
        });
        let mut ring = self.ring.lock().unwrap();
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(sample);
    }

    /// The cache size of the last sample.
    pub fn last_size(&self) -> Option<u64> {
        self.ring
            .lock()
            .unwrap()
            .back()
            .and_then(|s| s["size"].as_u64())
    }

    fn all(&self) -> Vec<Value> {
        self.ring.lock().unwrap().iter().cloned().collect()
    }
}

/// Sample now and every `SAMPLE_EVERY` until `stop`.
pub fn spawn_sampler(app: &Arc<App>, mut stop: watch::Receiver<bool>) {
    let app = app.clone();
    tokio::spawn(async move {
        loop {
            sample(&app).await;
            tokio::select! {
                _ = tokio::time::sleep(SAMPLE_EVERY) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
        }
    });
}

/// Take a sample: the cache's size, if the driver could say.
async fn sample(app: &Arc<App>) -> Option<u64> {
    let app2 = app.clone();
    let size = tokio::task::spawn_blocking(move || app2.cache.get_cache_size())
        .await
        .ok()
        .and_then(Result::ok);
    // A failing driver leaves a gap rather than a false zero.
    if let Some(size) = size {
        app.samples.take(app, size);
    }
    size
}

/// `GET /-/status`: the page. It asks for the admin token (kept in the
/// tab's session storage) and reads `/-/status.json` with it.
pub async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:",
            ),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
        .into_response()
}

/// `GET /-/status.json` (the admin token): what the page shows.
pub async fn document(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    super::cache_api::admin(&app, &headers)?;
    // A fresh point, so a chart has data from the first look on; its size
    // is the document's.
    let size = sample(&app).await;
    let app2 = app.clone();
    let (images, nodes) = tokio::task::spawn_blocking(move || {
        app2.hits.flush();
        let mut images = app2.cache.get_cached_images().unwrap_or_default();
        images.sort_by(|a, b| {
            b.hits
                .cmp(&a.hits)
                .then_with(|| a.image_id.cmp(&b.image_id))
        });
        let count = images.len();
        images.truncate(TOP);
        let nodes: Vec<Option<Vec<String>>> = images
            .iter()
            .map(|i| app2.cache.get_cached_nodes(&i.image_id).ok())
            .collect();
        ((count, images), nodes)
    })
    .await
    .map_err(|e| ApiError::internal(format!("status task: {e}")))?;
    let (count, top) = images;
    let top: Vec<Value> = top
        .into_iter()
        .zip(nodes)
        .map(|(i, nodes)| {
            json!({
                "image_id": i.image_id,
                "hits": i.hits,
                "size": i.size,
                "last_accessed": i.last_accessed,
                "nodes": nodes,
            })
        })
        .collect();
    let fills: Vec<Value> = app
        .flights
        .snapshot()
        .into_iter()
        .map(|(id, written, size)| json!({"image_id": id, "written": written, "size": size}))
        .collect();
    let d = app.cache.driver();
    let info = d.info();
    let m = &app.metrics;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let t = app.tunables.read().unwrap();
    let free = super::fill::free_space(app.cache.root()).ok();
    Ok(Json(json!({
        "node": app.self_url,
        "cache": {
            "size": size,
            "images": count,
            "max_size": t.max_size,
            "ceiling": app.ceiling,
            "disk_free": free,
        },
        "totals": {
            "hits": get(&m.hits),
            "misses": get(&m.misses),
            "bytes_from_cache": get(&m.bytes_from_cache),
            "bytes_from_upstream": get(&m.bytes_from_upstream),
            "evictions": get(&m.evictions),
            "sibling_fills": get(&m.sibling_fills),
        },
        "series": app.samples.all(),
        "sample_seconds": SAMPLE_EVERY.as_secs(),
        "fills": fills,
        "top": top,
        "driver": {
            "name": d.name(),
            "version": info.version,
            "contract": d.component().manifest().version.to_string(),
            "sha256": d.component().sha256(),
            "signature": d.component().signature(),
            "grants": d.component().grants().names(),
            "fail_policy": app.cache.fail_policy().as_str(),
            "last_rollback": app.cache.last_rollback(),
        },
        "swaps": get(&m.swaps),
        "swap_failures": get(&m.swap_failures),
        "rollbacks": app.cache.stats.rollbacks.load(Ordering::Relaxed),
    })))
}
