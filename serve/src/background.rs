//! Glance's periodic jobs, built in: the prefetcher (queued images fetched
//! from the upstream), prune to `image_cache_max_size`, clean with
//! `image_cache_stall_time`. Each runs on its own interval (0 disables it);
//! the API's clean and prune take the same lock, so no two of them ever
//! run at once on the root.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::watch;
use tracing::{info, warn};

use super::fill::{self, Outcome};
use super::metrics::{add, inc};
use super::{ApiError, App};

/// Start the loops; they stop when `stop` turns true.
pub fn spawn(app: &Arc<App>, stop: watch::Receiver<bool>) {
    let i = app.intervals;
    if !i.prefetch.is_zero() {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            every(i.prefetch, stop, Some(app.clone()), || {
                let app = app.clone();
                async move {
                    let _ = prefetch_once(&app).await;
                }
            })
            .await
        });
    }
    if !i.prune.is_zero() {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            every(i.prune, stop, None, || {
                let app = app.clone();
                async move {
                    let _ = prune_once(&app).await;
                }
            })
            .await
        });
    }
    if !i.clean.is_zero() {
        let (app, stop) = (app.clone(), stop.clone());
        tokio::spawn(async move {
            every(i.clean, stop, None, || {
                let app = app.clone();
                async move {
                    let _ = clean_once(&app).await;
                }
            })
            .await
        });
    }
}

/// Run `job` every `interval` (and, for the prefetcher, when an image is
/// queued through the API) until `stop`.
async fn every<F, Fut>(
    interval: Duration,
    mut stop: watch::Receiver<bool>,
    nudged_by: Option<Arc<App>>,
    job: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    loop {
        let nudge = async {
            match &nudged_by {
                Some(app) => app.prefetch_now.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = nudge => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        job().await;
    }
}

/// Evict least recently accessed images down to `image_cache_max_size`.
pub async fn prune_once(app: &Arc<App>) -> Result<Value, ApiError> {
    let _one = app.maintenance.lock().await;
    inc(&app.metrics.prune_runs);
    let max_size = app.tunables.read().unwrap().max_size;
    let started = Instant::now();
    let app2 = app.clone();
    let report = tokio::task::spawn_blocking(move || {
        // LRU order from every access counted so far.
        app2.hits.flush();
        app2.cache.prune(max_size)
    })
    .await
    .map_err(|e| ApiError::internal(format!("prune task: {e}")))?
    .map_err(|e| app.library_error(e, "prune"))?;
    let files = report.removed.len() as u64;
    add(&app.metrics.evictions, files);
    add(&app.metrics.evicted_bytes, report.bytes_removed);
    for f in &report.failures {
        warn!(failure = %f, "prune could not remove an image");
    }
    info!(
        files,
        bytes = report.bytes_removed,
        size_after = report.size_after,
        max_size,
        ms = started.elapsed().as_millis() as u64,
        "prune"
    );
    Ok(json!({
        "total_files_pruned": files,
        "total_bytes_pruned": report.bytes_removed,
    }))
}

/// Remove invalid files and incomplete ones older than the stall time.
pub async fn clean_once(app: &Arc<App>) -> Result<Value, ApiError> {
    let _one = app.maintenance.lock().await;
    inc(&app.metrics.clean_runs);
    let stall = app.tunables.read().unwrap().stall_time;
    let app2 = app.clone();
    let report = tokio::task::spawn_blocking(move || app2.cache.clean(stall))
        .await
        .map_err(|e| ApiError::internal(format!("clean task: {e}")))?
        .map_err(|e| app.library_error(e, "clean"))?;
    let files = (report.invalid.len() + report.incomplete.len()) as u64;
    let bytes = image_cache::driver::saturating_total(
        report
            .invalid
            .iter()
            .chain(report.incomplete.iter())
            .map(|f| f.size),
    );
    add(&app.metrics.cleaned_files, files);
    for f in &report.failures {
        warn!(failure = %f, "clean could not remove a file");
    }
    info!(
        invalid = report.invalid.len(),
        incomplete = report.incomplete.len(),
        bytes,
        stall_seconds = stall.as_secs(),
        "clean"
    );
    Ok(json!({
        "total_files_cleaned": files,
        "total_bytes_cleaned": bytes,
        "invalid_files_removed": report.invalid.len(),
        "stalled_files_removed": report.incomplete.len(),
    }))
}

/// Fetch every queued image from the upstream (Glance's prefetcher), one
/// at a time and without the maintenance lock: prune, clean and the API
/// go on meanwhile. Each fetch waits for a free fill slot (clients' misses
/// come first). An image the upstream does not have leaves the queue; one
/// that fails otherwise stays queued and is tried again after a back-off
/// (1 minute, doubling to 1 hour), not at every run.
pub async fn prefetch_once(app: &Arc<App>) -> Result<(), ApiError> {
    let Ok(_one) = app.prefetching.try_lock() else {
        // A run is under way; it will see the queue as it is.
        return Ok(());
    };
    if app.upstream.is_none() {
        return Ok(());
    }
    let app2 = app.clone();
    let queued = tokio::task::spawn_blocking(move || app2.cache.get_queued_images())
        .await
        .map_err(|e| ApiError::internal(format!("prefetch task: {e}")))?
        .map_err(|e| app.library_error(e, "get-queued-images"))?;
    if queued.is_empty() {
        return Ok(());
    }
    inc(&app.metrics.prefetch_runs);
    let (mut ok, mut failed, mut waiting) = (0u64, 0u64, 0u64);
    for id in queued {
        if app.shutting_down() {
            break;
        }
        if super::validate_id(&id).is_err() {
            warn!(image_id = %id.escape_debug(), "skipping a queued id this server would not accept");
            failed += 1;
            continue;
        }
        if !app.prefetch_backoff.due(&id) {
            waiting += 1;
            continue;
        }
        let slot = app.flights.wait_slot().await;
        let (flight, _) = match fill::join_or_start(
            app,
            &id,
            app.upstream_token.clone(),
            Some(slot),
            fill::FillFor::Prefetch,
        ) {
            Ok(f) => f,
            Err(e) => {
                warn!(image_id = %id, error = %e.message, "prefetch could not start");
                app.prefetch_backoff.failed(&id);
                failed += 1;
                continue;
            }
        };
        // Done: failed, found cached, or its commit settled.
        let done = flight.settled().await;
        let (outcome, cached) = match done {
            Some(p) => (p.outcome, p.cached.unwrap_or(false)),
            None => (None, false),
        };
        match outcome {
            Some(Outcome::Complete) if cached => {
                app.prefetch_backoff.succeeded(&id);
                ok += 1;
            }
            Some(Outcome::AlreadyCached) | Some(Outcome::Complete) => {
                // Cached by someone else, or not cacheable (ceiling, disk):
                // not ours to keep queued forever.
                app.prefetch_backoff.succeeded(&id);
                dequeue_if_cached(app, &id).await;
            }
            Some(Outcome::Failed(e)) if e.status == axum::http::StatusCode::NOT_FOUND => {
                failed += 1;
                warn!(image_id = %id, error = %e.message, "prefetch: the upstream does not have it; dequeued");
                app.prefetch_backoff.succeeded(&id);
                let app2 = app.clone();
                let id2 = id.clone();
                let _ =
                    tokio::task::spawn_blocking(move || app2.cache.delete_queued_image(&id2)).await;
            }
            Some(Outcome::Failed(e)) => {
                failed += 1;
                let wait = app.prefetch_backoff.failed(&id);
                warn!(image_id = %id, error = %e.message, retry_in_seconds = wait.as_secs(), "prefetch failed; left queued");
            }
            None => {
                failed += 1;
                app.prefetch_backoff.failed(&id);
            }
        }
    }
    if waiting > 0 {
        info!(waiting, "prefetch: images backing off after failures");
    }
    add(&app.metrics.prefetched, ok);
    add(&app.metrics.prefetch_failures, failed);
    info!(cached = ok, failed, "prefetch");
    Ok(())
}

async fn dequeue_if_cached(app: &Arc<App>, id: &str) {
    let app2 = app.clone();
    let id2 = id.to_string();
    let _ = tokio::task::spawn_blocking(move || {
        if !app2.cache.is_cached(&id2)? {
            return Ok(());
        }
        app2.cache.delete_queued_image(&id2)
    })
    .await;
}

/// When a queued image that failed may be tried again.
#[derive(Default)]
pub struct Backoff {
    failures: std::sync::Mutex<std::collections::HashMap<String, (u32, Instant)>>,
}

impl Backoff {
    const FIRST: Duration = Duration::from_secs(60);
    const MOST: Duration = Duration::from_secs(3600);

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn due(&self, id: &str) -> bool {
        self.lock()
            .get(id)
            .is_none_or(|(_, next)| Instant::now() >= *next)
    }

    /// Record a failure; how long until the next try.
    pub fn failed(&self, id: &str) -> Duration {
        let mut f = self.lock();
        if f.len() >= 100_000 {
            f.clear();
        }
        let entry = f.entry(id.to_string()).or_insert((0, Instant::now()));
        let wait = Self::FIRST
            .saturating_mul(1u32 << entry.0.min(10))
            .min(Self::MOST);
        entry.0 += 1;
        entry.1 = Instant::now() + wait;
        wait
    }

    pub fn succeeded(&self, id: &str) {
        self.lock().remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn back_off_doubles_to_an_hour() {
        let b = Backoff::default();
        assert!(b.due("a"));
        assert_eq!(b.failed("a"), Duration::from_secs(60));
        assert!(!b.due("a"));
        assert_eq!(b.failed("a"), Duration::from_secs(120));
        for _ in 0..10 {
            b.failed("a");
        }
        assert_eq!(b.failed("a"), Duration::from_secs(3600));
        b.succeeded("a");
        assert!(b.due("a"));
    }
}
