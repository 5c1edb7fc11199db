//! Fills: an image fetched from the upstream once, verified, then cached.
//!
//! A miss starts one [`Flight`] per image id: a task, independent of any
//! client, that reads the upstream into a spool file (an unnamed
//! temporary file). Every client asking for the image meanwhile reads the
//! spool at its own pace, so one upstream fetch serves them all and a
//! slow or vanished client never stalls or stops it.
//!
//! Nothing reaches the cache before the fill is verified:
//!
//! 1. the bytes received equal the declared size (Glance's `size`,
//!    `Content-Length`, the file's size), and the upstream sent no more;
//! 2. they match every checksum the upstream gave (Glance's `checksum`
//!    and `os_hash_value`, `Content-MD5`);
//! 3. the upstream kept up a minimum rate (`--upstream-min-rate` over each
//!    `--upstream-timeout` window), besides the per-read timeout.
//!
//! Until then clients get every byte but the last (and a range nothing),
//! so a fill that fails ends their bodies short: never a complete-looking
//! body. Only a verified fill is cached, in one short write session that
//! copies the spool into the driver's file (`copy_file_range`) and commits
//! it with its MD5: a driver instance is held for that copy, never while
//! the network is slow. Shutdown cannot commit an unfinished fill: the
//! check comes first.
//!
//! Fills are capped (`--max-fetches`): past the cap a new miss is a 503
//! with `Retry-After`, while clients of fills under way still join them.
//! A fill is not cached when it would leave less than `--disk-reserve`
//! free on the cache's file system (it is still served); a commit that
//! fails on a full disk has its file removed at once (the driver's clean).
//!
//! The fail policy decides what a fill does when its lookup (`is-cached`)
//! finds the driver failing: fail-closed (and fail-reload, once the library
//! rolled back and retried in vain) fails the fill with the driver's
//! error; fail-open fetches for the clients around the cache (a client's
//! miss only; the prefetcher has no client) and caches nothing.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use image_cache::checksum::{Algorithm, Hasher};
use image_cache::{Checksum, Error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tracing::{info, warn};

use super::metrics::{add, inc};
use super::upstream::{Body, FetchError, Start, internal};
use super::{App, driver_failing};

/// Spool writes are batched up to this much when the upstream sends
/// faster than the disk takes it.
const WRITE_BATCH: usize = 1 << 20;
/// Seconds a client is told to wait when the fills are at their cap.
const RETRY_AFTER: u32 = 5;

/// How a fill ended, as its readers see it.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// Every byte is in the spool and verified.
    Complete,
    /// The image was cached already: read it from the cache.
    AlreadyCached,
    /// Failed; clients that got bytes see their response cut short.
    Failed(FetchError),
}

/// A fill's progress.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    pub start: Option<Start>,
    /// Bytes of the spool clients may send now: all but the last until
    /// the fill is verified.
    pub written: u64,
    pub outcome: Option<Outcome>,
    /// After the outcome: whether the image went into the cache.
    pub cached: Option<bool>,
    /// The fill goes around a failing driver (fail-open): clients get the
    /// bytes, nothing is cached. Set before `start`.
    pub fail_open: bool,
}

/// Who a fill is for, and what it asks of the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillFor {
    /// A client's miss: looked up first, cached once verified.
    Client,
    /// A client's miss whose lookup found the driver failing under
    /// fail-open: fetched for the clients, the cache left alone.
    ClientAroundTheCache,
    /// The prefetcher: looked up first, cached once verified; a failing
    /// driver fails it whatever the policy (there is no client to serve).
    Prefetch,
}

impl Progress {
    /// How far a client may read: to `to` (a range) only once verified.
    pub fn readable(&self, to: Option<u64>) -> u64 {
        match to {
            None => self.written,
            Some(to) if matches!(self.outcome, Some(Outcome::Complete)) => to.min(self.written),
            Some(_) => 0,
        }
    }
}

/// One fill of one image, shared by every request for it.
pub struct Flight {
    pub spool: Arc<File>,
    pub progress: watch::Receiver<Progress>,
}

impl Flight {
    /// Wait until the fill is settled: failed, found cached, or its
    /// commit decided (what a prefetch or a warming waits for).
    pub async fn settled(&self) -> Option<Progress> {
        self.wait_for(|p| match (&p.outcome, p.cached) {
            (Some(Outcome::Failed(_) | Outcome::AlreadyCached), _) => true,
            (Some(_), cached) => cached.is_some(),
            (None, _) => false,
        })
        .await
    }

    /// Wait until the fill's progress is `ready`: that progress, or `None`
    /// when the fill ended without ever being ready (its task is gone).
    pub async fn wait_for(&self, ready: impl Fn(&Progress) -> bool) -> Option<Progress> {
        let mut progress = self.progress.clone();
        loop {
            {
                let p = progress.borrow_and_update();
                if ready(&p) {
                    return Some(p.clone());
                }
            }
            if progress.changed().await.is_err() {
                let p = progress.borrow();
                return ready(&p).then(|| p.clone());
            }
        }
    }
}

/// The fills under way, by image id, and the cap on them.
pub struct Flights {
    map: Mutex<HashMap<String, Arc<Flight>>>,
    slots: Arc<Semaphore>,
    max: usize,
}

impl Flights {
    /// The fills under way: image id, bytes so far, size if known.
    pub fn snapshot(&self) -> Vec<(String, u64, Option<u64>)> {
        let map = self.map.lock().unwrap();
        let mut fills: Vec<_> = map
            .iter()
            .map(|(id, f)| {
                let p = f.progress.borrow();
                (id.clone(), p.written, p.start.as_ref().and_then(|s| s.size))
            })
            .collect();
        fills.sort();
        fills
    }

    pub fn new(max: usize) -> Flights {
        Flights {
            map: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    pub fn active(&self) -> usize {
        self.map.lock().unwrap().len()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Wait for a free slot (the prefetcher queues rather than fails).
    pub async fn wait_slot(&self) -> OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }
}

/// Join the fill of `id` under way, or start one: with `slot` (the
/// prefetcher's), else with a free one or a 503. Returns the flight and
/// whether it was joined.
pub fn join_or_start(
    app: &Arc<App>,
    id: &str,
    token: Option<String>,
    slot: Option<OwnedSemaphorePermit>,
    purpose: FillFor,
) -> Result<(Arc<Flight>, bool), FetchError> {
    let mut map = app.flights.map.lock().unwrap();
    if let Some(flight) = map.get(id) {
        return Ok((flight.clone(), true));
    }
    if app.upstream.is_none() {
        return Err(FetchError::new(
            StatusCode::NOT_FOUND,
            format!("image {id:?} is not cached (and no upstream is configured)"),
        ));
    }
    let slot = match slot {
        Some(s) => s,
        None => app.flights.slots.clone().try_acquire_owned().map_err(|_| {
            inc(&app.metrics.fills_refused);
            FetchError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "{} images are being fetched, the most at once; try again",
                    app.flights.max
                ),
                retry_after: Some(RETRY_AFTER),
            }
        })?,
    };
    let spool = tempfile::tempfile_in(&app.spool_dir).map_err(|e| {
        internal(format!(
            "cannot create a spool file in {}: {e}",
            app.spool_dir.display()
        ))
    })?;
    let spool = Arc::new(spool);
    let (tx, rx) = watch::channel(Progress::default());
    let flight = Arc::new(Flight {
        spool: spool.clone(),
        progress: rx,
    });
    map.insert(id.to_string(), flight.clone());
    drop(map);
    app.metrics.flights_active.fetch_add(1, Ordering::Relaxed);
    let app = app.clone();
    let id = id.to_string();
    tokio::spawn(async move {
        let _slot = slot;
        let started = Instant::now();
        let (outcome, refused) = match look_up(&app, &id, purpose, &tx).await {
            Lookup::Cached => (Outcome::AlreadyCached, false),
            Lookup::Refused(e) => (Outcome::Failed(e), true),
            Lookup::Fetch => (fill(&app, &id, token, &spool, &tx).await, false),
        };
        let cached = match &outcome {
            Outcome::Complete => {
                let bytes = tx.borrow().written;
                let around = tx.borrow().fail_open;
                tx.send_modify(|p| p.outcome = Some(Outcome::Complete));
                let cached = !around && commit(&app, &id, &spool, bytes, &tx).await;
                info!(
                    image_id = %id,
                    bytes,
                    cached,
                    fail_open = around,
                    seconds = started.elapsed().as_secs_f64(),
                    "upstream fetch complete"
                );
                cached
            }
            Outcome::AlreadyCached => false,
            Outcome::Failed(e) if refused => {
                warn!(image_id = %id, status = e.status.as_u16(), error = %e.message, "not fetched: the driver is failing");
                false
            }
            Outcome::Failed(e) => {
                inc(&app.metrics.upstream_failures);
                warn!(image_id = %id, status = e.status.as_u16(), error = %e.message, "upstream fetch failed");
                false
            }
        };
        tx.send_modify(|p| {
            p.outcome = Some(outcome);
            p.cached = Some(cached);
        });
        // Removed only now: a request either joins this flight or, after
        // the commit, finds the image cached.
        app.flights.map.lock().unwrap().remove(&id);
        app.metrics.flights_active.fetch_sub(1, Ordering::Relaxed);
    });
    Ok((flight, false))
}

/// What a fill's lookup found.
enum Lookup {
    /// Fetch it (not cached, or fetched around the cache: see
    /// `Progress::fail_open`).
    Fetch,
    /// Cached already: read the cache.
    Cached,
    /// The driver is failing and the policy is not to go around it.
    Refused(FetchError),
}

/// Ask the driver whether the image is cached already, and apply the fail
/// policy when it cannot say.
async fn look_up(
    app: &Arc<App>,
    id: &str,
    purpose: FillFor,
    tx: &watch::Sender<Progress>,
) -> Lookup {
    if purpose == FillFor::ClientAroundTheCache {
        tx.send_modify(|p| p.fail_open = true);
        return Lookup::Fetch;
    }
    let cached = {
        let app = app.clone();
        let id = id.to_string();
        tokio::task::spawn_blocking(move || app.cache.is_cached(&id)).await
    };
    match cached {
        Ok(Ok(true)) => Lookup::Cached,
        Ok(Ok(false)) => Lookup::Fetch,
        Ok(Err(e)) if purpose == FillFor::Client && app.fails_open(&e) => {
            app.note_driver_error(&e, "is-cached");
            warn!(image_id = %id, error = %e, "the driver is failing: fetching around the cache (fail-open)");
            tx.send_modify(|p| p.fail_open = true);
            Lookup::Fetch
        }
        Ok(Err(e)) if driver_failing(&e) => {
            Lookup::Refused(app.library_error(e, "is-cached").into())
        }
        Ok(Err(e)) => {
            app.note_driver_error(&e, "is-cached");
            Lookup::Fetch
        }
        Err(e) => {
            warn!("is-cached task: {e}");
            Lookup::Fetch
        }
    }
}

/// Read the image into the spool, from a sibling that holds it if there
/// is one (see `siblings`), else (or for the rest, after a sibling failed
/// mid-stream) from the upstream, and verify it.
async fn fill(
    app: &Arc<App>,
    id: &str,
    token: Option<String>,
    spool: &Arc<File>,
    tx: &watch::Sender<Progress>,
) -> Outcome {
    let Some(upstream) = app.upstream.as_ref() else {
        return Outcome::Failed(FetchError::new(
            StatusCode::NOT_FOUND,
            format!("image {id:?} is not cached"),
        ));
    };
    let failed =
        |message: String| Outcome::Failed(FetchError::new(StatusCode::BAD_GATEWAY, message));
    let mut written = 0u64;
    let mut from_sibling: Option<(Start, Hashers)> = None;
    if let Some(siblings) = app.siblings.as_ref() {
        let holders = siblings.holders(app, id).await;
        // What the upstream says of the image (Glance's record: size and
        // checksums) is what a sibling's bytes are checked against: a node
        // listed in the shared database is not trusted to vouch for its
        // own bytes. Without a record (a directory upstream), the
        // sibling's recorded checksum is what there is.
        let authority = if holders.is_empty() {
            None
        } else {
            match upstream.describe_image(id, token.as_deref()).await {
                Ok(record) => record,
                Err(e) => return Outcome::Failed(e),
            }
        };
        for node in holders {
            let (start, body) = match siblings.open(&node, id).await {
                Ok((theirs, body)) => match &authority {
                    None => (theirs, body),
                    Some(record) => {
                        match super::upstream::merge(id, record.clone(), theirs.size, theirs.md5) {
                            Ok(start) => (start, body),
                            Err(e) => {
                                super::siblings::unusable(id, &node, &e.message);
                                continue;
                            }
                        }
                    }
                },
                Err(why) => {
                    super::siblings::unusable(id, &node, &why);
                    continue;
                }
            };
            inc(&app.metrics.sibling_fills);
            tx.send_modify(|p| p.start = Some(start.clone()));
            let mut hashers = Hashers::new(&start);
            let pumped = pump(
                app,
                id,
                body,
                0,
                spool,
                &mut hashers,
                &mut written,
                start.size,
                tx,
                &app.metrics.sibling_bytes,
            )
            .await;
            match pumped {
                Ok(()) => return verified(app, id, &start, hashers, written, tx),
                Err(Pumped::Stopped(outcome)) => return outcome,
                Err(Pumped::Failed(why)) => {
                    inc(&app.metrics.sibling_failures);
                    warn!(image_id = %id, node, at = written, error = %why, "the sibling failed mid-stream: the rest from the upstream");
                    from_sibling = Some((start, hashers));
                }
            }
            break;
        }
    }
    inc(&app.metrics.upstream_fetches);
    let (start, hashers) = match from_sibling {
        None => match upstream.open(id, token.as_deref()).await {
            Ok((start, body)) => {
                tx.send_modify(|p| p.start = Some(start.clone()));
                let hashers = Hashers::new(&start);
                (start, Some((body, 0, hashers)))
            }
            Err(e) => return Outcome::Failed(e),
        },
        Some((start, hashers)) => {
            inc(&app.metrics.upstream_resumes);
            match upstream.open_at(id, token.as_deref(), written).await {
                Ok((theirs, body, skip)) => {
                    if let (Some(a), Some(b)) = (start.size, theirs.size)
                        && a != b
                    {
                        return failed(format!(
                            "the sibling sent image {id:?} as {a} bytes, the upstream has {b}"
                        ));
                    }
                    (start, Some((body, skip, hashers)))
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
    };
    let Some((body, skip, mut hashers)) = hashers else {
        unreachable!("an upstream body is open")
    };
    let pumped = pump(
        app,
        id,
        body,
        skip,
        spool,
        &mut hashers,
        &mut written,
        start.size,
        tx,
        &app.metrics.upstream_bytes,
    )
    .await;
    match pumped {
        Ok(()) => verified(app, id, &start, hashers, written, tx),
        Err(Pumped::Stopped(outcome)) => outcome,
        Err(Pumped::Failed(why)) => failed(why),
    }
}

/// Why a body stopped before its end.
enum Pumped {
    /// The server is stopping: this is the outcome.
    Stopped(Outcome),
    /// The source failed or misbehaved.
    Failed(String),
}

/// Copy `body` into the spool from `*written` on (its first `skip` bytes
/// dropped), hashing it, until its end; bytes counted in `counter`.
#[allow(clippy::too_many_arguments)]
async fn pump(
    app: &Arc<App>,
    id: &str,
    mut body: Body,
    mut skip: u64,
    spool: &Arc<File>,
    hashers: &mut Hashers,
    written: &mut u64,
    size: Option<u64>,
    tx: &watch::Sender<Progress>,
    counter: &std::sync::atomic::AtomicU64,
) -> Result<(), Pumped> {
    let mut rate = Rate::new(app.limits.min_rate, app.limits.rate_window);
    let stopped = || {
        Pumped::Stopped(Outcome::Failed(FetchError::new(
            StatusCode::BAD_GATEWAY,
            format!("the server stopped before image {id:?} was fetched"),
        )))
    };
    loop {
        // Take what is there now, up to a batch, without waiting for more.
        let mut batch = BytesMut::new();
        let mut ended = false;
        loop {
            let next = if batch.is_empty() {
                tokio::select! {
                    c = body.chunk() => Some(c),
                    _ = app.fetches_aborted() => return Err(stopped()),
                }
            } else {
                body.chunk().now_or_never()
            };
            match next {
                None => break,
                Some(Ok(Some(mut chunk))) => {
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64);
                        skip -= n;
                        let _ = chunk.split_to(n as usize);
                    }
                    batch.extend_from_slice(&chunk);
                    if batch.len() >= WRITE_BATCH {
                        break;
                    }
                }
                Some(Ok(None)) => {
                    ended = true;
                    break;
                }
                Some(Err(e)) => {
                    return Err(Pumped::Failed(format!(
                        "the source failed while sending image {id:?}: {e}"
                    )));
                }
            }
        }
        if app.abort_fetches.load(Ordering::Relaxed) {
            return Err(stopped());
        }
        if !batch.is_empty() {
            let n = batch.len() as u64;
            if let Some(size) = size
                && *written + n > size
            {
                return Err(Pumped::Failed(format!(
                    "the source sent more than the {size} bytes of image {id:?}"
                )));
            }
            let spool2 = spool.clone();
            let batch = batch.freeze();
            let at = *written;
            let mut h = std::mem::replace(hashers, Hashers::empty());
            let (h, result) = match tokio::task::spawn_blocking(move || {
                h.update(&batch);
                let r = write_at(&spool2, &batch, at);
                (h, r)
            })
            .await
            {
                Ok(done) => done,
                Err(e) => {
                    return Err(Pumped::Stopped(Outcome::Failed(internal(format!(
                        "spool write task: {e}"
                    )))));
                }
            };
            *hashers = h;
            if let Err(e) = result {
                return Err(Pumped::Stopped(Outcome::Failed(internal(format!(
                    "writing the spool of {id:?}: {e}"
                )))));
            }
            *written += n;
            add(counter, n);
            // The last byte waits for the verdict.
            tx.send_modify(|p| p.written = *written - 1);
            if let Err(e) = rate.check(n) {
                return Err(Pumped::Failed(format!(
                    "the source sent image {id:?} too slowly: {e}"
                )));
            }
        }
        if ended {
            break;
        }
    }
    if let Some(size) = size
        && *written != size
    {
        return Err(Pumped::Failed(format!(
            "the source ended image {id:?} after {written} of its {size} bytes"
        )));
    }
    Ok(())
}

/// The verdict on a spool complete by its size: its checksums.
fn verified(
    app: &Arc<App>,
    id: &str,
    start: &Start,
    hashers: Hashers,
    written: u64,
    tx: &watch::Sender<Progress>,
) -> Outcome {
    let md5 = match hashers.verify(start) {
        Ok(md5) => md5,
        Err(e) => {
            inc(&app.metrics.checksum_failures);
            return Outcome::Failed(FetchError::new(
                StatusCode::BAD_GATEWAY,
                format!("image {id:?} from the upstream {e}; not cached"),
            ));
        }
    };
    tx.send_modify(|p| {
        p.written = written;
        p.start.get_or_insert_with(Start::default).md5 = Some(md5);
    });
    Outcome::Complete
}

/// Copy a verified spool into the cache, if it fits.
async fn commit(
    app: &Arc<App>,
    id: &str,
    spool: &Arc<File>,
    size: u64,
    tx: &watch::Sender<Progress>,
) -> bool {
    if let Some(ceiling) = app.ceiling {
        let app2 = app.clone();
        let over = match tokio::task::spawn_blocking(move || app2.cache.get_cache_size()).await {
            Ok(Ok(current)) => current.saturating_add(size) > ceiling,
            Ok(Err(e)) => {
                app.note_driver_error(&e, "get-cache-size");
                true
            }
            Err(_) => true,
        };
        if over {
            inc(&app.metrics.not_cached_ceiling);
            info!(image_id = %id, "not cached: it would push the cache over its ceiling");
            return false;
        }
    }
    let Some(_room) = Admission::admit(app, id, size).await else {
        return false;
    };
    match free_space(app.cache.root()) {
        Ok(free) if free < size.saturating_add(app.limits.disk_reserve) => {
            inc(&app.metrics.not_cached_disk);
            warn!(
                image_id = %id,
                size,
                free,
                reserve = app.limits.disk_reserve,
                "not cached: the cache's file system has too little free space"
            );
            return false;
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the cache's free space"),
    }
    let checksum = tx
        .borrow()
        .start
        .as_ref()
        .and_then(|s| s.md5.as_deref())
        .and_then(|hex| format!("md5:{hex}").parse::<Checksum>().ok());
    let app2 = app.clone();
    let id2 = id.to_string();
    let spool = spool.clone();
    let result = tokio::task::spawn_blocking(move || {
        app2.cache.cache_verified(&id2, &spool, checksum.as_ref())
    })
    .await;
    match result {
        Ok(Ok(_)) => {
            inc(&app.metrics.images_cached);
            true
        }
        Ok(Err(Error::AlreadyCached(_) | Error::BeingCached(_))) => false,
        Ok(Err(e)) => {
            inc(&app.metrics.cache_write_failures);
            warn!(image_id = %id, error = %e, "served but not cached");
            if matches!(
                e,
                Error::Io {
                    code: image_cache::error::IoCode::NoSpace,
                    ..
                }
            ) {
                // Its file went to invalid/: remove it now, not at the next
                // clean, so the disk is not left full.
                let app = app.clone();
                tokio::spawn(async move {
                    let _ = super::background::clean_once(&app).await;
                });
            }
            false
        }
        Err(e) => {
            warn!(image_id = %id, "commit task: {e}");
            false
        }
    }
}

/// Admission: fills keep the cache under its max size by evicting least
/// recently used images before they write, so the cache does not stay over
/// it until the next prune. One fill decides at a time (the lock), and the
/// fills admitted whose images are not cached yet count as if they were, so
/// fills running together cannot each find room that only one of them has:
/// the cache stays under the max size, give or take one image committed
/// while a decision is made (or written beside the server by a CLI).
pub struct Admission {
    /// Most images one fill may evict (0: admission off).
    budget: u32,
    lock: tokio::sync::Mutex<()>,
    /// The fills admitted and not finished: token, image id, size.
    admitted: Arc<Mutex<Vec<(u64, String, u64)>>>,
    next: std::sync::atomic::AtomicU64,
}

/// Room made for one fill, held until it has committed (or given up).
pub struct Room {
    token: u64,
    admitted: Arc<Mutex<Vec<(u64, String, u64)>>>,
}

impl Drop for Room {
    fn drop(&mut self) {
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(token, ..)| *token != self.token);
    }
}

impl Admission {
    pub fn new(budget: u32) -> Admission {
        Admission {
            budget,
            lock: tokio::sync::Mutex::new(()),
            admitted: Default::default(),
            next: Default::default(),
        }
    }

    fn room(&self, id: &str, size: u64) -> Room {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.admitted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((token, id.to_string(), size));
        Room {
            token,
            admitted: self.admitted.clone(),
        }
    }

    /// Room for an image of `size` bytes under the max size, made by
    /// evicting least recently used images if needed; `None` (and the
    /// image is served, not cached) if it cannot be made within the
    /// budget. With admission off, room is always there.
    pub async fn admit(app: &Arc<App>, id: &str, size: u64) -> Option<Room> {
        let this = &app.admission;
        if this.budget == 0 {
            return Some(this.room(id, 0));
        }
        let max_size = app.tunables.read().unwrap().max_size;
        let refuse = |why: &str| {
            inc(&app.metrics.not_cached_admission);
            info!(image_id = %id, size, max_size, "not cached: {why}");
            None
        };
        if size > max_size {
            return refuse("the image alone is larger than the cache's max size");
        }
        let _one = this.lock.lock().await;
        let (app2, budget) = (app.clone(), this.budget);
        let made = tokio::task::spawn_blocking(move || {
            make_room(&app2, max_size.saturating_sub(size), budget)
        })
        .await;
        match made {
            Ok(Ok(true)) => Some(this.room(id, size)),
            Ok(Ok(false)) => {
                refuse("room under the max size needs more evictions than --fill-evict-budget")
            }
            Ok(Err(e)) => {
                app.note_driver_error(&e, "admission");
                None
            }
            Err(_) => None,
        }
    }
}

/// Evict least recently used images until the cache, with the fills
/// admitted before and not cached yet, holds at most `target` bytes, at
/// most `budget` of them; false (nothing evicted) if that many are not
/// enough.
fn make_room(app: &App, target: u64, budget: u32) -> Result<bool, Error> {
    // The size first, then which admitted fills it does not hold yet: an
    // image committed in between is counted in neither (one image over at
    // worst), never in both (an eviction too many).
    let mut current = app.cache.get_cache_size()?;
    let admitted = app
        .admission
        .admitted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    for (_, id, size) in admitted {
        if !app.cache.is_cached(&id)? {
            current = current.saturating_add(size);
        }
    }
    let Some(needed) = current.checked_sub(target).filter(|n| *n > 0) else {
        return Ok(true);
    };
    // LRU order from every access counted so far.
    app.hits.flush();
    let lru = app.cache.get_least_recently_accessed_batch(budget)?;
    let mut freed = 0u64;
    let mut victims = Vec::new();
    for entry in lru {
        if freed >= needed {
            break;
        }
        freed += entry.size;
        victims.push(entry);
    }
    if freed < needed {
        return Ok(false);
    }
    for victim in victims {
        match app.cache.delete_cached_image(&victim.image_id) {
            Ok(()) | Err(Error::NotFound(_)) => {
                inc(&app.metrics.evictions);
                inc(&app.metrics.admission_evictions);
                add(&app.metrics.evicted_bytes, victim.size);
                add(&app.metrics.admission_evicted_bytes, victim.size);
                info!(image_id = %victim.image_id, size = victim.size, "evicted to admit a fill");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Bytes free for an unprivileged writer on the file system of `path`.
pub fn free_space(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path has a NUL byte"))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and an out-pointer to a zeroed statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

fn write_at(file: &File, buf: &[u8], at: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, at)
}

/// The digests a fill computes: MD5 always (recorded with the image, sent
/// as `Content-MD5` on hits), and the upstream's `os_hash` algorithm.
struct Hashers {
    md5: Hasher,
    /// For the upstream's `os_hash`, when it gave one.
    other: Option<Hasher>,
}

impl Hashers {
    fn new(start: &Start) -> Hashers {
        Hashers {
            md5: Hasher::new(Algorithm::Md5),
            other: start.hash.as_ref().map(|c| Hasher::new(c.algorithm)),
        }
    }

    /// A placeholder while the real ones are on a blocking thread.
    fn empty() -> Hashers {
        Hashers {
            md5: Hasher::new(Algorithm::Md5),
            other: None,
        }
    }

    fn update(&mut self, bytes: &Bytes) {
        self.md5.update(bytes);
        if let Some(h) = self.other.as_mut() {
            h.update(bytes);
        }
    }

    /// Compare with what the upstream said: the image's MD5 (hex), which
    /// the commit records, or what did not match.
    fn verify(self, start: &Start) -> Result<String, String> {
        let md5 = self.md5.finish();
        if let Some(expected) = start.md5.as_deref()
            && expected != md5
        {
            return Err(format!(
                "does not match its MD5 (expected {expected}, got {md5})"
            ));
        }
        if let (Some(expected), Some(h)) = (start.hash.as_ref(), self.other) {
            let actual = h.finish();
            if actual != expected.hex {
                return Err(format!(
                    "does not match its {} (expected {}, got {actual})",
                    expected.algorithm.name(),
                    expected.hex
                ));
            }
        }
        Ok(md5)
    }
}

/// The minimum rate: each window must bring `min` bytes per second.
struct Rate {
    min: u64,
    window: Duration,
    began: Instant,
    bytes: u64,
}

impl Rate {
    fn new(min: u64, window: Duration) -> Rate {
        Rate {
            min,
            window,
            began: Instant::now(),
            bytes: 0,
        }
    }

    fn check(&mut self, n: u64) -> Result<(), String> {
        self.bytes += n;
        let elapsed = self.began.elapsed();
        if self.min == 0 || elapsed < self.window {
            return Ok(());
        }
        let need = (self.min as f64 * elapsed.as_secs_f64()) as u64;
        if self.bytes < need {
            return Err(format!(
                "{} bytes in {:.0} s, under the minimum of {} bytes/s",
                self.bytes,
                elapsed.as_secs_f64(),
                self.min
            ));
        }
        self.began = Instant::now();
        self.bytes = 0;
        Ok(())
    }
}

/// The spool directory can hold unnamed files.
pub fn spool_dir_usable(dir: &Path) -> Result<(), String> {
    tempfile::tempfile_in(dir)
        .map(|_| ())
        .map_err(|e| format!("spool directory {}: {e}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_wait_for_the_verdict() {
        let mut p = Progress {
            written: 99,
            ..Progress::default()
        };
        assert_eq!(p.readable(None), 99);
        assert_eq!(p.readable(Some(10)), 0);
        p.outcome = Some(Outcome::Complete);
        p.written = 100;
        assert_eq!(p.readable(Some(10)), 10);
    }

    #[test]
    fn a_trickle_fails_the_rate() {
        let mut r = Rate::new(1000, Duration::ZERO);
        r.began -= Duration::from_secs(10);
        assert!(r.check(100).is_err());
        let mut r = Rate::new(1000, Duration::ZERO);
        r.began -= Duration::from_secs(10);
        assert!(r.check(20_000).is_ok());
        let mut r = Rate::new(0, Duration::ZERO);
        assert!(r.check(0).is_ok());
    }
}
