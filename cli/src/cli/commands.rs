//! What each command does and prints.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use image_cache::contract;
use image_cache::runtime::{Inspection, default_artifact_dir};
use image_cache::signature::{self, SigningKey, TrustedKeys};
use image_cache::{Checksum, DriverSource, Error, Grants, ImageCache, Limits, Runtime};
use serde_json::{Value, json};

use super::format::{Table, count, human_size, iso_utc, local_time};
use super::progress::Progress;
use super::{Command, DriversAction, Failure, Settings, outln, stdin_is_terminal, stdout_failure};

/// Inputs at least this large get a progress line (on a terminal).
const PROGRESS_MIN_BYTES: u64 = 64 << 20;

type Out<'a> = io::StdoutLock<'a>;
type Outcome = Result<(), Failure>;

pub fn run(settings: &Settings, command: &Command) -> Outcome {
    let mut out = io::stdout().lock();
    match command {
        Command::Drivers { action: None } => drivers(settings, &mut out)?,
        Command::Drivers {
            action: Some(action),
        } => match action {
            DriversAction::Inspect { path } => inspect(settings, path, &mut out)?,
            DriversAction::Keygen {
                secret_key,
                public_key,
            } => keygen(settings, secret_key, public_key, &mut out)?,
            DriversAction::Sign {
                key,
                detached,
                output,
                component,
            } => sign(
                settings,
                key,
                *detached,
                output.as_deref(),
                component,
                &mut out,
            )?,
            DriversAction::Verify { key, component } => verify(settings, key, component, &mut out)?,
            DriversAction::Pull { reference } => pull(settings, reference, &mut out)?,
            DriversAction::Push {
                component,
                reference,
            } => push(settings, component, reference, &mut out)?,
        },
        Command::Db { action } => db(settings, action, &mut out)?,
        Command::HelpReference => help_reference(&mut out)?,
        command => {
            let cache = settings.open()?;
            let cache = &cache;
            let s = settings;
            let o = &mut out;
            match command {
                Command::ListCached => list_cached(s, cache, o)?,
                Command::ListQueued => list_queued(s, cache, o)?,
                Command::Queue { ids } => queue(s, cache, o, ids)?,
                Command::DeleteQueued { id } => delete_queued(s, cache, o, id)?,
                Command::DeleteAllQueued => delete_all_queued(s, cache, o)?,
                Command::Cache { id, from, checksum } => {
                    cache_image(s, cache, o, id, from, checksum.as_ref())?
                }
                Command::Read { id, to } => read(s, cache, o, id, to.as_deref())?,
                Command::DeleteCached { id } => delete_cached(s, cache, o, id)?,
                Command::DeleteAllCached { force } => delete_all_cached(s, cache, o, *force)?,
                Command::Prune { max_size } => prune(s, cache, o, max_size.unwrap_or(s.max_size))?,
                Command::Clean { stall_time } => {
                    clean(s, cache, o, stall_time.unwrap_or(s.stall_time))?
                }
                Command::Prefetch { source } => prefetch(s, cache, o, source)?,
                Command::Status { id } => status(s, cache, o, id)?,
                Command::Size => size(s, cache, o)?,
                Command::Nodes { id } => nodes(s, cache, o, id)?,
                Command::Drivers { .. } | Command::Db { .. } | Command::HelpReference => {
                    unreachable!("handled above")
                }
                Command::Serve(_) | Command::Warm(_) => {
                    unreachable!("cli::main runs the server and warm")
                }
            }
        }
    }
    out.flush().map_err(stdout_failure)
}

fn print_json(out: &mut Out, value: &Value) -> Outcome {
    let text = serde_json::to_string_pretty(value).expect("JSON values serialize");
    outln!(out, "{text}");
    Ok(())
}

fn sized(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", human_size(bytes))
}

fn seconds(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "0s".to_string(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3_600 == 0 => format!("{}h", s / 3_600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn list_cached(s: &Settings, cache: &ImageCache, out: &mut Out) -> Outcome {
    let images = cache.get_cached_images()?;
    let total = image_cache::driver::saturating_total(images.iter().map(|i| i.size));
    if s.json {
        let records: Vec<Value> = images
            .iter()
            .map(|i| {
                json!({
                    "image_id": i.image_id,
                    "size": i.size,
                    "hits": i.hits,
                    "last_accessed": iso_utc(i.last_accessed),
                    "last_accessed_unix": i.last_accessed,
                    "last_modified": iso_utc(i.last_modified),
                    "last_modified_unix": i.last_modified,
                })
            })
            .collect();
        return print_json(
            out,
            &json!({"images": records, "count": images.len(), "total_size": total}),
        );
    }
    if images.is_empty() {
        outln!(out, "no images cached in {}", cache.root().display());
        return Ok(());
    }
    let mut table = Table::new(&[
        ("ID", false),
        ("SIZE", true),
        ("HITS", true),
        ("LAST ACCESSED", false),
        ("LAST MODIFIED", false),
    ]);
    for i in &images {
        table.row(vec![
            i.image_id.clone(),
            human_size(i.size),
            i.hits.to_string(),
            local_time(i.last_accessed),
            local_time(i.last_modified),
        ]);
    }
    write!(out, "{}", table.render()).map_err(stdout_failure)?;
    outln!(
        out,
        "total: {}, {}",
        count(images.len() as u64, "image", "images"),
        sized(total)
    );
    Ok(())
}

fn list_queued(s: &Settings, cache: &ImageCache, out: &mut Out) -> Outcome {
    let queued = cache.get_queued_images()?;
    if s.json {
        return print_json(out, &json!({"queued": queued, "count": queued.len()}));
    }
    if queued.is_empty() {
        outln!(out, "no images queued");
        return Ok(());
    }
    for id in &queued {
        outln!(out, "{id}");
    }
    outln!(
        out,
        "total: {} queued (oldest first)",
        count(queued.len() as u64, "image", "images")
    );
    Ok(())
}

/// Why an image could not be queued, in words.
fn not_queued_reason(cache: &ImageCache, id: &str) -> Result<&'static str, Failure> {
    Ok(if cache.is_cached(id)? {
        "already cached"
    } else if cache.is_being_cached(id)? {
        "being cached"
    } else {
        "already queued"
    })
}

fn queue(s: &Settings, cache: &ImageCache, out: &mut Out, ids: &[String]) -> Outcome {
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for id in ids {
        match cache.queue_image(id) {
            Ok(true) => results.push(json!({"image_id": id, "queued": true})),
            Ok(false) => {
                let reason = not_queued_reason(cache, id)?;
                results.push(json!({"image_id": id, "queued": false, "reason": reason}));
            }
            Err(e) => {
                results.push(json!({"image_id": id, "queued": false, "error": e.to_string()}));
                errors.push(e);
            }
        }
    }
    if ids.len() == 1
        && let Some(e) = errors.pop()
    {
        return Err(e.into());
    }
    if s.json {
        print_json(out, &json!({"results": results}))?;
    } else {
        for r in &results {
            let id = r["image_id"].as_str().unwrap_or_default();
            if r["queued"] == true {
                outln!(out, "queued image {id:?}");
            } else if let Some(reason) = r["reason"].as_str() {
                outln!(out, "image {id:?} not queued: {reason}");
            } else {
                let error = r["error"].as_str().unwrap_or_default();
                outln!(out, "image {id:?} not queued: {error}");
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Failure::Reported(format!(
            "{} of {} could not be queued",
            errors.len(),
            count(ids.len() as u64, "image", "images")
        )))
    }
}

fn delete_queued(s: &Settings, cache: &ImageCache, out: &mut Out, id: &str) -> Outcome {
    if !cache.is_queued(id)? {
        return Err(Failure::op(
            "not-queued",
            format!("image {id:?} is not queued; nothing deleted"),
        ));
    }
    cache.delete_queued_image(id)?;
    if s.json {
        return print_json(out, &json!({"image_id": id, "deleted": true}));
    }
    outln!(out, "removed image {id:?} from the queue");
    Ok(())
}

fn delete_all_queued(s: &Settings, cache: &ImageCache, out: &mut Out) -> Outcome {
    let n = cache.delete_all_queued_images()?;
    if s.json {
        return print_json(out, &json!({"deleted": n}));
    }
    outln!(
        out,
        "removed {} from the queue",
        count(n, "image", "images")
    );
    Ok(())
}

/// The error of a failed caching, saying that nothing was cached.
fn not_cached(e: Error) -> Failure {
    match e {
        e @ (Error::ChecksumMismatch { .. } | Error::Source(_) | Error::Sink(_)) => {
            Failure::op(e.kind(), format!("{e}; nothing was cached"))
        }
        e => e.into(),
    }
}

fn cache_image(
    s: &Settings,
    cache: &ImageCache,
    out: &mut Out,
    id: &str,
    from: &Path,
    checksum: Option<&Checksum>,
) -> Outcome {
    let progress = !s.quiet && io::stderr().is_terminal();
    let label = format!("caching {id}");
    let bytes = if from == Path::new("-") {
        let stdin = io::stdin();
        if stdin.is_terminal() {
            return Err(Failure::Usage(
                "refusing to read an image from a terminal: pipe the bytes into --from - \
                 or give a file"
                    .into(),
            ));
        }
        let input = stdin.lock();
        if progress {
            cache.cache_reader(id, checksum, Progress::new(input, label, None))
        } else {
            cache.cache_reader(id, checksum, input)
        }
    } else {
        let meta = fs::metadata(from)
            .map_err(|e| Failure::op("source", format!("image source {}: {e}", from.display())))?;
        if meta.is_dir() {
            return Err(Failure::op(
                "source",
                format!("image source {}: is a directory", from.display()),
            ));
        }
        // A large file, or a pipe of unknown length, gets a progress line
        // (and the plain copy instead of copy_file_range).
        if progress && (!meta.is_file() || meta.len() >= PROGRESS_MIN_BYTES) {
            let file = File::open(from).map_err(|e| {
                Failure::op("source", format!("image source {}: {e}", from.display()))
            })?;
            let total = meta.is_file().then_some(meta.len());
            cache.cache_reader(id, checksum, Progress::new(file, label, total))
        } else {
            cache.cache_file(id, from, checksum)
        }
    }
    .map_err(not_cached)?;
    if s.json {
        return print_json(
            out,
            &json!({
                "image_id": id,
                "bytes": bytes,
                "checksum": checksum.map(|c| c.to_string()),
            }),
        );
    }
    let verified = if checksum.is_some() {
        ", checksum verified"
    } else {
        ""
    };
    outln!(out, "cached image {id:?}: {}{verified}", sized(bytes));
    Ok(())
}

fn read(s: &Settings, cache: &ImageCache, out: &mut Out, id: &str, to: Option<&Path>) -> Outcome {
    let Some(to) = to else {
        if out.is_terminal() {
            return Err(Failure::Usage(
                "refusing to write image bytes to a terminal: redirect stdout or use --to FILE"
                    .into(),
            ));
        }
        let mut reader = cache.open_for_read(id)?;
        let size = reader
            .size()
            .map_err(|e| Failure::op("io", format!("image {id:?}: {e}")))?;
        // Copy exactly the file's bytes, so the hit is counted below, after
        // the bytes were delivered, and never for a read cut short.
        let n = io::copy(&mut (&mut reader).take(size), out).map_err(stdout_failure)?;
        out.flush().map_err(stdout_failure)?;
        if n != size {
            return Err(Failure::op(
                "io",
                format!("image {id:?} ended after {n} of {size} bytes"),
            ));
        }
        reader.finish()?;
        return Ok(());
    };

    if to.is_dir() {
        return Err(Failure::op(
            "io",
            format!("{}: is a directory", to.display()),
        ));
    }
    let name = to
        .file_name()
        .ok_or_else(|| Failure::Usage(format!("--to {}: not a file name", to.display())))?;
    let mut reader = cache.open_for_read(id)?;
    let size = reader
        .size()
        .map_err(|e| Failure::op("io", format!("image {id:?}: {e}")))?;
    let temp = temp_beside(to, name);
    let written = (|| -> io::Result<u64> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let n = io::copy(&mut (&mut reader).take(size), &mut file)?;
        file.sync_all()?;
        if n != size {
            return Err(io::Error::other(format!(
                "image {id:?} ended after {n} of {size} bytes"
            )));
        }
        fs::rename(&temp, to)?;
        Ok(n)
    })();
    let n = match written {
        Ok(n) => n,
        Err(e) => {
            let _ = fs::remove_file(&temp);
            return Err(Failure::op("io", format!("writing {}: {e}", to.display())));
        }
    };
    reader.finish()?;
    if s.json {
        return print_json(
            out,
            &json!({"image_id": id, "path": to.display().to_string(), "bytes": n}),
        );
    }
    outln!(out, "wrote image {id:?} to {}: {}", to.display(), sized(n));
    Ok(())
}

fn delete_cached(s: &Settings, cache: &ImageCache, out: &mut Out, id: &str) -> Outcome {
    if !cache.is_cached(id)? {
        let note = if cache.is_being_cached(id)? {
            " (it is being cached)"
        } else {
            ""
        };
        return Err(Failure::op(
            "not-found",
            format!("image {id:?} is not cached{note}; nothing deleted"),
        ));
    }
    let size = cache.get_image_size(id).unwrap_or(0);
    cache.delete_cached_image(id)?;
    if s.json {
        return print_json(out, &json!({"image_id": id, "deleted": true, "size": size}));
    }
    outln!(out, "deleted cached image {id:?}: {}", sized(size));
    Ok(())
}

fn delete_all_cached(s: &Settings, cache: &ImageCache, out: &mut Out, force: bool) -> Outcome {
    if !force {
        if !stdin_is_terminal() {
            return Err(Failure::Usage(
                "delete-all-cached asks for confirmation, but stdin is not a terminal: \
                 pass --force to delete every cached image"
                    .into(),
            ));
        }
        let images = cache.get_cached_images()?;
        if images.is_empty() {
            if s.json {
                return print_json(out, &json!({"deleted": 0}));
            }
            outln!(out, "no images cached; nothing to delete");
            return Ok(());
        }
        let total = image_cache::driver::saturating_total(images.iter().map(|i| i.size));
        let mut err = io::stderr().lock();
        let _ = write!(
            err,
            "Delete all {} ({}) in {}? [y/N] ",
            count(images.len() as u64, "cached image", "cached images"),
            human_size(total),
            cache.root().display()
        );
        let _ = err.flush();
        drop(err);
        let mut answer = String::new();
        let _ = io::stdin().lock().read_line(&mut answer);
        if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
            return Err(Failure::Reported("not confirmed; nothing deleted".into()));
        }
    }
    let n = cache.delete_all_cached_images()?;
    if s.json {
        return print_json(out, &json!({"deleted": n}));
    }
    outln!(out, "deleted {}", count(n, "cached image", "cached images"));
    Ok(())
}

fn removed_json(files: &[image_cache::RemovedFile]) -> Vec<Value> {
    files
        .iter()
        .map(|f| json!({"image_id": f.image_id, "size": f.size}))
        .collect()
}

fn prune(s: &Settings, cache: &ImageCache, out: &mut Out, max_size: u64) -> Outcome {
    let r = cache.prune(max_size)?;
    if s.json {
        print_json(
            out,
            &json!({
                "max_size": max_size,
                "files_removed": r.removed.len(),
                "bytes_removed": r.bytes_removed,
                "size_after": r.size_after,
                "removed": removed_json(&r.removed),
                "failures": r.failures,
            }),
        )?;
    } else {
        for f in &r.removed {
            outln!(out, "evicted {}  {}", f.image_id, human_size(f.size));
        }
        for f in &r.failures {
            outln!(out, "failed: {f}");
        }
        if r.removed.is_empty() && r.failures.is_empty() {
            outln!(
                out,
                "nothing to prune: the cache holds {}, within the maximum {}",
                human_size(r.size_after),
                human_size(max_size)
            );
        } else {
            outln!(
                out,
                "pruned {}, {}; the cache now holds {} (maximum {})",
                count(r.removed.len() as u64, "image", "images"),
                sized(r.bytes_removed),
                human_size(r.size_after),
                human_size(max_size)
            );
        }
    }
    if r.failures.is_empty() {
        Ok(())
    } else {
        Err(Failure::Reported(format!(
            "{} could not be evicted",
            count(r.failures.len() as u64, "image", "images")
        )))
    }
}

fn clean(s: &Settings, cache: &ImageCache, out: &mut Out, stall_time: Duration) -> Outcome {
    let r = cache.clean(stall_time)?;
    let bytes = image_cache::driver::saturating_total(
        r.invalid.iter().chain(&r.incomplete).map(|f| f.size),
    );
    if s.json {
        print_json(
            out,
            &json!({
                "stall_time": stall_time.as_secs(),
                "invalid_removed": r.invalid.len(),
                "incomplete_removed": r.incomplete.len(),
                "bytes_removed": bytes,
                "invalid": removed_json(&r.invalid),
                "incomplete": removed_json(&r.incomplete),
                "failures": r.failures,
            }),
        )?;
    } else {
        for f in &r.invalid {
            outln!(
                out,
                "removed invalid {}  {}",
                f.image_id,
                human_size(f.size)
            );
        }
        for f in &r.incomplete {
            outln!(
                out,
                "removed stalled incomplete {}  {}",
                f.image_id,
                human_size(f.size)
            );
        }
        for f in &r.failures {
            outln!(out, "failed: {f}");
        }
        outln!(
            out,
            "cleaned: {} and {} (stalled longer than {}) removed, {}; {}",
            count(r.invalid.len() as u64, "invalid file", "invalid files"),
            count(
                r.incomplete.len() as u64,
                "incomplete file",
                "incomplete files"
            ),
            seconds(stall_time),
            sized(bytes),
            count(r.failures.len() as u64, "failure", "failures"),
        );
    }
    if r.failures.is_empty() {
        Ok(())
    } else {
        Err(Failure::Reported(format!(
            "{} could not be removed",
            count(r.failures.len() as u64, "file", "files")
        )))
    }
}

fn prefetch(s: &Settings, cache: &ImageCache, out: &mut Out, source: &Path) -> Outcome {
    match fs::metadata(source) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Failure::op(
                "source",
                format!("prefetch source {}: not a directory", source.display()),
            ));
        }
        Err(e) => {
            return Err(Failure::op(
                "source",
                format!("prefetch source {}: {e}", source.display()),
            ));
        }
    }
    let queued = cache.get_queued_images()?;
    let mut results = Vec::new();
    let mut failed = 0u64;
    let width = queued
        .iter()
        .map(|id| id.chars().count())
        .max()
        .unwrap_or(0);
    for id in &queued {
        let path = source.join(id);
        let result = if !path.is_file() {
            failed += 1;
            json!({"image_id": id, "status": "failed",
                   "error": format!("no image file {}", path.display())})
        } else {
            match cache.cache_file(id, &path, None) {
                Ok(bytes) => json!({"image_id": id, "status": "cached", "bytes": bytes}),
                Err(Error::AlreadyCached(_)) => {
                    if let Err(e) = cache.delete_queued_image(id) {
                        log::warn!("removing image {id:?} from the queue: {e}");
                    }
                    json!({"image_id": id, "status": "already-cached"})
                }
                Err(Error::BeingCached(_)) => json!({"image_id": id, "status": "being-cached"}),
                Err(e) => {
                    failed += 1;
                    json!({"image_id": id, "status": "failed", "error": e.to_string()})
                }
            }
        };
        if !s.json {
            let status = result["status"].as_str().unwrap_or_default();
            let detail = match status {
                "cached" => human_size(result["bytes"].as_u64().unwrap_or(0)),
                "failed" => format!(
                    "{}; left queued",
                    result["error"].as_str().unwrap_or_default()
                ),
                "already-cached" => "was already cached; removed from the queue".into(),
                _ => "another writer is caching it; left queued".into(),
            };
            outln!(out, "{status:<14}  {id:<width$}  {detail}");
        }
        results.push(result);
    }
    let cached = results.iter().filter(|r| r["status"] == "cached").count();
    if s.json {
        print_json(
            out,
            &json!({"results": results, "queued": queued.len(), "cached": cached, "failed": failed}),
        )?;
    } else if queued.is_empty() {
        outln!(out, "no images queued; nothing to prefetch");
    } else {
        outln!(
            out,
            "prefetched {cached} of {}; {failed} failed",
            count(queued.len() as u64, "queued image", "queued images")
        );
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::Reported(format!(
            "{failed} of {} could not be prefetched (left queued)",
            count(queued.len() as u64, "queued image", "queued images")
        )))
    }
}

fn status(s: &Settings, cache: &ImageCache, out: &mut Out, id: &str) -> Outcome {
    let cached = cache.is_cached(id)?;
    let being_cached = cache.is_being_cached(id)?;
    let queued = cache.is_queued(id)?;
    let size = if cached {
        match cache.get_image_size(id) {
            Ok(size) => Some(size),
            Err(Error::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let hits = cache.get_hit_count(id)?;
    let state = if cached {
        "cached"
    } else if being_cached {
        "being-cached"
    } else if queued {
        "queued"
    } else {
        "absent"
    };
    if s.json {
        return print_json(
            out,
            &json!({
                "image_id": id,
                "state": state,
                "cached": cached,
                "being_cached": being_cached,
                "queued": queued,
                "size": size,
                "hits": hits,
            }),
        );
    }
    let queued_too = if queued && state != "queued" {
        "; also queued"
    } else {
        ""
    };
    match state {
        "cached" => outln!(
            out,
            "image {id:?} is cached: {}, {}{queued_too}",
            sized(size.unwrap_or(0)),
            count(hits, "hit", "hits")
        ),
        "being-cached" => outln!(
            out,
            "image {id:?} is being cached (not complete yet){queued_too}"
        ),
        "queued" => outln!(out, "image {id:?} is queued for prefetching (not cached)"),
        _ => outln!(
            out,
            "image {id:?} is not cached (not being cached, not queued)"
        ),
    }
    Ok(())
}

fn size(s: &Settings, cache: &ImageCache, out: &mut Out) -> Outcome {
    let bytes = cache.get_cache_size()?;
    if s.json {
        return print_json(
            out,
            &json!({"bytes": bytes, "human": human_size(bytes), "max_size": s.max_size}),
        );
    }
    outln!(
        out,
        "{} cached (maximum {})",
        sized(bytes),
        human_size(s.max_size)
    );
    Ok(())
}

fn nodes(s: &Settings, cache: &ImageCache, out: &mut Out, id: &str) -> Outcome {
    let nodes = cache.get_cached_nodes(id)?;
    if s.json {
        return print_json(out, &json!({"image_id": id, "nodes": nodes}));
    }
    if nodes.is_empty() {
        outln!(out, "image {id:?} is cached on no node");
    }
    for node in &nodes {
        outln!(out, "{node}");
    }
    Ok(())
}

/// Built-in drivers (and the one --driver names, if it is a file), each
/// with its contract version, imports and grants.
fn drivers(s: &Settings, out: &mut Out) -> Outcome {
    let runtime = Runtime::new(Limits::default(), default_artifact_dir())?;
    let mut sources: Vec<(DriverSource, String)> = image_cache::builtin::ALL
        .iter()
        .map(|b| (DriverSource::Builtin(b.name), b.description.to_string()))
        .collect();
    if let DriverSource::File(path) = s.driver_source()? {
        sources.push((DriverSource::File(path), "component file (--driver)".into()));
    }
    let mut entries = Vec::new();
    for (source, description) in sources {
        let inspection = runtime.inspect(&source)?;
        let builtin = matches!(source, DriverSource::Builtin(_));
        let granted = match &source {
            DriverSource::Builtin(name) => image_cache::builtin::find(name)
                .map(|b| Grants::of(b.grants))
                .unwrap_or(Grants::NONE),
            DriverSource::File(_) => s.grants,
        };
        let mut entry = inspection_json(&source.name(), &inspection, granted);
        if let DriverSource::File(path) = &source {
            entry["signature"] = signature_json(s, path)?;
        }
        entry["description"] = json!(description);
        entry["builtin"] = json!(builtin);
        entry["default"] = json!(source.name() == "sqlite");
        entries.push(entry);
    }
    if s.json {
        return print_json(
            out,
            &json!({"drivers": entries, "contract": contract::VERSION.to_string(), "supported": contract::SUPPORTED}),
        );
    }
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            outln!(out);
        }
        let default = if e["default"] == true {
            " (default)"
        } else {
            ""
        };
        outln!(
            out,
            "{}{default}: {}",
            e["name"].as_str().unwrap_or_default(),
            e["description"].as_str().unwrap_or_default()
        );
        print_inspection(out, e)?;
    }
    outln!(out);
    outln!(
        out,
        "this host runs contract {} ({}); a driver imports only image-cache:driver interfaces",
        contract::VERSION,
        contract::SUPPORTED
    );
    Ok(())
}

/// `db grants` and `db init`.
fn db(s: &Settings, action: &super::DbAction, out: &mut Out) -> Outcome {
    use image_cache::database::{Dialect, dialect_of_url, grant_statements, init_schema};
    match action {
        super::DbAction::Grants {
            role,
            database,
            mysql,
        } => {
            let dialect = if *mysql {
                Dialect::Mysql
            } else {
                s.database_url()
                    .and_then(|url| dialect_of_url(url).ok())
                    .unwrap_or(Dialect::Postgresql)
            };
            let statements = grant_statements(dialect, role, database);
            if s.json {
                return print_json(out, &json!({"statements": statements}));
            }
            match dialect {
                Dialect::Postgresql => outln!(
                    out,
                    "-- Run in database {database:?} as the owner of Glance's tables. The role \
                     ({role}) logs in\n-- and has nothing else (CREATE ROLE {role} LOGIN PASSWORD \
                     '...'; if it is new).\n-- On PostgreSQL before 15 the last line takes CREATE \
                     on schema public from everyone:\n-- give it back to the role Glance's \
                     migrations run as first (GRANT CREATE ON SCHEMA public TO glance;)."
                ),
                Dialect::Mysql => outln!(
                    out,
                    "-- Run as an administrator of the MySQL or MariaDB server. The account \
                     ({role}) has\n-- nothing else (CREATE USER '{role}'@'%' IDENTIFIED BY \
                     '...'; if it is new)."
                ),
            }
            for statement in statements {
                outln!(out, "{statement}");
            }
            Ok(())
        }
        super::DbAction::Init => {
            let url = s.database_url().ok_or_else(|| {
                Failure::Usage(
                    "db init needs the database: give --database-url, set \
                     image_cache_database_url, or [database] connection in the --config file"
                        .to_string(),
                )
            })?;
            init_schema(url, std::time::Duration::from_secs(30)).map_err(|e| {
                Failure::op("database", format!("db init: {}", super::own_words(e)))
            })?;
            if s.json {
                return print_json(
                    out,
                    &json!({"created": ["node_reference", "cached_images"]}),
                );
            }
            outln!(
                out,
                "Glance's cache tables (node_reference, cached_images) are in place"
            );
            Ok(())
        }
    }
}

/// `drivers inspect PATH`: what a component is, before anyone runs it.
pub fn inspect(s: &Settings, path: &Path, out: &mut Out) -> Outcome {
    let runtime = Runtime::new(Limits::default(), default_artifact_dir())?;
    let source = DriverSource::File(path.to_path_buf());
    let inspection = runtime.inspect(&source)?;
    let mut entry = inspection_json(&source.name(), &inspection, s.grants);
    entry["signature"] = signature_json(s, path)?;
    if s.json {
        return print_json(out, &entry);
    }
    outln!(out, "{}", path.display());
    print_inspection(out, &entry)
}

/// `drivers keygen`: a new key pair in two new files, the secret one
/// readable by its owner alone.
fn keygen(s: &Settings, secret: &Path, public: &Path, out: &mut Out) -> Outcome {
    if secret == public {
        return Err(Failure::Usage(
            "--secret-key and --public-key name the same file".into(),
        ));
    }
    for path in [secret, public] {
        if path.exists() {
            return Err(Failure::op(
                "io",
                format!(
                    "{}: already exists; a key file is never overwritten",
                    path.display()
                ),
            ));
        }
    }
    let keys = signature::generate_key_pair();
    write_new(secret, &keys.secret_key, 0o600)?;
    if let Err(e) = write_new(public, &keys.public_key, 0o644) {
        let _ = fs::remove_file(secret);
        return Err(e);
    }
    if s.json {
        return print_json(
            out,
            &json!({
                "key_id": keys.key_id,
                "secret_key": secret.display().to_string(),
                "public_key": public.display().to_string(),
            }),
        );
    }
    outln!(out, "key id {}", keys.key_id);
    outln!(
        out,
        "  secret key: {} (sign with it; keep it away from the hosts that load drivers)",
        secret.display()
    );
    outln!(
        out,
        "  public key: {} (trust it with --driver-trust or image_cache_driver_trusted_keys)",
        public.display()
    );
    Ok(())
}

/// A file that did not exist, with `mode`.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Outcome {
    use std::os::unix::fs::OpenOptionsExt;
    let written = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)?;
        file.write_all(bytes)?;
        file.sync_all()
    })();
    written.map_err(|e| Failure::op("io", format!("writing {}: {e}", path.display())))
}

/// Replace (or make) `path` with `bytes` through a temporary file beside
/// it, renamed when complete; a replaced file keeps its permissions.
/// A temporary file name beside `path` (same file system, so a rename puts
/// the finished file in place at once).
fn temp_beside(path: &Path, name: &std::ffi::OsStr) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    dir.join(format!(
        ".{}.image-cache-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ))
}

fn replace_file(path: &Path, bytes: &[u8]) -> Outcome {
    let name = path
        .file_name()
        .ok_or_else(|| Failure::Usage(format!("{}: not a file name", path.display())))?;
    let temp = temp_beside(path, name);
    let written = (|| -> io::Result<()> {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.write_all(bytes)?;
        if let Ok(meta) = fs::metadata(path) {
            file.set_permissions(meta.permissions())?;
        }
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    written.map_err(|e| {
        let _ = fs::remove_file(&temp);
        Failure::op("io", format!("writing {}: {e}", path.display()))
    })
}

fn read_component(path: &Path) -> Result<Vec<u8>, Failure> {
    fs::read(path).map_err(|e| Failure::op("io", format!("{}: {e}", path.display())))
}

/// A component file's detached signature, if it has one.
fn read_detached(component: &Path) -> Result<Option<Vec<u8>>, Failure> {
    let path = signature::detached_path(component);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Failure::op("io", format!("{}: {e}", path.display()))),
    }
}

/// `drivers sign`: add a signature, embedded (in place or to --output) or
/// detached (COMPONENT.sig or --output, keeping the signatures already
/// there).
fn sign(
    s: &Settings,
    key: &Path,
    detached: bool,
    output: Option<&Path>,
    component: &Path,
    out: &mut Out,
) -> Outcome {
    let signer = SigningKey::from_file(key).map_err(|e| Failure::Usage(e.to_string()))?;
    let bytes = read_component(component)?;
    let refused = |e: signature::SignatureError| {
        Failure::op(
            "signature",
            format!("cannot sign {}: {e}", component.display()),
        )
    };
    let (written, signatures) = if detached {
        let target = output
            .map(Path::to_path_buf)
            .unwrap_or_else(|| signature::detached_path(component));
        let previous = match fs::read(&target) {
            Ok(previous) => Some(previous),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(Failure::op("io", format!("{}: {e}", target.display()))),
        };
        let sig = match &previous {
            Some(previous) => signature::sign_detached_adding(&bytes, previous, &signer),
            None => signature::sign(&bytes, &signer, true).map(|(_, sig)| sig.unwrap_or_default()),
        }
        .map_err(refused)?;
        replace_file(&target, &sig)?;
        let signatures = signature::signatures(&bytes, Some(&sig)).map_err(refused)?;
        (target, signatures)
    } else {
        let (signed, _) = signature::sign(&bytes, &signer, false).map_err(refused)?;
        let target = output.unwrap_or(component).to_path_buf();
        replace_file(&target, &signed)?;
        let beside = signature::detached_path(&target);
        if beside.exists() {
            log::warn!(
                "{} is no longer read: {} carries an embedded signature now",
                beside.display(),
                target.display()
            );
        }
        let signatures = signature::signatures(&signed, None).map_err(refused)?;
        (target, signatures)
    };
    let key_ids = signatures.map(|s| s.key_ids).unwrap_or_default();
    let form = if detached { "detached" } else { "embedded" };
    if s.json {
        return print_json(
            out,
            &json!({
                "component": component.display().to_string(),
                "written": written.display().to_string(),
                "form": form,
                "key_id": signer.key_id(),
                "key_ids": key_ids,
                "sha256": image_cache::runtime::sha256_hex(&read_component(&written)?),
            }),
        );
    }
    let place = if detached { "in" } else { "embedded in" };
    outln!(
        out,
        "signed {} with key id {}: the signature is {place} {}",
        component.display(),
        signer.key_id(),
        written.display()
    );
    let ids = if key_ids.len() == 1 { "id" } else { "ids" };
    outln!(
        out,
        "  it carries signatures by key {ids} {}",
        key_ids.join(", ")
    );
    Ok(())
}

/// `drivers pull`: a component from a registry into the store.
fn pull(s: &Settings, reference: &str, out: &mut Out) -> Outcome {
    let pulled = s.pull(reference)?;
    if s.json {
        return print_json(
            out,
            &json!({
                "reference": reference,
                "pinned": pulled.pinned,
                "manifest_digest": pulled.manifest_digest,
                "path": pulled.path.display().to_string(),
                "sha256": pulled.sha256,
                "from_store": pulled.from_store,
                "signature_checked": !s.driver_trust.is_empty(),
            }),
        );
    }
    outln!(out, "{}", pulled.path.display());
    outln!(out, "  sha256:    {}", pulled.sha256);
    outln!(out, "  manifest:  {}", pulled.manifest_digest);
    outln!(out, "  pinned:    {}", pulled.pinned);
    if pulled.from_store {
        outln!(out, "  (already in the store: nothing fetched)");
    }
    Ok(())
}

/// `drivers push`: a component file to a registry, in wkg's layout.
fn push(s: &Settings, component: &Path, reference: &str, out: &mut Out) -> Outcome {
    let parsed = super::oci::parse(reference)?;
    let pushed = super::oci::push(component, &parsed, s.plain_http)?;
    if s.json {
        return print_json(
            out,
            &json!({
                "component": component.display().to_string(),
                "reference": reference,
                "pinned": pushed.pinned,
                "manifest_digest": pushed.manifest_digest,
                "sha256": pushed.sha256,
            }),
        );
    }
    outln!(out, "pushed {} to {reference}", component.display());
    outln!(out, "  manifest:  {}", pushed.manifest_digest);
    outln!(out, "  sha256:    {}", pushed.sha256);
    outln!(out, "  pinned:    {}", pushed.pinned);
    Ok(())
}

/// `drivers verify`: the signatures found and which key verifies them;
/// exit 1 if none does.
fn verify(s: &Settings, keys: &[PathBuf], component: &Path, out: &mut Out) -> Outcome {
    let keys = if keys.is_empty() {
        s.trusted_keys()?.ok_or_else(|| {
            Failure::Usage(
                "drivers verify needs public keys: give --key FILE, or trust keys with \
                 --driver-trust"
                    .into(),
            )
        })?
    } else {
        std::sync::Arc::new(
            TrustedKeys::from_files(keys).map_err(|e| Failure::Usage(e.to_string()))?,
        )
    };
    let bytes = read_component(component)?;
    let detached = read_detached(component)?;
    let report = signature::verify_report(&bytes, detached.as_deref(), &keys)
        .map_err(|e| Failure::op("signature", format!("{}: {e}", component.display())))?;
    let signatures = report.signatures.as_ref();
    let verified_by: Vec<Value> = report
        .verified_by
        .iter()
        .map(|id| json!({"key_id": id, "file": keys.source(id)}))
        .collect();
    let verdict = || {
        Failure::Reported(format!(
            "{}: {}",
            component.display(),
            match signatures {
                None => "it carries no signature".to_string(),
                Some(_) => format!("no given key verifies it (keys: {})", keys.ids().join(", ")),
            }
        ))
    };
    if s.json {
        print_json(
            out,
            &json!({
                "component": component.display().to_string(),
                "sha256": image_cache::runtime::sha256_hex(&bytes),
                "signed": signatures.is_some(),
                "form": signatures.map(|s| s.form.to_string()),
                "signatures": signatures.map_or(0, |s| s.count),
                "key_ids": signatures.map(|s| s.key_ids.clone()).unwrap_or_default(),
                "without_key_id": signatures.map_or(0, |s| s.anonymous),
                "verified": report.verified(),
                "verified_by": verified_by,
            }),
        )?;
        return if report.verified() {
            Ok(())
        } else {
            Err(verdict())
        };
    }
    outln!(out, "{}", component.display());
    match signatures {
        None => outln!(out, "  signatures:  none"),
        Some(sigs) => {
            let mut ids = sigs.key_ids.clone();
            if sigs.anonymous > 0 {
                ids.push(format!("{} without a key id", sigs.anonymous));
            }
            outln!(out, "  signatures:  {} {}", sigs.count, sigs.form);
            outln!(out, "  key ids:     {}", ids.join(", "));
        }
    }
    for id in &report.verified_by {
        outln!(
            out,
            "  verified by: key id {id} ({})",
            keys.source(id).unwrap_or_default()
        );
    }
    if report.verified() {
        Ok(())
    } else {
        Err(verdict())
    }
}

/// Who signed a component file and whether the trusted keys (if any)
/// verify it, for `drivers inspect`.
fn signature_json(s: &Settings, path: &Path) -> Result<Value, Failure> {
    let bytes = read_component(path)?;
    let detached = read_detached(path)?;
    let trusted = s.trusted_keys()?;
    let keys = trusted.as_deref().cloned().unwrap_or_default();
    Ok(
        match signature::verify_report(&bytes, detached.as_deref(), &keys) {
            Ok(report) => match report.signatures {
                None => json!({"signed": false, "trusted": trusted.as_ref().map(|_| false)}),
                Some(sigs) => json!({
                    "signed": true,
                    "form": sigs.form.to_string(),
                    "signatures": sigs.count,
                    "key_ids": sigs.key_ids,
                    "without_key_id": sigs.anonymous,
                    "trusted": trusted.as_ref().map(|_| !report.verified_by.is_empty()),
                    "verified_by": report.verified_by,
                }),
            },
            Err(e) => json!({"signed": false, "error": e.to_string()}),
        },
    )
}

fn print_signature(out: &mut Out, sig: &Value) -> Outcome {
    if sig.is_null() {
        return Ok(());
    }
    let mut line = match sig["key_ids"].as_array() {
        _ if sig["error"].is_string() => sig["error"].as_str().unwrap_or_default().to_string(),
        _ if sig["signed"] != true => "none".to_string(),
        Some(ids) if !ids.is_empty() => format!(
            "{}, by key id {}",
            sig["form"].as_str().unwrap_or_default(),
            ids.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!(
            "{}, without a key id",
            sig["form"].as_str().unwrap_or_default()
        ),
    };
    match sig["trusted"].as_bool() {
        Some(true) => line.push_str(" (verified by a trusted key)"),
        Some(false) => line.push_str(" (no trusted key verifies it: the host refuses it)"),
        None => {}
    }
    outln!(out, "  signature:     {line}");
    Ok(())
}

fn inspection_json(name: &str, i: &Inspection, granted: Grants) -> Value {
    let needs: Vec<&str> = i.declared.needs.iter().map(|c| c.name()).collect();
    let missing: Vec<&str> = i
        .declared
        .needs
        .iter()
        .filter(|c| !granted.allows(**c))
        .map(|c| c.name())
        .collect();
    let info = match &i.declared.info {
        Some(info) => {
            json!({"name": info.name, "version": info.version, "description": info.description})
        }
        None => Value::Null,
    };
    let refused = match &i.refused {
        Some(why) => json!(why),
        None => Value::Null,
    };
    json!({
        "name": name,
        "sha256": i.sha256,
        "contract": i.declared.version,
        "contract_supported": i.declared.version.as_deref()
            .and_then(contract::Version::parse)
            .is_some_and(|v| v.is_supported()),
        "contract_adapted": i.declared.version.as_deref()
            .and_then(contract::Version::parse)
            .is_some_and(|v| v.is_adapted()),
        "imports": i.declared.imports,
        "grants_needed": needs,
        "granted": granted.names(),
        "not_granted": missing,
        "driver": info,
        "refused": refused,
    })
}

fn print_inspection(out: &mut Out, e: &Value) -> Outcome {
    let text = |v: &Value| v.as_str().unwrap_or("none").to_string();
    let list = |v: &Value| {
        let items: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| x.as_str().unwrap_or_default().to_string())
            .collect();
        if items.is_empty() {
            "none".to_string()
        } else {
            items.join(", ")
        }
    };
    if !e["driver"].is_null() {
        outln!(
            out,
            "  driver:        {} {}",
            text(&e["driver"]["name"]),
            text(&e["driver"]["version"])
        );
    }
    let supported = if e["contract_adapted"] == true {
        "supported through the adapter of an earlier contract"
    } else if e["contract_supported"] == true {
        "supported"
    } else {
        "NOT supported by this host"
    };
    outln!(
        out,
        "  contract:      image-cache:driver@{} ({supported})",
        text(&e["contract"])
    );
    outln!(out, "  sha256:        {}", text(&e["sha256"]));
    print_signature(out, &e["signature"])?;
    outln!(out, "  grants needed: fs, clock{}", {
        let needs = list(&e["grants_needed"]);
        if needs == "none" {
            String::new()
        } else {
            format!(", {needs}")
        }
    });
    if e["not_granted"].as_array().is_some_and(|a| !a.is_empty()) {
        outln!(
            out,
            "  not granted:   {} (the host refuses it unless granted)",
            list(&e["not_granted"])
        );
    }
    outln!(out, "  imports:");
    for import in e["imports"].as_array().into_iter().flatten() {
        outln!(out, "    {}", import.as_str().unwrap_or_default());
    }
    if !e["refused"].is_null() {
        outln!(out, "  refused:       {}", text(&e["refused"]));
    }
    Ok(())
}

/// `image-cache help-reference` (hidden): every command and option as
/// Markdown, walked from the clap definitions, for the book's CLI
/// reference (docs/src/reference/cli.md; tests/docs_reference.rs checks
/// that the file is this output). Environment values are never read:
/// only the variables' names are printed.
fn help_reference(out: &mut Out) -> Outcome {
    use clap::CommandFactory;
    let mut cli = super::Cli::command();
    cli.build();
    let mut doc = String::from(
        "# CLI and server reference\n\n\
         <!-- Generated from the clap definitions in cli/src by\n     \
         cargo run -q -p image-cache-cli -- help-reference > docs/src/reference/cli.md\n     \
         Do not edit: tests/docs_reference.rs fails when this file is stale. -->\n\n\
         Every command and option of `image-cache`, generated from the tool's own \
         argument definitions. `image-cache COMMAND --help` prints the same text; \
         every command also takes `-h`/`--help`, and `image-cache --version` prints \
         the version.\n",
    );
    reference_section(&mut cli, "", &mut doc);
    write!(out, "{doc}").map_err(stdout_failure)?;
    Ok(())
}

/// One command's section, then its subcommands' (depth first).
fn reference_section(cmd: &mut clap::Command, parent: &str, doc: &mut String) {
    use std::fmt::Write as _;
    let path = if parent.is_empty() {
        cmd.get_name().to_string()
    } else {
        format!("{parent} {}", cmd.get_name())
    };
    let usage = cmd.render_usage().to_string();
    let usage = usage.trim().trim_start_matches("Usage:").trim();
    let _ = write!(doc, "\n## `{path}`\n\n");
    if let Some(about) = cmd.get_long_about().or(cmd.get_about()) {
        let _ = write!(doc, "{}\n\n", sentence(&markdown_text(&about.to_string())));
    }
    let _ = writeln!(doc, "**Usage:** `{usage}`");
    if let Some(after) = cmd.get_after_long_help().or(cmd.get_after_help()) {
        let _ = write!(doc, "\n{}\n", markdown_text(&after.to_string()));
    }
    let subcommands: Vec<&clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .collect();
    if !subcommands.is_empty() {
        let _ = write!(doc, "\n**Commands:**\n\n");
        for sub in &subcommands {
            let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
            let anchor = format!("{path} {}", sub.get_name()).replace(' ', "-");
            let _ = writeln!(
                doc,
                "- [`{}`](#{anchor}): {}",
                sub.get_name(),
                sentence(&markdown_text(&about))
            );
        }
    }
    let top = parent.is_empty();
    let args: Vec<&clap::Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !matches!(a.get_id().as_str(), "help" | "version"))
        .filter(|a| top || !a.is_global_set())
        .collect();
    let positionals: Vec<&&clap::Arg> = args.iter().filter(|a| a.is_positional()).collect();
    let options: Vec<&&clap::Arg> = args.iter().filter(|a| !a.is_positional()).collect();
    if !positionals.is_empty() {
        let _ = write!(doc, "\n**Arguments:**\n\n");
        for arg in positionals {
            reference_arg(arg, doc);
        }
    }
    if !options.is_empty() {
        let heading = if top {
            "**Options** (global: every command takes them):"
        } else {
            "**Options:**"
        };
        let _ = write!(doc, "\n{heading}\n\n");
        for arg in options {
            reference_arg(arg, doc);
        }
    }
    let names: Vec<String> = subcommands
        .iter()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        if let Some(sub) = cmd.find_subcommand_mut(&name) {
            reference_section(sub, &path, doc);
        }
    }
}

/// One argument as a list item: its spelling, help, environment variable,
/// default and accepted values.
fn reference_arg(arg: &clap::Arg, doc: &mut String) {
    use std::fmt::Write as _;
    let takes_values = arg.get_action().takes_values();
    let value_names: Vec<String> = match arg.get_value_names() {
        Some(names) => names.iter().map(|n| n.to_string()).collect(),
        None => vec![arg.get_id().as_str().to_ascii_uppercase()],
    };
    let many = arg
        .get_num_args()
        .is_some_and(|range| range.max_values() > 1);
    let values = value_names
        .iter()
        .map(|n| format!("<{n}>"))
        .collect::<Vec<_>>()
        .join(" ");
    let spelling = if arg.is_positional() {
        let mut s = values;
        if many {
            s.push_str("...");
        }
        if !arg.is_required_set() {
            s = format!("[{s}]");
        }
        s
    } else {
        let mut s = String::new();
        if let Some(short) = arg.get_short() {
            s.push_str(&format!("-{short}, "));
        }
        if let Some(long) = arg.get_long() {
            s.push_str(&format!("--{long}"));
        }
        if takes_values {
            s.push(' ');
            s.push_str(&values);
        }
        s
    };
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(|h| sentence(&markdown_text(&h.to_string())).replace("\n\n", "\n\n  "))
        .unwrap_or_default();
    let _ = write!(doc, "- `{spelling}`");
    let mut notes = vec![help];
    if arg.is_required_set() && !arg.is_positional() {
        notes.push("Required.".to_string());
    }
    let repeatable = matches!(
        arg.get_action(),
        clap::ArgAction::Append | clap::ArgAction::Count
    );
    if repeatable && !arg.is_positional() && !notes[0].contains("Repeatable") {
        notes.push("Repeatable.".to_string());
    }
    if let Some(env) = arg.get_env() {
        notes.push(format!("Environment: `{}`.", env.to_string_lossy()));
    }
    if takes_values && !arg.is_hide_default_value_set() {
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|d| format!("`{}`", d.to_string_lossy()))
            .collect();
        if !defaults.is_empty() {
            notes.push(format!("Default: {}.", defaults.join(", ")));
        }
    }
    if takes_values && !arg.is_hide_possible_values_set() {
        let possible: Vec<String> = arg
            .get_possible_values()
            .iter()
            .filter(|p| !p.is_hide_set())
            .map(|p| format!("`{}`", p.get_name()))
            .collect();
        if !possible.is_empty() {
            notes.push(format!("One of {}.", possible.join(", ")));
        }
    }
    notes.retain(|n| !n.is_empty());
    if !notes.is_empty() {
        let _ = write!(doc, ": {}", notes.join(" "));
    }
    doc.push('\n');
}

/// Help text as Markdown: `<` and `>` outside code spans are escaped (so
/// `DIR/<id>` is not taken for an HTML tag); code spans stay as written.
fn markdown_text(text: &str) -> String {
    text.trim()
        .split('`')
        .enumerate()
        .map(|(i, part)| {
            if i % 2 == 1 {
                format!("`{part}`")
            } else {
                part.replace('<', "&lt;").replace('>', "&gt;")
            }
        })
        .collect()
}

/// Clap drops the full stop of a one-sentence doc comment; the reference
/// puts it back, so the notes after it read as sentences.
fn sentence(text: &str) -> String {
    let text = text.trim_end();
    match text.chars().last() {
        None => String::new(),
        Some('.' | '!' | '?' | ':') => text.to_string(),
        Some(_) => format!("{text}."),
    }
}
