//! Hits of the downloads served, recorded in batches.
//!
//! A download that sent every byte ends its read session without `finish`
//! and adds `(id, time)` here; the driver records the batch with one
//! `record-reads` call (for the sqlite driver, one transaction) at most
//! [`FLUSH_EVERY`] later, or as soon as [`BATCH`] reads are waiting. A
//! SQLite commit per hit cost more than everything else a small download
//! does. Whatever reads hits or access times through the server (the cache
//! API, prune) flushes first, so the server never shows a hit it counted
//! as missing; shutdown flushes what is left. Other processes on the same
//! root see a hit up to [`FLUSH_EVERY`] late, and a crash loses at most
//! that much of them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use image_cache::{ImageCache, ReadRecord};
use tracing::warn;

use super::metrics::Metrics;

/// How long a completed read may wait to be recorded.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Reads that make the recorder flush at once.
pub const BATCH: usize = 512;
/// Reads kept while the driver cannot record them; beyond, new ones are
/// dropped (counted in `image_cache_hits_unrecorded_total`).
pub const MAX_PENDING: usize = 1 << 16;

pub struct Hits {
    cache: Arc<ImageCache>,
    metrics: Arc<Metrics>,
    pending: Mutex<Vec<ReadRecord>>,
    wake: Condvar,
    /// Held while a batch is taken and recorded: a flush waits for the
    /// batch in progress, so after it returns every earlier hit is in.
    recording: Mutex<()>,
    stopped: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hits {
    pub fn new(cache: Arc<ImageCache>, metrics: Arc<Metrics>) -> Hits {
        Hits {
            cache,
            metrics,
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            recording: Mutex::new(()),
            stopped: AtomicBool::new(false),
        }
    }

    /// A download of `id` sent its last byte now.
    pub fn completed(&self, id: &str) {
        // The clock drivers read (`clock.now`).
        let accessed = image_cache::fs::to_time(std::time::SystemTime::now());
        let mut pending = lock(&self.pending);
        if pending.len() >= MAX_PENDING {
            drop(pending);
            super::metrics::inc(&self.metrics.hits_unrecorded);
            return;
        }
        pending.push(ReadRecord {
            image_id: id.to_string(),
            accessed,
        });
        if pending.len() >= BATCH {
            self.wake.notify_one();
        }
    }

    /// Record every hit counted so far (and wait for a batch in progress).
    pub fn flush(&self) {
        let _one = lock(&self.recording);
        let batch = std::mem::take(&mut *lock(&self.pending));
        self.record(batch);
    }

    fn record(&self, batch: Vec<ReadRecord>) {
        if batch.is_empty() {
            return;
        }
        match self.cache.record_reads(&batch) {
            Ok(_) => {}
            Err(e) => {
                self.metrics
                    .hits_unrecorded
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                warn!(reads = batch.len(), error = %e, "recording hits failed; they are lost");
            }
        }
    }

    /// The recorder: flushes every [`FLUSH_EVERY`] (or at [`BATCH`]
    /// reads) until [`Hits::stop`]; then flushes what is left.
    pub fn spawn(self: &Arc<Self>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let hits = self.clone();
        std::thread::Builder::new()
            .name("image-cache-hits".into())
            .spawn(move || {
                while !hits.stopped.load(Ordering::Relaxed) {
                    {
                        let pending = lock(&hits.pending);
                        if pending.len() < BATCH && !hits.stopped.load(Ordering::Relaxed) {
                            drop(
                                hits.wake
                                    .wait_timeout(pending, FLUSH_EVERY)
                                    .unwrap_or_else(|p| p.into_inner()),
                            );
                        }
                    }
                    hits.flush();
                }
                hits.flush();
            })
    }

    /// Stop the recorder after one last flush.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        let _guard = lock(&self.pending);
        self.wake.notify_one();
    }
}
