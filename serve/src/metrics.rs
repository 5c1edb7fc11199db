//! Counters for `GET /metrics`, in the Prometheus text format.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use image_cache::ImageCache;

/// Every counter the server keeps. All are monotonic except the gauges
/// `in_flight` and `flights_active`.
#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_from_cache: AtomicU64,
    pub bytes_from_upstream: AtomicU64,
    pub upstream_fetches: AtomicU64,
    pub upstream_failures: AtomicU64,
    pub upstream_bytes: AtomicU64,
    pub coalesced: AtomicU64,
    pub images_cached: AtomicU64,
    pub not_cached_ceiling: AtomicU64,
    pub not_cached_disk: AtomicU64,
    pub not_cached_admission: AtomicU64,
    pub admission_evictions: AtomicU64,
    pub sibling_fills: AtomicU64,
    pub sibling_bytes: AtomicU64,
    pub sibling_failures: AtomicU64,
    pub upstream_resumes: AtomicU64,
    pub peer_requests: AtomicU64,
    pub warm_runs: AtomicU64,
    pub warm_images: AtomicU64,
    pub warm_failures: AtomicU64,
    pub warm_in_flight: AtomicU64,
    pub admission_evicted_bytes: AtomicU64,
    pub checksum_failures: AtomicU64,
    pub fills_refused: AtomicU64,
    pub connections_refused: AtomicU64,
    pub served_degraded: AtomicU64,
    pub cache_write_failures: AtomicU64,
    pub evictions: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub cleaned_files: AtomicU64,
    pub driver_errors: AtomicU64,
    pub swaps: AtomicU64,
    pub swap_failures: AtomicU64,
    pub prefetch_runs: AtomicU64,
    pub prefetched: AtomicU64,
    pub prefetch_failures: AtomicU64,
    pub prune_runs: AtomicU64,
    pub clean_runs: AtomicU64,
    pub responses_aborted: AtomicU64,
    pub sendfile_responses: AtomicU64,
    pub hit_opens_deferred: AtomicU64,
    pub hits_unrecorded: AtomicU64,
    pub fail_open: AtomicU64,
    pub in_flight: AtomicI64,
    pub flights_active: AtomicI64,
}

/// Counts one request in flight until dropped (held by streaming bodies
/// until the last byte or the client's disconnect).
pub struct InFlight(Arc<Metrics>);

impl InFlight {
    pub fn new(metrics: &Arc<Metrics>) -> InFlight {
        metrics.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

impl Metrics {
    /// The exposition text. `cache` adds what the driver runtime counted.
    pub fn render(&self, cache: &ImageCache, driver: &str) -> String {
        let mut out = String::with_capacity(4096);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters: &[(&str, &str, u64)] = &[
            (
                "image_cache_requests_total",
                "HTTP requests received.",
                get(&self.requests),
            ),
            (
                "image_cache_hits_total",
                "Image downloads served completely from the cache.",
                get(&self.hits),
            ),
            (
                "image_cache_misses_total",
                "Image downloads not found in the cache.",
                get(&self.misses),
            ),
            (
                "image_cache_served_bytes_cache_total",
                "Image bytes sent to clients from cached files.",
                get(&self.bytes_from_cache),
            ),
            (
                "image_cache_served_bytes_upstream_total",
                "Image bytes sent to clients while fetched from the upstream.",
                get(&self.bytes_from_upstream),
            ),
            (
                "image_cache_upstream_fetches_total",
                "Fetches started against the upstream.",
                get(&self.upstream_fetches),
            ),
            (
                "image_cache_upstream_failures_total",
                "Upstream fetches that failed (status, connection, mid-stream).",
                get(&self.upstream_failures),
            ),
            (
                "image_cache_upstream_bytes_total",
                "Bytes read from the upstream.",
                get(&self.upstream_bytes),
            ),
            (
                "image_cache_coalesced_requests_total",
                "Requests that joined a fetch already under way.",
                get(&self.coalesced),
            ),
            (
                "image_cache_images_cached_total",
                "Images written into the cache.",
                get(&self.images_cached),
            ),
            (
                "image_cache_not_cached_ceiling_total",
                "Images served but not cached because of the hard ceiling.",
                get(&self.not_cached_ceiling),
            ),
            (
                "image_cache_not_cached_admission_total",
                "Images served but not cached because room under --max-size could not be made within --fill-evict-budget (or the image alone is larger).",
                get(&self.not_cached_admission),
            ),
            (
                "image_cache_sibling_fills_total",
                "Fills that read from a sibling node holding the image.",
                get(&self.sibling_fills),
            ),
            (
                "image_cache_sibling_bytes_total",
                "Bytes read from sibling nodes.",
                get(&self.sibling_bytes),
            ),
            (
                "image_cache_sibling_failures_total",
                "Sibling fills that failed mid-stream (the rest came from the upstream).",
                get(&self.sibling_failures),
            ),
            (
                "image_cache_upstream_resumes_total",
                "Upstream fetches that went on at the byte a failed sibling reached (Range).",
                get(&self.upstream_resumes),
            ),
            (
                "image_cache_peer_requests_total",
                "Downloads asked by sibling nodes (answered from the cache only).",
                get(&self.peer_requests),
            ),
            (
                "image_cache_warm_runs_total",
                "Warmings started (POST /v2/cache/warm).",
                get(&self.warm_runs),
            ),
            (
                "image_cache_warm_images_total",
                "Images a warming has finished with on this node (cached, already cached, not kept or failed).",
                get(&self.warm_images),
            ),
            (
                "image_cache_warm_failures_total",
                "Images a warming could not fill on this node.",
                get(&self.warm_failures),
            ),
            (
                "image_cache_admission_evictions_total",
                "Images evicted by fills to stay under --max-size (admission; also counted in image_cache_evictions_total).",
                get(&self.admission_evictions),
            ),
            (
                "image_cache_admission_evicted_bytes_total",
                "Bytes evicted by fills to stay under --max-size.",
                get(&self.admission_evicted_bytes),
            ),
            (
                "image_cache_cache_write_failures_total",
                "Fetches whose caching failed while the bytes still reached the clients.",
                get(&self.cache_write_failures),
            ),
            (
                "image_cache_evictions_total",
                "Images evicted by prune and by admission.",
                get(&self.evictions),
            ),
            (
                "image_cache_evicted_bytes_total",
                "Bytes evicted by prune and by admission.",
                get(&self.evicted_bytes),
            ),
            (
                "image_cache_cleaned_files_total",
                "Invalid and stalled files removed by clean.",
                get(&self.cleaned_files),
            ),
            (
                "image_cache_driver_errors_total",
                "Driver calls that failed with a driver fault.",
                get(&self.driver_errors),
            ),
            (
                "image_cache_driver_swaps_total",
                "Successful driver swaps.",
                get(&self.swaps),
            ),
            (
                "image_cache_driver_swap_failures_total",
                "Driver swaps refused (the old driver stayed).",
                get(&self.swap_failures),
            ),
            (
                "image_cache_driver_rollbacks_total",
                "Drivers rolled back: by the operator, or automatically after faults.",
                cache.stats.rollbacks.load(Ordering::Relaxed),
            ),
            (
                "image_cache_driver_faults_seen_total",
                "Driver faults (trap, deadline, broken contract) seen by the cache library.",
                cache.stats.driver_faults.load(Ordering::Relaxed),
            ),
            (
                "image_cache_prefetch_runs_total",
                "Prefetcher runs.",
                get(&self.prefetch_runs),
            ),
            (
                "image_cache_prefetched_images_total",
                "Queued images the prefetcher cached.",
                get(&self.prefetched),
            ),
            (
                "image_cache_prefetch_failures_total",
                "Queued images the prefetcher could not cache.",
                get(&self.prefetch_failures),
            ),
            (
                "image_cache_not_cached_disk_total",
                "Fetched images served but not cached: they would have left less than --disk-reserve free.",
                get(&self.not_cached_disk),
            ),
            (
                "image_cache_upstream_checksum_failures_total",
                "Fetches whose bytes did not match the upstream's checksum (not cached).",
                get(&self.checksum_failures),
            ),
            (
                "image_cache_fetches_refused_total",
                "Misses answered 503: --max-fetches fetches were under way.",
                get(&self.fills_refused),
            ),
            (
                "image_cache_connections_refused_total",
                "Connections answered 503 and closed: --max-connections were open.",
                get(&self.connections_refused),
            ),
            (
                "image_cache_served_degraded_total",
                "Cached images served by their seal while the driver failed (its database down).",
                get(&self.served_degraded),
            ),
            (
                "image_cache_prune_runs_total",
                "Prune runs (periodic and API).",
                get(&self.prune_runs),
            ),
            (
                "image_cache_clean_runs_total",
                "Clean runs (periodic and API).",
                get(&self.clean_runs),
            ),
            (
                "image_cache_responses_aborted_total",
                "Image responses ended with an error (upstream failure, timeout).",
                get(&self.responses_aborted),
            ),
            (
                "image_cache_sendfile_responses_total",
                "Downloads of cached images sent whole with sendfile(2).",
                get(&self.sendfile_responses),
            ),
            (
                "image_cache_hit_opens_deferred_total",
                "Hits whose driver calls ran off the event loop: they would have waited there (a lock held elsewhere), or the driver's calls may always wait (it is granted a database).",
                get(&self.hit_opens_deferred),
            ),
            (
                "image_cache_hits_unrecorded_total",
                "Hits counted by the server that the driver failed to record.",
                get(&self.hits_unrecorded),
            ),
            (
                "image_cache_fail_open_total",
                "Downloads served from the upstream, not cached, because the driver failed (fail-open).",
                get(&self.fail_open),
            ),
            (
                "image_cache_fail_reload_total",
                "Drivers rolled back to the previous one after a fault, the call retried (fail-reload).",
                cache.fail_reloads(),
            ),
        ];
        let stats = &cache.runtime().stats;
        let runtime: &[(&str, &str, u64)] = &[
            (
                "image_cache_driver_faults_total",
                "Driver instances discarded after a trap or a missed deadline.",
                stats.instances_discarded.load(Ordering::Relaxed),
            ),
            (
                "image_cache_driver_instances_total",
                "Driver instances created.",
                stats.instances.load(Ordering::Relaxed),
            ),
        ];
        for (name, help, value) in counters.iter().chain(runtime) {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let gauges: &[(&str, &str, i64)] = &[
            (
                "image_cache_in_flight_requests",
                "Requests being handled or streaming a body.",
                self.in_flight.load(Ordering::Relaxed),
            ),
            (
                "image_cache_upstream_fetches_active",
                "Upstream fetches under way.",
                self.flights_active.load(Ordering::Relaxed),
            ),
            (
                "image_cache_warm_in_flight",
                "Images a warming is filling on this node now.",
                self.warm_in_flight.load(Ordering::Relaxed) as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let driver = driver
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', " ");
        let _ = writeln!(
            out,
            "# HELP image_cache_driver_info The driver serving calls.\n# TYPE image_cache_driver_info gauge\nimage_cache_driver_info{{driver=\"{driver}\"}} 1"
        );
        out
    }
}
