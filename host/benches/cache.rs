//! The benchmark: one table, with the baselines measured in the same run.
//!
//! ```text
//! cargo bench -p image-cache --bench cache              # full run
//! BENCH_BIG_MIB=256 BENCH_PEER=0 cargo bench ...        # smaller, no Glance
//! BENCH_ONLY=centralized cargo bench ...                 # one driver's rows
//! ```
//!
//! The centralized driver's rows need PostgreSQL: `BENCH_POSTGRES` (a
//! connection string), or the server binaries in /usr/lib/postgresql/15/bin
//! for a throwaway cluster reached over its Unix socket.
//!
//! For each built-in driver: the data plane (1 GiB through the cache versus
//! plain Rust file I/O), metadata operations at 10,000 images, pruning at
//! 20,000 and 100,000 images, start-up, and peak memory. If the Glance peer
//! environment exists (`.venv-glance`, see host/benches/README-glance.md),
//! Glance's own `ImageCache` runs the same workloads and its numbers go in
//! the next column. The table is printed and written to
//! `target/bench-results.md`.

use std::fmt::Write as _;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use image_cache::{CacheConfig, DriverSource, ImageCache, Limits, Runtime};

#[path = "common.rs"]
mod common;
use common::{env_usize, open, populate};

const MIB: usize = 1 << 20;

struct Row {
    group: &'static str,
    what: String,
    unit: &'static str,
    ours: f64,
    baseline: Option<(String, f64)>,
    glance: Option<f64>,
}

struct Table {
    rows: Vec<Row>,
}

impl Table {
    fn add(
        &mut self,
        group: &'static str,
        what: impl Into<String>,
        unit: &'static str,
        ours: f64,
    ) -> &mut Row {
        let what = what.into();
        eprintln!("  {group:<10} {what:<48} {ours:>12.2} {unit}");
        self.rows.push(Row {
            group,
            what,
            unit,
            ours,
            baseline: None,
            glance: None,
        });
        self.rows.last_mut().unwrap()
    }

    fn render(&self) -> String {
        let mut out = String::new();
        writeln!(out, "| group | measurement | unit | image-cache | baseline (same run) | ratio | Glance 33.0.0 | vs Glance |").unwrap();
        writeln!(out, "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |").unwrap();
        for r in &self.rows {
            let (baseline, ratio) = match &r.baseline {
                Some((name, v)) => {
                    let ratio = if r.unit == "MB/s" {
                        r.ours / v
                    } else {
                        v / r.ours
                    };
                    (format!("{name}: {}", num(*v)), format!("{ratio:.2}"))
                }
                None => (String::new(), String::new()),
            };
            let (glance, vs) = match r.glance {
                Some(g) => {
                    let speedup = if r.unit == "MB/s" {
                        r.ours / g
                    } else {
                        g / r.ours
                    };
                    (num(g), format!("{speedup:.1}x"))
                }
                None => (String::new(), String::new()),
            };
            writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.group,
                r.what,
                r.unit,
                num(r.ours),
                baseline,
                ratio,
                glance,
                vs
            )
            .unwrap();
        }
        out
    }
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Time `n` calls of `f`, in microseconds per call.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// Peak resident memory since the last reset, in MiB.
fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// A reader yielding `total` bytes of a pattern in 1 MiB chunks.
struct Pattern {
    chunk: Vec<u8>,
    left: usize,
}

impl Pattern {
    fn new(total: usize) -> Pattern {
        Pattern {
            chunk: (0..MIB).map(|i| (i * 31 % 251) as u8).collect(),
            left: total,
        }
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.left).min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.left -= n;
        Ok(n)
    }
}

/// The plain-Rust baseline: the same bytes, the same chunking, the same
/// flush, straight to a file.
fn native_write(path: &Path, total: usize) -> f64 {
    let t = Instant::now();
    let mut file = std::fs::File::create(path).unwrap();
    let mut source = Pattern::new(total);
    let mut buf = vec![0u8; MIB];
    loop {
        let n = source.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).unwrap();
    }
    file.sync_data().unwrap();
    t.elapsed().as_secs_f64()
}

fn native_read(path: &Path) -> f64 {
    let t = Instant::now();
    let mut file = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; MIB];
    let mut sink = io::sink();
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sink.write_all(&buf[..n]).unwrap();
    }
    t.elapsed().as_secs_f64()
}

fn bench_driver(
    table: &mut Table,
    runtime: &std::sync::Arc<Runtime>,
    scratch: &Path,
    driver: &'static str,
) {
    let big = env_usize("BENCH_BIG_MIB", 1024) * MIB;
    let meta_n = env_usize("BENCH_META_N", 10_000);
    let group = driver;

    // Data plane.
    let dir = scratch.join(format!("{driver}-big"));
    let cache = open(runtime, &dir, driver);
    // Baseline and cache alternate, twice, and each keeps its best run: the
    // disk and the page cache treat both the same.
    let native_path = scratch.join("native.img");
    let (mut native_w, mut native_r, mut ours_w, mut ours_r) =
        (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
    let mut rss_write = 0f64;
    for round in 0..2 {
        native_w = native_w.min(native_write(&native_path, big));
        native_r = native_r.min(native_read(&native_path));
        std::fs::remove_file(&native_path).unwrap();
        let id = format!("big-{round}");
        reset_peak_rss();
        let t = Instant::now();
        cache.cache_reader(&id, None, Pattern::new(big)).unwrap();
        ours_w = ours_w.min(t.elapsed().as_secs_f64());
        rss_write = rss_write.max(peak_rss_mib());
        let t = Instant::now();
        cache.read_image(&id, io::sink()).unwrap();
        ours_r = ours_r.min(t.elapsed().as_secs_f64());
        cache.delete_cached_image(&id).unwrap();
    }
    let mb = big as f64 / 1e6;
    table
        .add(
            group,
            format!("write {} MiB (cache, fdatasync)", big / MIB),
            "MB/s",
            mb / ours_w,
        )
        .baseline = Some(("plain write+fdatasync".into(), mb / native_w));
    table
        .add(
            group,
            format!("read {} MiB (counts the hit)", big / MIB),
            "MB/s",
            mb / ours_r,
        )
        .baseline = Some(("plain read".into(), mb / native_r));
    table.add(
        group,
        format!("peak RSS writing {} MiB", big / MIB),
        "MiB",
        rss_write,
    );
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // Metadata at `meta_n` images.
    let dir = scratch.join(format!("{driver}-meta"));
    populate(&dir, driver, meta_n, 4096);
    let cache = open(runtime, &dir, driver);
    let id = |i: usize| format!("{:08}-0000-4000-8000-000000000000", i % meta_n);
    let calls = 5_000;
    let v = per_call(calls, |i| assert!(cache.is_cached(&id(i * 7)).unwrap()));
    table.add(group, format!("is-cached at {meta_n} images"), "us/op", v);
    let v = per_call(calls, |i| {
        assert!(!cache.is_cached(&format!("missing-{i}")).unwrap())
    });
    table.add(
        group,
        format!("is-cached (miss) at {meta_n} images"),
        "us/op",
        v,
    );
    let v = per_call(calls, |i| {
        cache.get_hit_count(&id(i * 3)).unwrap();
    });
    table.add(
        group,
        format!("get-hit-count at {meta_n} images"),
        "us/op",
        v,
    );
    let v = per_call(2_000, |i| {
        assert!(cache.queue_image(&format!("queued-{i}")).unwrap())
    });
    table.add(group, "queue-image (new id)", "us/op", v);
    let v = per_call(2_000, |i| assert!(!cache.queue_image(&id(i)).unwrap()));
    table.add(group, "queue-image (already cached)", "us/op", v);
    let v = per_call(20, |_| {
        assert_eq!(cache.get_cached_images().unwrap().len(), meta_n)
    });
    table.add(group, format!("list cached images ({meta_n})"), "us/op", v);
    let v = per_call(20, |_| {
        assert_eq!(cache.get_cache_size().unwrap(), meta_n as u64 * 4096)
    });
    table.add(group, format!("cache size ({meta_n})"), "us/op", v);
    let mut buf = Vec::with_capacity(4096);
    let v = per_call(2_000, |i| {
        buf.clear();
        cache.read_image(&id(i), &mut buf).unwrap();
    });
    table.add(group, "read a 4 KiB image (open+read+finish)", "us/op", v);
    let small = vec![3u8; 4096];
    let v = per_call(500, |i| {
        cache
            .cache_reader(&format!("small-{i}"), None, &small[..])
            .unwrap();
    });
    table.add(group, "cache a 4 KiB image (fdatasync)", "us/op", v);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // Pruning at scale.
    for n in [20_000usize, env_usize("BENCH_PRUNE_LARGE", 100_000)] {
        let dir = scratch.join(format!("{driver}-prune-{n}"));
        populate(&dir, driver, n, 1024);
        let cache = open(runtime, &dir, driver);
        if n > 20_000 {
            reset_peak_rss();
            let t = Instant::now();
            assert_eq!(cache.get_cached_images().unwrap().len(), n);
            table.add(
                group,
                format!("list cached images ({n})"),
                "ms",
                t.elapsed().as_secs_f64() * 1e3,
            );
            table.add(
                group,
                format!("peak RSS listing {n} images"),
                "MiB",
                peak_rss_mib(),
            );
        }
        let t = Instant::now();
        let report = cache.prune((n as u64 * 1024) / 2).unwrap();
        let s = t.elapsed().as_secs_f64();
        assert_eq!(report.removed.len(), n / 2);
        assert_eq!(
            report.removed[0].image_id,
            format!("{:08}-0000-4000-8000-000000000000", 0)
        );
        table.add(group, format!("prune {n} images to half"), "s", s);
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn bench_startup(table: &mut Table, scratch: &Path) {
    let artifacts = scratch.join("artifacts");
    for driver in ["sqlite", "xattr"] {
        let source = DriverSource::Builtin(driver);
        let _ = std::fs::remove_dir_all(&artifacts);
        let cold = Runtime::new(Limits::default(), Some(artifacts.clone())).unwrap();
        let t = Instant::now();
        cold.component(&source, &Default::default()).unwrap();
        table.add(
            "start-up",
            format!("{driver}: first load (compile)"),
            "ms",
            t.elapsed().as_secs_f64() * 1e3,
        );
        drop(cold);
        let t = Instant::now();
        let warm = Runtime::new(Limits::default(), Some(artifacts.clone())).unwrap();
        let c = warm.component(&source, &Default::default()).unwrap();
        assert!(c.was_precompiled());
        table.add(
            "start-up",
            format!("{driver}: engine + load from compiled cache"),
            "ms",
            t.elapsed().as_secs_f64() * 1e3,
        );
        let root = scratch.join(format!("startup-{driver}"));
        let t = Instant::now();
        let cache = open(&warm, &root, driver);
        table.add(
            "start-up",
            format!("{driver}: open cache (instantiate + configure)"),
            "ms",
            t.elapsed().as_secs_f64() * 1e3,
        );
        let other = if driver == "sqlite" {
            "xattr"
        } else {
            "sqlite"
        };
        cache.swap_driver(&DriverSource::Builtin(other)).unwrap(); // load it once
        let t = Instant::now();
        cache.swap_driver(&DriverSource::Builtin(driver)).unwrap();
        table.add(
            "start-up",
            format!("hot swap to {driver} (loaded component)"),
            "ms",
            t.elapsed().as_secs_f64() * 1e3,
        );
    }
}

/// Run Glance's own ImageCache on the same workloads, if its environment exists.
fn glance(driver: &str, scratch: &Path) -> Option<serde_json::Value> {
    if std::env::var("BENCH_PEER").as_deref() == Ok("0") {
        return None;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let python = repo.join(".venv-glance/bin/python");
    if !python.exists() {
        eprintln!(
            "(no {}: Glance column skipped; see host/benches/README-glance.md)",
            python.display()
        );
        return None;
    }
    let root = scratch.join(format!("glance-{driver}"));
    std::fs::create_dir_all(&root).unwrap();
    eprintln!("running Glance's ImageCache ({driver}) ...");
    let out = Command::new(python)
        .arg(repo.join("host/benches/glance_peer.py"))
        .args(["--driver", driver, "--root"])
        .arg(&root)
        .args(["--n-meta", &env_usize("BENCH_META_N", 10_000).to_string()])
        .args(["--big-mib", &env_usize("BENCH_BIG_MIB", 1024).to_string()])
        .args([
            "--prune-n",
            "2000,20000",
            "--prune-timeout-s",
            &std::env::var("BENCH_PEER_TIMEOUT").unwrap_or("300".into()),
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "Glance peer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

fn attach_glance(table: &mut Table, driver: &str, g: &serde_json::Value) {
    let w = &g["workloads"];
    let get = |path: &[&str]| -> Option<f64> {
        let mut v = w;
        for p in path {
            v = &v[*p];
        }
        v.as_f64()
    };
    let prune = |n: u64| -> Option<f64> {
        w["prune"]["sizes"]
            .as_array()?
            .iter()
            .find(|s| s["n"].as_u64() == Some(n))
            .and_then(|s| {
                s["seconds"]
                    .as_f64()
                    .or_else(|| s["extrapolated_s"].as_f64())
            })
    };
    for row in table.rows.iter_mut().filter(|r| r.group == driver) {
        let w = row.what.as_str();
        row.glance = if w.starts_with("write ") {
            get(&["big", "cache_MB_s"])
        } else if w.starts_with("read ") && w.contains("MiB") {
            get(&["big", "read_MB_s"])
        } else if w.starts_with("is-cached (miss)") {
            get(&["meta", "is_cached_miss_us"])
        } else if w.starts_with("is-cached") {
            get(&["meta", "is_cached_hit_us"])
        } else if w.starts_with("get-hit-count") {
            get(&["meta", "get_hit_count_us"])
        } else if w == "queue-image (new id)" {
            get(&["meta", "queue_image_new_us"])
        } else if w == "queue-image (already cached)" {
            get(&["meta", "queue_image_already_cached_us"])
        } else if w.starts_with("list cached images (1") && row.unit == "us/op" {
            get(&["meta", "get_cached_images_us"])
        } else if w.starts_with("cache size") {
            get(&["meta", "get_cache_size_us"])
        } else if w.starts_with("read a 4 KiB") {
            get(&["small", "open_for_read_full_us"])
        } else if w.starts_with("cache a 4 KiB") {
            get(&["small", "cache_image_iter_us"])
        } else if w == "prune 20000 images to half" {
            prune(20_000)
        } else {
            None
        };
    }
}

/// The centralized column's PostgreSQL: `BENCH_POSTGRES` (a connection
/// string whose role may create tables), or a throwaway cluster started
/// here from /usr/lib/postgresql/15/bin, reached over its Unix socket with
/// the server's default durability settings.
struct BenchPostgres {
    url: String,
    /// Our own cluster's directory, stopped and removed at the end.
    dir: Option<PathBuf>,
    as_postgres: bool,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn pg_command(program: &str, as_postgres: bool) -> Command {
    let path = Path::new(PG_BIN).join(program);
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl BenchPostgres {
    fn start() -> Option<BenchPostgres> {
        if let Ok(url) = std::env::var("BENCH_POSTGRES") {
            return Some(BenchPostgres {
                url,
                dir: None,
                as_postgres: false,
            });
        }
        if !Path::new(PG_BIN).join("initdb").exists() {
            eprintln!("no PostgreSQL ({PG_BIN}, or BENCH_POSTGRES): centralized skipped");
            return None;
        }
        // SAFETY: a plain system call.
        let as_postgres = unsafe { libc::geteuid() } == 0;
        let dir = tempfile::Builder::new()
            .prefix("image-cache-bench-pg-")
            .tempdir()
            .unwrap()
            .keep();
        if as_postgres {
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .unwrap();
        }
        let ok = pg_command("initdb", as_postgres)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "-D"])
            .arg(dir.join("data"))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .success();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let ok = ok
            && pg_command("pg_ctl", as_postgres)
                .args(["start", "-w", "-D"])
                .arg(dir.join("data"))
                .arg("-l")
                .arg(dir.join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses='' -c max_connections=100",
                    dir.display()
                ))
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap()
                .success();
        if !ok {
            eprintln!("could not start PostgreSQL: centralized skipped");
            return None;
        }
        Some(BenchPostgres {
            url: format!(
                "host={} port={port} user=postgres dbname=postgres",
                dir.display()
            ),
            dir: Some(dir),
            as_postgres,
        })
    }

    fn databases(&self) -> std::sync::Arc<image_cache::database::DatabaseRoot> {
        let mut settings = image_cache::database::DatabaseSettings::new(self.url.clone());
        // The throwaway cluster's only role is its superuser.
        settings.allow_privileged_role = true;
        std::sync::Arc::new(
            image_cache::database::DatabaseRoot::new()
                .with_database(image_cache::database::CENTRALIZED_DATABASE, &settings)
                .unwrap(),
        )
    }

    /// Run SQL through the same database interface drivers use.
    fn sql(
        &self,
        sql: &str,
        params: Vec<image_cache::bindings::database::Value>,
    ) -> Result<u64, String> {
        let deadline = image_cache::limits::Deadline(Instant::now() + Duration::from_secs(600));
        self.databases()
            .open(image_cache::database::CENTRALIZED_DATABASE, deadline)
            .and_then(|mut c| c.execute(sql, params, deadline))
            .map_err(|e| e.message)
    }
}

impl Drop for BenchPostgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = pg_command("pg_ctl", self.as_postgres)
                .args(["stop", "-m", "fast", "-D"])
                .arg(dir.join("data"))
                .stdout(std::process::Stdio::null())
                .status();
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn open_centralized(
    runtime: &std::sync::Arc<Runtime>,
    root: &Path,
    pg: &BenchPostgres,
    node: &str,
) -> ImageCache {
    let mut config = CacheConfig::new(root)
        .driver(DriverSource::Builtin("centralized"))
        .fallback_to_sqlite(false);
    config.databases = pg.databases();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), node.into()));
    ImageCache::with_runtime(runtime.clone(), config).unwrap()
}

/// `n` image files in `root` and their rows for `node` (one statement).
fn populate_centralized(root: &Path, pg: &BenchPostgres, node: &str, n: usize, size: usize) {
    use image_cache::bindings::database::Value;
    let data = vec![7u8; size];
    for i in 0..n {
        std::fs::write(
            root.join(format!("{i:08}-0000-4000-8000-000000000000")),
            &data,
        )
        .unwrap();
    }
    pg.sql(
        "INSERT INTO cached_images \
         (image_id, last_accessed, last_modified, size, hits, node_reference_id) \
         SELECT lpad(i::text, 8, '0') || '-0000-4000-8000-000000000000', \
                to_timestamp(1700000000 + i) AT TIME ZONE 'UTC', \
                to_timestamp(1700000000) AT TIME ZONE 'UTC', $1, 0, \
                (SELECT node_reference_id FROM node_reference WHERE node_reference_url = $2) \
         FROM generate_series(0, $3) AS i",
        vec![
            Value::Integer(size as i64),
            Value::Text(node.to_string()),
            Value::Integer(n as i64 - 1),
        ],
    )
    .unwrap();
}

fn bench_centralized(table: &mut Table, runtime: &std::sync::Arc<Runtime>, scratch: &Path) {
    let Some(pg) = BenchPostgres::start() else {
        return;
    };
    let group = "centralized";
    let meta_n = env_usize("BENCH_META_N", 10_000);
    let id = |i: usize| format!("{:08}-0000-4000-8000-000000000000", i % meta_n);
    // Empty the tables (if there are any yet) between phases.
    let reset = || {
        let _ = pg.sql("DELETE FROM cached_images", vec![]);
        let _ = pg.sql("DELETE FROM node_reference", vec![]);
    };

    // Metadata at `meta_n` images, over the local socket.
    reset();
    let dir = scratch.join("centralized-meta");
    let cache = open_centralized(runtime, &dir, &pg, "http://bench-1:9292");
    populate_centralized(&dir, &pg, "http://bench-1:9292", meta_n, 4096);
    let v = per_call(5_000, |i| assert!(cache.is_cached(&id(i * 7)).unwrap()));
    table.add(group, format!("is-cached at {meta_n} images"), "us/op", v);
    let v = per_call(5_000, |i| {
        cache.get_hit_count(&id(i * 3)).unwrap();
    });
    table.add(
        group,
        format!("get-hit-count at {meta_n} images"),
        "us/op",
        v,
    );
    let v = per_call(2_000, |i| {
        assert_eq!(cache.get_cached_nodes(&id(i)).unwrap().len(), 1);
    });
    table.add(group, "get-cached-nodes (nodes ID)", "us/op", v);
    let v = per_call(20, |_| {
        assert_eq!(cache.get_cached_images().unwrap().len(), meta_n)
    });
    table.add(group, format!("list cached images ({meta_n})"), "us/op", v);
    let v = per_call(20, |_| {
        assert_eq!(cache.get_cache_size().unwrap(), meta_n as u64 * 4096)
    });
    table.add(group, format!("cache size ({meta_n})"), "us/op", v);
    let mut buf = Vec::with_capacity(4096);
    let v = per_call(2_000, |i| {
        buf.clear();
        cache.read_image(&id(i), &mut buf).unwrap();
    });
    table.add(group, "read a 4 KiB image (open+read+finish)", "us/op", v);
    let small = vec![3u8; 4096];
    let v = per_call(500, |i| {
        cache
            .cache_reader(&format!("small-{i}"), None, &small[..])
            .unwrap();
    });
    table.add(group, "cache a 4 KiB image (fdatasync)", "us/op", v);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // Two nodes writing at once, against one node alone.
    let writes = 300;
    let one_node = {
        let dir = scratch.join("centralized-solo");
        let cache = open_centralized(runtime, &dir, &pg, "http://solo:9292");
        let t = Instant::now();
        for i in 0..writes {
            cache
                .cache_reader(&format!("solo-{i}"), None, &small[..])
                .unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
        writes as f64 / s
    };
    let dirs: Vec<PathBuf> = (0..2)
        .map(|n| scratch.join(format!("centralized-node-{n}")))
        .collect();
    let caches: Vec<ImageCache> = dirs
        .iter()
        .enumerate()
        .map(|(n, d)| open_centralized(runtime, d, &pg, &format!("http://node-{n}:9292")))
        .collect();
    let t = Instant::now();
    std::thread::scope(|s| {
        for cache in &caches {
            let small = &small;
            s.spawn(move || {
                for i in 0..writes {
                    cache
                        .cache_reader(&format!("both-{i}"), None, &small[..])
                        .unwrap();
                    cache.read_image(&format!("both-{i}"), io::sink()).unwrap();
                }
            });
        }
    });
    let both = (2 * writes) as f64 / t.elapsed().as_secs_f64();
    table
        .add(
            group,
            "two nodes caching+reading 4 KiB images at once (both)",
            "images/s",
            both,
        )
        .baseline = Some(("one node alone, cache only".into(), one_node));
    drop(caches);
    for d in dirs {
        std::fs::remove_dir_all(d).unwrap();
    }

    // Pruning at 20,000 images.
    let n = 20_000;
    reset();
    let dir = scratch.join("centralized-prune");
    let cache = open_centralized(runtime, &dir, &pg, "http://bench-1:9292");
    populate_centralized(&dir, &pg, "http://bench-1:9292", n, 1024);
    let t = Instant::now();
    let report = cache.prune((n as u64 * 1024) / 2).unwrap();
    let s = t.elapsed().as_secs_f64();
    assert_eq!(report.removed.len(), n / 2);
    assert_eq!(report.removed[0].image_id, id(0));
    table.add(group, format!("prune {n} images to half"), "s", s);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let scratch_parent = common::fresh_scratch("bench-scratch");
    let scratch = scratch_parent.as_path();
    let runtime = Runtime::new(Limits::default(), Some(scratch.join("artifacts-shared"))).unwrap();
    let mut table = Table { rows: Vec::new() };

    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let runs = |driver: &str| only.is_empty() || only == driver;
    if only.is_empty() {
        bench_startup(&mut table, scratch);
    }
    for driver in ["sqlite", "xattr"].into_iter().filter(|d| runs(d)) {
        eprintln!("driver {driver}:");
        bench_driver(&mut table, &runtime, scratch, driver);
        if let Some(g) = glance(driver, scratch) {
            attach_glance(&mut table, driver, &g);
            if let Some(skipped) = g["workloads"]["prune"]["sizes"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["skipped"].as_bool() == Some(true)))
            {
                eprintln!(
                    "Glance {driver}: prune {} skipped, extrapolated {:?} s",
                    skipped["n"], skipped["extrapolated_s"]
                );
            }
        }
    }

    if runs("centralized") {
        eprintln!("driver centralized:");
        bench_centralized(&mut table, &runtime, scratch);
    }

    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut out = format!(
        "Machine: {} cores, {cpu}; file system of {}: see `df`/`mount`.\n\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        scratch.display()
    );
    out.push_str(&table.render());
    out.push_str(
        "\nratio: image-cache / baseline for MB/s, baseline / image-cache for times (1.00 = as fast). \
         vs Glance: how many times faster than Glance's ImageCache with the same driver \
         (Glance prune 20000 may be extrapolated, see stderr).\n",
    );
    println!("{out}");
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("target/bench-results.md");
    std::fs::write(&path, &out).unwrap();
    eprintln!("written to {}", path.display());
    let _ = std::fs::remove_dir_all(scratch);
}
