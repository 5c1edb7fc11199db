//! Warming: `POST /v2/cache/warm` fills a list of images before they are
//! asked for (Nova's `cache_images`, Harbor's preheat), on this node or
//! fanned out to a set of nodes, with a concurrency limit, progress at
//! `GET /v2/cache/warm/{id}` and in the metrics, and a final report.
//!
//! The images are a list of ids, or a policy: the `top` N most-hit images
//! of the last D days across the nodes given (each node's cache listing,
//! hits summed), or the images of a Glance upstream with a `property`.
//! Each image is filled as the prefetcher fills (a free fill slot, one
//! flight per image shared with clients' misses, sibling fill first where
//! configured, verified, admitted under the max size).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tracing::{info, warn};

use super::fill::{self, FillFor, Outcome};
use super::metrics::inc;
use super::upstream::{Upstream, url_segment};
use super::{ApiError, App, auth, validate_id};

/// Reports kept for `GET /v2/cache/warm/{id}` (the oldest go first).
const KEPT: usize = 32;
/// Most images one warming takes.
const MAX_IMAGES: usize = 10_000;
/// Pages of Glance's image list read for a `property` policy.
const MAX_PAGES: usize = 100;

/// The warmings of this server.
pub struct Warmings {
    next: AtomicU64,
    jobs: Mutex<VecDeque<Arc<Job>>>,
    client: reqwest::Client,
}

/// One warming: its report as it goes.
pub struct Job {
    id: u64,
    started: Instant,
    report: Mutex<Report>,
}

#[derive(Clone, Default)]
struct Report {
    images: usize,
    done: usize,
    cached: usize,
    already_cached: usize,
    not_cached: usize,
    failed: usize,
    errors: Vec<Value>,
    nodes: Vec<Value>,
    running: bool,
    seconds: f64,
}

impl Job {
    fn json(&self) -> Value {
        let r = self.report.lock().unwrap().clone();
        let seconds = if r.running {
            self.started.elapsed().as_secs_f64()
        } else {
            r.seconds
        };
        json!({
            "warm": self.id,
            "state": if r.running { "running" } else { "done" },
            "images": r.images,
            "done": r.done,
            "cached": r.cached,
            "already_cached": r.already_cached,
            "not_cached": r.not_cached,
            "failed": r.failed,
            "errors": r.errors,
            "nodes": r.nodes,
            "seconds": seconds,
        })
    }

    fn update(&self, f: impl FnOnce(&mut Report)) {
        f(&mut self.report.lock().unwrap());
    }
}

impl Warmings {
    pub fn new() -> Warmings {
        Warmings {
            next: AtomicU64::new(1),
            jobs: Mutex::new(VecDeque::new()),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
        }
    }

    fn create(&self, images: usize) -> Arc<Job> {
        let job = Arc::new(Job {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            started: Instant::now(),
            report: Mutex::new(Report {
                images,
                running: true,
                ..Report::default()
            }),
        });
        let mut jobs = self.jobs.lock().unwrap();
        if jobs.len() == KEPT {
            jobs.pop_front();
        }
        jobs.push_back(job.clone());
        job
    }

    fn find(&self, id: u64) -> Option<Arc<Job>> {
        self.jobs
            .lock()
            .unwrap()
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }
}

/// What a warming asks for.
struct Request {
    images: Vec<String>,
    nodes: Vec<String>,
    concurrency: usize,
    wait: bool,
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, message)
}

/// `POST /v2/cache/warm`.
pub async fn start(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    super::cache_api::admin(&app, &headers)?;
    let token = headers
        .get(auth::TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request = parse(&app, &body, token.as_deref()).await?;
    let here = request.nodes.is_empty() || request.nodes.iter().any(|n| is_self(&app, n));
    let job = app
        .warmings
        .create(if here { request.images.len() } else { 0 });
    inc(&app.metrics.warm_runs);
    info!(
        warm = job.id,
        images = request.images.len(),
        nodes = request.nodes.len(),
        concurrency = request.concurrency,
        "warming"
    );
    let task = {
        let (app, job) = (app.clone(), job.clone());
        tokio::spawn(async move {
            run(
                app,
                job,
                request.images,
                request.nodes,
                request.concurrency,
                token,
            )
            .await
        })
    };
    if request.wait {
        let _ = task.await;
        return Ok((StatusCode::OK, Json(job.json())));
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "warm": job.id,
            "status": format!("/v2/cache/warm/{}", job.id),
            "images": job.report.lock().unwrap().images,
        })),
    ))
}

/// `GET /v2/cache/warm/{id}`: a warming's progress, or its final report.
pub async fn status(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    super::cache_api::admin(&app, &headers)?;
    let job = id
        .parse::<u64>()
        .ok()
        .and_then(|id| app.warmings.find(id))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                format!("no warming {id:?} (the last {KEPT} are kept)"),
            )
        })?;
    Ok(Json(job.json()))
}

/// Read the request: exactly one of `images`, `top`, `property`; the
/// nodes; the concurrency.
async fn parse(app: &Arc<App>, body: &[u8], token: Option<&str>) -> Result<Request, ApiError> {
    let doc: Value = serde_json::from_slice(body).map_err(|e| {
        bad(format!(
            "the body must be JSON like {{\"images\": [\"ID\", ...]}}, {{\"top\": {{\"count\": 10, \"days\": 7}}}} or {{\"property\": {{\"name\": \"K\", \"value\": \"V\"}}}}: {e}"
        ))
    })?;
    let nodes: Vec<String> = match doc.get("nodes") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|n| {
                n.as_str()
                    .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
                    .map(|u| u.trim_end_matches('/').to_string())
                    .ok_or_else(|| bad(format!("nodes: {n} is not an http(s) URL")))
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(bad(format!("nodes must be a list of URLs, not {other}"))),
    };
    let concurrency = match doc.get("concurrency") {
        None | Some(Value::Null) => 4,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=256).contains(n))
            .ok_or_else(|| bad("concurrency must be a number from 1 to 256"))?
            as usize,
    };
    let wait = doc.get("wait").and_then(Value::as_bool).unwrap_or(false);
    let chosen = ["images", "top", "property"]
        .into_iter()
        .filter(|k| doc.get(k).is_some_and(|v| !v.is_null()))
        .collect::<Vec<_>>();
    let images = match chosen.as_slice() {
        ["images"] => doc["images"]
            .as_array()
            .ok_or_else(|| bad("images must be a list of image ids"))?
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("images: {v} is not an id")))
            })
            .collect::<Result<Vec<_>, _>>()?,
        ["top"] => {
            let count = doc["top"]["count"]
                .as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| bad("top.count must be a positive number"))?;
            let days = doc["top"]["days"].as_f64().unwrap_or(7.0);
            if !(days > 0.0 && days.is_finite()) {
                return Err(bad("top.days must be a positive number"));
            }
            top(app, &nodes, count as usize, days, token).await?
        }
        ["property"] => {
            let name = doc["property"]["name"]
                .as_str()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad("property.name must be a property's name"))?;
            let value = doc["property"]["value"]
                .as_str()
                .ok_or_else(|| bad("property.value must be a string"))?;
            with_property(app, name, value, token).await?
        }
        [] => return Err(bad("name the images: images, top or property")),
        more => {
            return Err(bad(format!(
                "name the images one way, not {}",
                more.join(" and ")
            )));
        }
    };
    if images.len() > MAX_IMAGES {
        return Err(bad(format!(
            "{} images: one warming takes at most {MAX_IMAGES}",
            images.len()
        )));
    }
    for id in &images {
        validate_id(id)?;
    }
    let mut seen = std::collections::HashSet::new();
    let images = images
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect();
    Ok(Request {
        images,
        nodes,
        concurrency,
        wait,
    })
}

/// The `count` most-hit images accessed within `days`, hits summed over
/// the nodes' cache listings (this node's own when none are given).
async fn top(
    app: &Arc<App>,
    nodes: &[String],
    count: usize,
    days: f64,
    token: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let since = now - days * 86_400.0;
    let mut hits: HashMap<String, u64> = HashMap::new();
    let mut add = |listed: &[Value]| {
        for image in listed {
            let (Some(id), Some(h), Some(at)) = (
                image["image_id"].as_str(),
                image["hits"].as_u64(),
                image["last_accessed"].as_f64(),
            ) else {
                continue;
            };
            if at >= since {
                *hits.entry(id.to_string()).or_default() += h;
            }
        }
    };
    let local = nodes.is_empty();
    for node in nodes.iter().map(Some).chain(local.then_some(None)) {
        let listed = match node {
            Some(node) if !is_self(app, node) => {
                let url = format!("{node}/v2/cache");
                let mut request = app.warmings.client.get(&url);
                if let Some(t) = token {
                    request = request.header(auth::TOKEN_HEADER, t);
                }
                let answer = request
                    .timeout(Duration::from_secs(60))
                    .send()
                    .await
                    .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("{node}: {e}")))?;
                if !answer.status().is_success() {
                    return Err(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        format!("{node} answered {} for its cache listing", answer.status()),
                    ));
                }
                let doc = read_json(answer)
                    .await
                    .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, format!("{node}: {e}")))?;
                doc["cached_images"].as_array().cloned().unwrap_or_default()
            }
            _ => {
                let app2 = app.clone();
                let cached = tokio::task::spawn_blocking(move || {
                    app2.hits.flush();
                    app2.cache.get_cached_images()
                })
                .await
                .map_err(|e| ApiError::internal(format!("listing task: {e}")))?
                .map_err(|e| app.library_error(e, "list"))?;
                cached
                    .into_iter()
                    .map(|i| json!({"image_id": i.image_id, "hits": i.hits, "last_accessed": i.last_accessed}))
                    .collect()
            }
        };
        add(&listed);
    }
    let mut ranked: Vec<(String, u64)> = hits.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(ranked.into_iter().take(count).map(|(id, _)| id).collect())
}

/// The images of the Glance upstream whose property `name` is `value`.
async fn with_property(
    app: &Arc<App>,
    name: &str,
    value: &str,
    token: Option<&str>,
) -> Result<Vec<String>, ApiError> {
    let Some(Upstream::Glance(glance)) = app.upstream.as_ref() else {
        return Err(bad(
            "a property policy needs a Glance upstream (--upstream URL)",
        ));
    };
    let token = app.upstream_token.as_deref().or(token);
    let mut url = format!(
        "{}/v2/images?{}={}&limit=200",
        glance.base,
        url_segment(name),
        url_segment(value)
    );
    let mut ids = Vec::new();
    for _ in 0..MAX_PAGES {
        let answer = glance
            .send(reqwest::Method::GET, &url, token, "list")
            .await
            .map_err(ApiError::from)?;
        if !answer.status().is_success() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the upstream answered {} for its image list",
                    answer.status()
                ),
            ));
        }
        let doc = read_json(answer).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("the upstream's image list: {e}"),
            )
        })?;
        for image in doc["images"].as_array().into_iter().flatten() {
            if let Some(id) = image["id"].as_str() {
                ids.push(id.to_string());
            }
        }
        match doc["next"].as_str() {
            Some(next) if next.starts_with("/v2/images?") => {
                url = format!("{}{next}", glance.base);
            }
            _ => return Ok(ids),
        }
    }
    Ok(ids)
}

/// Largest JSON document read from another node or the upstream (a cache
/// listing of 100,000 images is about 15 MB).
const MAX_JSON: usize = 64 << 20;

/// A response's body as JSON, at most `MAX_JSON` bytes of it.
async fn read_json(mut answer: reqwest::Response) -> Result<Value, String> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_JSON {
            return Err(format!("the answer is larger than {MAX_JSON} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer is not JSON: {e}"))
}

fn is_self(app: &App, node: &str) -> bool {
    app.self_url.as_deref() == Some(node)
}

/// Warm `images` here (no nodes, or this node among them) and on the other
/// nodes, then finish the report.
async fn run(
    app: Arc<App>,
    job: Arc<Job>,
    images: Vec<String>,
    nodes: Vec<String>,
    concurrency: usize,
    token: Option<String>,
) {
    let here = nodes.is_empty() || nodes.iter().any(|n| is_self(&app, n));
    let remote: Vec<String> = nodes.into_iter().filter(|n| !is_self(&app, n)).collect();
    let fan_out = {
        let (app, job, images) = (app.clone(), job.clone(), images.clone());
        async move {
            let calls = remote.into_iter().map(|node| {
                let (app, job, images, token) =
                    (app.clone(), job.clone(), images.clone(), token.clone());
                async move {
                    remote_warm(&app, &job, &node, &images, concurrency, token.as_deref()).await
                }
            });
            futures_util::future::join_all(calls).await;
        }
    };
    let local = async {
        if here {
            warm_here(&app, &job, &images, concurrency).await;
        }
    };
    tokio::join!(fan_out, local);
    job.update(|r| {
        r.running = false;
        r.seconds = job.started.elapsed().as_secs_f64();
    });
    let report = job.json();
    info!(warm = job.id, report = %report, "warming done");
}

/// Fill each image here, `concurrency` at a time.
async fn warm_here(app: &Arc<App>, job: &Arc<Job>, images: &[String], concurrency: usize) {
    let gate = Arc::new(Semaphore::new(concurrency));
    let tasks = images.iter().cloned().map(|id| {
        let (app, job, gate) = (app.clone(), job.clone(), gate.clone());
        tokio::spawn(async move {
            let _turn = gate.acquire_owned().await.expect("never closed");
            app.metrics.warm_in_flight.fetch_add(1, Ordering::Relaxed);
            let result = warm_one(&app, &id).await;
            app.metrics.warm_in_flight.fetch_sub(1, Ordering::Relaxed);
            inc(&app.metrics.warm_images);
            job.update(|r| {
                r.done += 1;
                match result {
                    Ok(Warmed::Cached) => r.cached += 1,
                    Ok(Warmed::AlreadyCached) => r.already_cached += 1,
                    Ok(Warmed::NotCached) => r.not_cached += 1,
                    Err(e) => {
                        r.failed += 1;
                        inc(&app.metrics.warm_failures);
                        if r.errors.len() < 100 {
                            r.errors.push(json!({"image_id": id, "error": e}));
                        }
                    }
                }
            });
        })
    });
    for task in tasks.collect::<Vec<_>>() {
        let _ = task.await;
    }
}

enum Warmed {
    Cached,
    AlreadyCached,
    /// Fetched and verified, but not kept (admission, ceiling, disk).
    NotCached,
}

/// Fill one image as the prefetcher does; why not, as text.
async fn warm_one(app: &Arc<App>, id: &str) -> Result<Warmed, String> {
    if app.upstream.is_none() {
        let app2 = app.clone();
        let id2 = id.to_string();
        return match tokio::task::spawn_blocking(move || app2.cache.is_cached(&id2)).await {
            Ok(Ok(true)) => Ok(Warmed::AlreadyCached),
            _ => Err("not cached, and no upstream is configured".into()),
        };
    }
    let slot = app.flights.wait_slot().await;
    let (flight, _) = fill::join_or_start(
        app,
        id,
        app.upstream_token.clone(),
        Some(slot),
        FillFor::Prefetch,
    )
    .map_err(|e| e.message)?;
    let done = flight.settled().await;
    match done {
        Some(p) => match p.outcome {
            Some(Outcome::Complete) if p.cached == Some(true) => Ok(Warmed::Cached),
            Some(Outcome::Complete) => Ok(Warmed::NotCached),
            Some(Outcome::AlreadyCached) => Ok(Warmed::AlreadyCached),
            Some(Outcome::Failed(e)) => Err(e.message),
            None => Err("the fill ended without a result".into()),
        },
        None => Err("the fill ended without a result".into()),
    }
}

/// Ask `node` to warm `images` and wait for its report.
async fn remote_warm(
    app: &Arc<App>,
    job: &Arc<Job>,
    node: &str,
    images: &[String],
    concurrency: usize,
    token: Option<&str>,
) {
    let mut request = app
        .warmings
        .client
        .post(format!("{node}/v2/cache/warm"))
        .header("content-type", "application/json")
        .body(json!({"images": images, "concurrency": concurrency, "wait": true}).to_string());
    if let Some(t) = token {
        request = request.header(auth::TOKEN_HEADER, t);
    }
    let answer = match request.send().await {
        Ok(a) => a,
        Err(e) => {
            warn!(node, error = %e, "warming: the node did not answer");
            job.update(|r| {
                r.nodes.push(json!({"node": node, "error": e.to_string()}));
                r.failed += images.len();
            });
            return;
        }
    };
    let status = answer.status();
    let report = read_json(answer).await.unwrap_or(Value::Null);
    job.update(|r| {
        if status.is_success() {
            let n = |k: &str| report[k].as_u64().unwrap_or(0) as usize;
            r.images += n("images");
            r.done += n("done");
            r.cached += n("cached");
            r.already_cached += n("already_cached");
            r.not_cached += n("not_cached");
            r.failed += n("failed");
        } else {
            r.failed += images.len();
        }
        r.nodes
            .push(json!({"node": node, "status": status.as_u16(), "report": report}));
    });
}
