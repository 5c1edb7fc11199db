#!/usr/bin/env bash
# Same-run comparison of our `centralized` driver with Glance's own
# `centralized_db` image-cache driver, on PostgreSQL and on MariaDB.
#
#   host/benches/centralized_vs_glance.sh                  # N=10000, 3 runs
#   N=2000 RUNS=1 host/benches/centralized_vs_glance.sh    # quick
#   DBS=mariadb host/benches/centralized_vs_glance.sh      # one database
#
# For each database: a throwaway server in a temporary directory (default
# durability settings, loopback TCP, no TLS), a database `glance` whose
# tables Glance's own `glance-manage db sync` makes (as the owner account
# glance_owner), and the cache's account image_cache fenced with exactly
# what `image-cache db grants` prints. Then RUNS times, alternating: our
# side (a small Rust program on the host library, built here against this
# checkout's host/), Glance's side (host/benches/glance_peer.py --driver
# centralized_db --workloads central, as glance_owner). The cells are the
# median of the runs. See host/benches/README-glance.md.
#
# Environment (defaults in brackets):
#   N [10000]            images for list / prune / delete all
#   RUNS [3]             runs per side and database
#   POINT_CALLS [5000]   is-cached calls; HIT_CALLS [1000] reads;
#   CACHE_CALLS [300]    small images cached; FILE_BYTES [4096]
#   PRUNE_TIMEOUT_S [600] Glance's prune is stopped after this (see README)
#   DBS ["postgresql mariadb"]
#   BENCH_PG_ADMIN       psql conninfo of a running PostgreSQL's superuser
#                        (with BENCH_PG_HOST/BENCH_PG_PORT for TCP) instead
#                        of a throwaway cluster [none]
#   BENCH_MARIADB_ADMIN  `mariadb` client arguments of a running server's
#                        administrator (with BENCH_MARIADB_HOST/_PORT) [none]
#   IMAGE_CACHE_SRC      checkout whose host/ our side is built from [this one]
#   GLANCE_VENV          venv with glance==33.0.0, pymysql, psycopg2-binary
#                        [<repo>/.venv-glance]
#   IMAGE_CACHE_COMMIT   what to call that source in the header [its git HEAD]
#   CARGO_TARGET_DIR     as cargo has it [<repo>/target]
#   KEEP=1               keep the work directory (JSON of every run)
#   TABLE_FROM=DIR       only print the table of a kept run's DIR/results
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SRC=${IMAGE_CACHE_SRC:-$REPO}
N=${N:-10000}
RUNS=${RUNS:-3}
POINT_CALLS=${POINT_CALLS:-5000}
HIT_CALLS=${HIT_CALLS:-1000}
CACHE_CALLS=${CACHE_CALLS:-300}
FILE_BYTES=${FILE_BYTES:-4096}
PRUNE_TIMEOUT_S=${PRUNE_TIMEOUT_S:-600}
DBS=${DBS:-postgresql mariadb}
GLANCE_VENV=${GLANCE_VENV:-$REPO/.venv-glance}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$REPO/target}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PW=Pw-bench-7c1e
say() { echo "[centralized_vs_glance] $*" >&2; }

if [ ! -x "$GLANCE_VENV/bin/glance-manage" ]; then
    say "no Glance venv at $GLANCE_VENV; make it with:"
    say "  python3 -m venv .venv-glance && .venv-glance/bin/pip install 'glance==33.0.0' xattr pymysql psycopg2-binary"
    exit 2
fi

# The table, from a results directory (its settings.json and run files).
print_table() {
    "$GLANCE_VENV/bin/python" - "$1" <<'EOF'
import json, os, platform, statistics, sys
from importlib import metadata
res = sys.argv[1]
S = json.load(open(os.path.join(res, "settings.json")))
n, runs, fbytes = S["n"], S["runs"], S["file_bytes"]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
            if l.startswith("model name")), "?")
print("Same-run comparison, %s, %s CPUs (%s), N = %s images of %s B, "
      "median of %d runs per cell (min-max in brackets)." % (
          S["date"], S["nproc"], cpu, n, fbytes, runs))
print("Ours: image-cache %s, built-in centralized driver, fenced account. "
      "Glance %s centralized_db (SQLAlchemy %s, psycopg2 %s, PyMySQL %s, "
      "Python %s), owner account. PostgreSQL %s, MariaDB %s, loopback TCP, "
      "default durability." % (
          S["commit"], metadata.version("glance"),
          metadata.version("SQLAlchemy"), metadata.version("psycopg2-binary"),
          metadata.version("PyMySQL"), platform.python_version(),
          S["pg_version"], S["mariadb_version"]))
try:
    loads = [float(x) for x in open(os.path.join(res, "loadavg"))]
    print("1-minute load average when each side's run started: %.2f to %.2f."
          % (min(loads), max(loads)))
except (OSError, ValueError):
    pass
print()
print("| database | operation | ours | Glance centralized_db | ours / Glance |")
print("| --- | --- | ---: | ---: | ---: |")
cells = [
    ("list cached (%s images)" % n, "list_us", 1e-3, "ms"),
    ("cache one %s B image" % fbytes, "cache_us", 1, "µs"),
    ("is-cached", "is_cached_us", 1, "µs"),
    ("hit (read + record)", "hit_us", 1, "µs"),
    ("prune %s to half" % n, "prune_s", 1, "s"),
    ("delete all (%s)" % n, "delete_all_s", 1e3, "ms"),
]


def load(db, side):
    out = []
    for r in range(1, runs + 1):
        p = os.path.join(res, "%s-%s-%d.json" % (db, side, r))
        try:
            j = json.load(open(p))
        except (OSError, ValueError):
            continue
        out.append(j["workloads"]["central"] if side == "glance" else j)
    return out


def num(v):
    if v >= 100:
        return "%.0f" % v
    if v >= 10:
        return "%.1f" % v
    if v >= 1:
        return "%.2f" % v
    return "%.3f" % v


def cell(vals, scale, unit):
    vals = [v * scale for v in vals]
    s = "%s %s" % (num(statistics.median(vals)), unit)
    if len(vals) > 1:
        s += " (%s–%s)" % (num(min(vals)), num(max(vals)))
    return s


notes = []
for db in S["dbs"].split():
    name = {"postgresql": "PostgreSQL " + S["pg_version"],
            "mariadb": "MariaDB " + S["mariadb_version"]}.get(db, db)
    ours, glance = load(db, "ours"), load(db, "glance")
    for label, key, scale, unit in cells:
        o = [j[key] for j in ours if j.get(key) is not None]
        g = [j[key] for j in glance if j.get(key) is not None]
        oc = cell(o, scale, unit) if o else "failed"
        timed_out = [j for j in glance if "prune_timed_out_s" in j]
        if g:
            gc = cell(g, scale, unit)
        elif key == "prune_s" and timed_out:
            gc = "> %s s (timeout; %d of %d evicted)" % (
                S["prune_timeout_s"],
                timed_out[0]["prune_evicted_before_timeout"], n - n // 2)
        else:
            gc = "failed"
        if g and len(g) < runs:
            gc += " (%d of %d runs)" % (len(g), runs)
        ratio = ""
        if o and g:
            r = statistics.median(o) / statistics.median(g)
            ratio = ("%.2f×" if r >= 0.1 else "%.4f×") % r
        print("| %s | %s | %s | %s | %s |" % (name, label, oc, gc, ratio))
    for when in ("before", "after"):
        p = os.path.join(res, "%s-dbsync-%s.rc" % (db, when))
        if os.path.exists(p):
            notes.append("%s: glance-manage db sync %s our nodes' rows: %s"
                         % (name, when, open(p).read().strip()))
print()
print("ours / Glance: our median time over Glance's (below 1 = ours faster). "
      "is-cached: %s calls; hit: %s reads of distinct images, each read in "
      "full and its hit recorded; cache: %s images (ours fdatasyncs, Glance "
      "does not). list: get_cached_images, mean of 3-20 calls." % (
          S["point_calls"], S["hit_calls"], S["cache_calls"]))
for line in notes:
    print("- " + line)
EOF
}

if [ -n "${TABLE_FROM:-}" ]; then
    print_table "$TABLE_FROM"
    exit 0
fi

WORK=$(mktemp -d /tmp/centralized-vs-glance.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/results" "$WORK/cache"
PG_VERSION=$("$PG_BIN/postgres" --version 2>/dev/null | awk '{print $3}' || true)
MY_VERSION=$(/usr/sbin/mariadbd --version 2>/dev/null | awk '{print $3}' | sed 's/-MariaDB.*//' || true)
SRC_COMMIT=${IMAGE_CACHE_COMMIT:-$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo "?")}
python3 - "$WORK/results/settings.json" <<EOF
import json, os, sys, time
json.dump({"n": $N, "runs": $RUNS, "point_calls": $POINT_CALLS,
           "hit_calls": $HIT_CALLS, "cache_calls": $CACHE_CALLS,
           "file_bytes": $FILE_BYTES, "prune_timeout_s": "$PRUNE_TIMEOUT_S",
           "dbs": "$DBS", "pg_version": "$PG_VERSION",
           "mariadb_version": "$MY_VERSION", "commit": "$SRC_COMMIT",
           "nproc": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M")},
          open(sys.argv[1], "w"))
EOF
AS_ROOT=0
[ "$(id -u)" = 0 ] && AS_ROOT=1
as_user() { # user command...
    local u=$1; shift
    if [ $AS_ROOT = 1 ]; then runuser -u "$u" -- "$@"; else "$@"; fi
}
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cleanup() {
    if [ -d "$WORK/pg/data" ] && [ -z "${BENCH_PG_ADMIN:-}" ]; then
        as_user postgres "$PG_BIN/pg_ctl" stop -m fast -D "$WORK/pg/data" >/dev/null 2>&1 || true
    fi
    if [ -f "$WORK/my/mariadb.pid" ] && [ -z "${BENCH_MARIADB_ADMIN:-}" ]; then
        kill "$(cat "$WORK/my/mariadb.pid")" 2>/dev/null || true
        for _ in $(seq 50); do [ -f "$WORK/my/mariadb.pid" ] || break; sleep 0.2; done
    fi
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# ---------------------------------------------------------------- our side
say "building our side against $SRC/host (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
# The CLI is its own package (image-cache-cli) in newer checkouts.
CLI_PACKAGE=image-cache
[ -f "$SRC/cli/Cargo.toml" ] && CLI_PACKAGE=image-cache-cli
# --locked: a benchmark never rewrites the checkout's Cargo.lock.
(cd "$SRC" && cargo build --release --locked -q -p "$CLI_PACKAGE" --bin image-cache)
IMAGE_CACHE=$CARGO_TARGET_DIR/release/image-cache
PEER_SRC=$WORK/centralized-peer
mkdir -p "$PEER_SRC/src"
cp "$SRC/Cargo.lock" "$PEER_SRC/Cargo.lock"
cat > "$PEER_SRC/Cargo.toml" <<EOF
[package]
name = "centralized-peer"
version = "0.1.0"
edition = "2024"
publish = false

[dependencies]
image-cache = { path = "$SRC/host" }

# As the workspace's, so the dependencies built for it are reused.
[profile.release]
debug = "line-tables-only"

[workspace]
EOF
cat > "$PEER_SRC/src/main.rs" <<'EOF'
//! Our side of host/benches/centralized_vs_glance.sh: the built-in
//! `centralized` driver through the host library, on the database at
//! `--url` (PostgreSQL or MySQL/MariaDB, as the cache's fenced account),
//! the same cells as `glance_peer.py --driver centralized_db --workloads
//! central`: same ids, sizes, access times and order. One run; one JSON
//! object on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image_cache::bindings::database::{Dialect, Value};
use image_cache::database::{CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings, dialect_of_url};
use image_cache::limits::Deadline;
use image_cache::{CacheConfig, DriverSource, ImageCache, Limits, Runtime};

/// Unix time of the oldest image's last access (glance_peer.py's BASE_TIME).
const BASE: i64 = 1_700_000_000;

fn id(i: usize) -> String {
    format!("{i:08}-0000-4000-8000-000000000000")
}

struct Args {
    url: String,
    node: String,
    root: PathBuf,
    n: usize,
    point_calls: usize,
    hit_calls: usize,
    cache_calls: usize,
    file_bytes: usize,
    scan_budget_s: f64,
}

fn args() -> Args {
    let mut a = Args {
        url: String::new(),
        node: "http://ours:9292".into(),
        root: PathBuf::from("/tmp/centralized-peer"),
        n: 10_000,
        point_calls: 5_000,
        hit_calls: 1_000,
        cache_calls: 300,
        file_bytes: 4096,
        scan_budget_s: 2.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--url" => a.url = v(),
            "--node-url" => a.node = v(),
            "--root" => a.root = PathBuf::from(v()),
            "--n" => a.n = v().parse().unwrap(),
            "--point-calls" => a.point_calls = v().parse().unwrap(),
            "--hit-calls" => a.hit_calls = v().parse().unwrap(),
            "--cache-calls" => a.cache_calls = v().parse().unwrap(),
            "--file-bytes" => a.file_bytes = v().parse().unwrap(),
            "--scan-budget-s" => a.scan_budget_s = v().parse().unwrap(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(!a.url.is_empty(), "--url is required");
    a
}

fn deadline() -> Deadline {
    Deadline(Instant::now() + Duration::from_secs(600))
}

/// Set-up and checks through the same database interface the driver
/// uses, as the same fenced account (none of it is timed).
struct Db {
    root: Arc<DatabaseRoot>,
    dialect: Dialect,
}

impl Db {
    fn p(&self, n: usize) -> String {
        match self.dialect {
            Dialect::Postgresql => format!("${n}"),
            Dialect::Mysql => "?".into(),
        }
    }

    fn sql(&self, sql: &str, params: Vec<Value>) -> u64 {
        let mut c = self
            .root
            .open(CENTRALIZED_DATABASE, deadline())
            .unwrap_or_else(|e| panic!("open: {}", e.message));
        c.execute(sql, params, deadline())
            .unwrap_or_else(|e| panic!("{sql}: {}", e.message))
    }

    fn one_integer(&self, sql: &str, params: Vec<Value>) -> i64 {
        let mut c = self.root.open(CENTRALIZED_DATABASE, deadline()).unwrap();
        let rows = c
            .query(sql, params, deadline())
            .unwrap_or_else(|e| panic!("{sql}: {}", e.message));
        match rows.first().and_then(|r| r.first()) {
            Some(Value::Integer(i)) => *i,
            other => panic!("{sql}: {other:?}"),
        }
    }

    fn node_id(&self, node: &str) -> i64 {
        self.one_integer(
            &format!(
                "SELECT node_reference_id FROM node_reference WHERE node_reference_url = {}",
                self.p(1)
            ),
            vec![Value::Text(node.into())],
        )
    }

    /// This node's rows in cached_images.
    fn rows(&self, node: &str) -> i64 {
        self.one_integer(
            &format!(
                "SELECT COUNT(*) FROM cached_images c JOIN node_reference n \
                 ON n.node_reference_id = c.node_reference_id WHERE n.node_reference_url = {}",
                self.p(1)
            ),
            vec![Value::Text(node.into())],
        )
    }

    /// Both tables empty (each phase starts from nothing).
    fn reset(&self) {
        self.sql("DELETE FROM cached_images", vec![]);
        self.sql("DELETE FROM node_reference", vec![]);
    }

    /// `n` rows for `node`, last access one second apart in id order.
    fn populate_rows(&self, node: &str, n: usize, size: usize) {
        let node_id = self.node_id(node);
        match self.dialect {
            Dialect::Postgresql => {
                self.sql(
                    "INSERT INTO cached_images \
                     (image_id, last_accessed, last_modified, size, hits, node_reference_id) \
                     SELECT lpad(i::text, 8, '0') || '-0000-4000-8000-000000000000', \
                            to_timestamp($1 + i) AT TIME ZONE 'UTC', \
                            to_timestamp($1 + i) AT TIME ZONE 'UTC', $2, 0, $3 \
                     FROM generate_series(0, $4) AS i",
                    vec![
                        Value::Integer(BASE),
                        Value::Integer(size as i64),
                        Value::Integer(node_id),
                        Value::Integer(n as i64 - 1),
                    ],
                );
            }
            Dialect::Mysql => {
                let mut start = 0;
                while start < n {
                    let end = (start + 500).min(n);
                    let rows = vec!["(?, FROM_UNIXTIME(?), FROM_UNIXTIME(?), ?, 0, ?)"; end - start];
                    let mut params = Vec::with_capacity((end - start) * 5);
                    for i in start..end {
                        params.push(Value::Text(id(i)));
                        params.push(Value::Integer(BASE + i as i64));
                        params.push(Value::Integer(BASE + i as i64));
                        params.push(Value::Integer(size as i64));
                        params.push(Value::Integer(node_id));
                    }
                    self.sql(
                        &format!(
                            "INSERT INTO cached_images \
                             (image_id, last_accessed, last_modified, size, hits, node_reference_id) \
                             VALUES {}",
                            rows.join(", ")
                        ),
                        params,
                    );
                    start = end;
                }
            }
        }
    }
}

fn populate_files(root: &Path, n: usize, size: usize) {
    let data = vec![0xa5u8; size];
    for i in 0..n {
        std::fs::write(root.join(id(i)), &data).unwrap();
    }
}

fn fresh(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(format!("ours-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn open(runtime: &Arc<Runtime>, dir: &Path, db: &Db, node: &str) -> ImageCache {
    let mut config = CacheConfig::new(dir)
        .driver(DriverSource::Builtin("centralized"))
        .fallback_to_sqlite(false);
    config.databases = db.root.clone();
    config
        .driver_options
        .push(("worker_self_reference_url".into(), node.into()));
    ImageCache::with_runtime(runtime.clone(), config).expect("opening the centralized cache")
}

/// Microseconds per call of `f` over `n` calls.
fn per_call(n: usize, mut f: impl FnMut(usize)) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        f(i);
    }
    t.elapsed().as_secs_f64() * 1e6 / n as f64
}

fn main() {
    let a = args();
    let dialect = dialect_of_url(&a.url).unwrap();
    // The cache's fenced account: allow_privileged_role stays false, so
    // the backend refuses anything with more than the grants.
    let settings = DatabaseSettings::new(a.url.clone());
    let db = Db {
        root: Arc::new(
            DatabaseRoot::new()
                .with_database(CENTRALIZED_DATABASE, &settings)
                .unwrap(),
        ),
        dialect,
    };
    std::fs::create_dir_all(&a.root).unwrap();
    let runtime = Runtime::new(Limits::default(), Some(a.root.join("artifacts"))).unwrap();
    let (n, node) = (a.n, a.node.as_str());
    let mut out: Vec<String> = vec![
        "\"side\": \"ours\"".into(),
        format!("\"n\": {n}"),
        format!("\"file_bytes\": {}", a.file_bytes),
    ];
    // Load (compile) the component once, outside every timing.
    {
        db.reset();
        let dir = fresh(&a.root, "warm");
        drop(open(&runtime, &dir, &db, node));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // N images: list, is-cached, hit, cache one small image.
    db.reset();
    let dir = fresh(&a.root, "meta");
    let cache = open(&runtime, &dir, &db, node);
    populate_files(&dir, n, a.file_bytes);
    db.populate_rows(node, n, a.file_bytes);
    let t = Instant::now();
    let mut calls = 0;
    while calls < 20 {
        assert_eq!(cache.get_cached_images().unwrap().len(), n);
        calls += 1;
        if calls >= 3 && t.elapsed().as_secs_f64() >= a.scan_budget_s {
            break;
        }
    }
    out.push(format!(
        "\"list_us\": {}",
        t.elapsed().as_secs_f64() * 1e6 / calls as f64
    ));
    out.push(format!("\"list_calls\": {calls}"));
    let v = per_call(a.point_calls, |i| {
        assert!(cache.is_cached(&id(i * 7 % n)).unwrap())
    });
    out.push(format!("\"is_cached_us\": {v}"));
    let mut buf = Vec::with_capacity(a.file_bytes);
    let v = per_call(a.hit_calls.min(n), |i| {
        buf.clear();
        let got = cache.read_image(&id(i), &mut buf).unwrap();
        assert_eq!(got as usize, a.file_bytes);
    });
    out.push(format!("\"hit_us\": {v}"));
    assert_eq!(cache.get_hit_count(&id(0)).unwrap(), 1);
    let small = vec![3u8; a.file_bytes];
    let v = per_call(a.cache_calls, |i| {
        cache
            .cache_reader(&format!("small-{i:08}"), None, &small[..])
            .unwrap();
    });
    out.push(format!("\"cache_us\": {v}"));
    let rows = db.rows(node);
    out.push(format!("\"rows_after_cache\": {rows}"));
    assert_eq!(rows as usize, n + a.cache_calls);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // N images pruned to half.
    db.reset();
    let dir = fresh(&a.root, "prune");
    let cache = open(&runtime, &dir, &db, node);
    populate_files(&dir, n, a.file_bytes);
    db.populate_rows(node, n, a.file_bytes);
    let t = Instant::now();
    let report = cache.prune((n * a.file_bytes) as u64 / 2).unwrap();
    out.push(format!("\"prune_s\": {}", t.elapsed().as_secs_f64()));
    out.push(format!("\"prune_evicted\": {}", report.removed.len()));
    assert_eq!(report.removed.len(), n - n / 2);
    assert_eq!(report.removed[0].image_id, id(0));
    assert_eq!(db.rows(node) as usize, n / 2);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // N images deleted at once.
    db.reset();
    let dir = fresh(&a.root, "delete-all");
    let cache = open(&runtime, &dir, &db, node);
    populate_files(&dir, n, a.file_bytes);
    db.populate_rows(node, n, a.file_bytes);
    let t = Instant::now();
    let deleted = cache.delete_all_cached_images().unwrap();
    out.push(format!("\"delete_all_s\": {}", t.elapsed().as_secs_f64()));
    assert_eq!(deleted as usize, n);
    assert_eq!(db.rows(node), 0);
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();

    // Leave this node's row and one image's row behind: the script runs
    // `glance-manage db sync` again on a database our nodes have written.
    let dir = fresh(&a.root, "leftover");
    let cache = open(&runtime, &dir, &db, node);
    cache.cache_reader(&id(0), None, &[1u8; 16][..]).unwrap();
    drop(cache);
    std::fs::remove_dir_all(&dir).unwrap();
    println!("{{{}}}", out.join(", "));
}
EOF
(cd "$PEER_SRC" && cargo build --release -q)
PEER=$CARGO_TARGET_DIR/release/centralized-peer

# ---------------------------------------------------------------- servers
start_postgres() {
    if [ -n "${BENCH_PG_ADMIN:-}" ]; then
        PG_HOST=${BENCH_PG_HOST:-127.0.0.1}; PG_PORT=${BENCH_PG_PORT:-5432}
        pg_admin() { psql "$BENCH_PG_ADMIN dbname=$1" -X -q -v ON_ERROR_STOP=1 -c "$2"; }
        return
    fi
    mkdir -p "$WORK/pg"
    [ $AS_ROOT = 1 ] && chown postgres: "$WORK/pg"
    as_user postgres "$PG_BIN/initdb" -U postgres -E UTF8 -A trust --auth-host=scram-sha-256 \
        -D "$WORK/pg/data" >/dev/null
    PG_HOST=127.0.0.1; PG_PORT=$(free_port)
    # The server's default durability (fsync, synchronous_commit on).
    as_user postgres "$PG_BIN/pg_ctl" start -w -D "$WORK/pg/data" -l "$WORK/pg/log" \
        -o "-p $PG_PORT -k $WORK/pg -c listen_addresses=127.0.0.1" >/dev/null
    pg_admin() {
        "$PG_BIN/psql" "host=$WORK/pg port=$PG_PORT user=postgres dbname=$1" \
            -X -q -v ON_ERROR_STOP=1 -c "$2"
    }
}

start_mariadb() {
    if [ -n "${BENCH_MARIADB_ADMIN:-}" ]; then
        MY_HOST=${BENCH_MARIADB_HOST:-127.0.0.1}; MY_PORT=${BENCH_MARIADB_PORT:-3306}
        # shellcheck disable=SC2086
        my_admin() { mariadb --no-defaults $BENCH_MARIADB_ADMIN -N -B -e "$1"; }
        return
    fi
    mkdir -p "$WORK/my"
    local user_args=()
    if [ $AS_ROOT = 1 ]; then chown mysql: "$WORK/my"; user_args=(--user=mysql); fi
    mariadb-install-db --no-defaults --datadir="$WORK/my/data" \
        --auth-root-authentication-method=normal --skip-test-db "${user_args[@]}" >/dev/null
    MY_HOST=127.0.0.1; MY_PORT=$(free_port)
    # The server's default durability (innodb_flush_log_at_trx_commit=1).
    /usr/sbin/mariadbd --no-defaults --datadir="$WORK/my/data" --socket="$WORK/my/mariadb.sock" \
        --pid-file="$WORK/my/mariadb.pid" --log-error="$WORK/my/server.log" \
        --port="$MY_PORT" --bind-address=127.0.0.1 --skip-name-resolve --skip-log-bin \
        "${user_args[@]}" >/dev/null 2>&1 &
    my_admin() { mariadb --no-defaults --socket="$WORK/my/mariadb.sock" --user=root -N -B -e "$1"; }
    for _ in $(seq 300); do my_admin "SELECT 1" >/dev/null 2>&1 && return; sleep 0.2; done
    say "MariaDB did not start:"; cat "$WORK/my/server.log" >&2; exit 1
}

# Per database: GLANCE_URL (owner), OURS_URL (fenced), the config file.
setup_db() { # postgresql|mariadb
    local db=$1 conf=$WORK/glance-api-$1.conf
    case $db in
    postgresql)
        start_postgres
        pg_admin postgres "CREATE ROLE glance_owner LOGIN PASSWORD '$PW'"
        pg_admin postgres "CREATE ROLE image_cache LOGIN PASSWORD '$PW'"
        pg_admin postgres "CREATE DATABASE glance OWNER glance_owner"
        GLANCE_URL="postgresql+psycopg2://glance_owner:$PW@$PG_HOST:$PG_PORT/glance"
        OURS_URL="postgresql://image_cache:$PW@$PG_HOST:$PG_PORT/glance"
        ;;
    mariadb)
        start_mariadb
        my_admin "CREATE DATABASE glance CHARACTER SET utf8;
                  CREATE USER 'glance_owner'@'%' IDENTIFIED BY '$PW';
                  GRANT ALL PRIVILEGES ON glance.* TO 'glance_owner'@'%';
                  CREATE USER 'image_cache'@'%' IDENTIFIED BY '$PW'"
        GLANCE_URL="mysql+pymysql://glance_owner:$PW@$MY_HOST:$MY_PORT/glance?charset=utf8"
        OURS_URL="mysql+pymysql://image_cache:$PW@$MY_HOST:$MY_PORT/glance"
        ;;
    esac
    printf '[DEFAULT]\n\n[database]\nconnection = %s\n' "$GLANCE_URL" > "$conf"
    say "$db: glance-manage db sync (before our nodes)"
    if "$GLANCE_VENV/bin/glance-manage" --config-file "$conf" db sync \
        > "$WORK/results/$db-dbsync-before.log" 2>&1; then
        echo ok > "$WORK/results/$db-dbsync-before.rc"
    else
        echo "failed ($?)" > "$WORK/results/$db-dbsync-before.rc"
        say "$db: glance-manage db sync failed:"; tail -20 "$WORK/results/$db-dbsync-before.log" >&2
        return 1
    fi
    # The cache's account gets exactly what `image-cache db grants` prints.
    case $db in
    postgresql)
        "$IMAGE_CACHE" db grants --role image_cache --database glance \
            > "$WORK/results/$db-grants.sql"
        pg_admin glance "$(grep -v '^--' "$WORK/results/$db-grants.sql")" ;;
    mariadb)
        "$IMAGE_CACHE" db grants --mysql --role image_cache --database glance \
            > "$WORK/results/$db-grants.sql"
        my_admin "$(grep -v '^--' "$WORK/results/$db-grants.sql")" ;;
    esac
}

dbsync_after() { # db: run db sync again on the tables our nodes wrote
    local db=$1
    local rows
    rows=$("$GLANCE_VENV/bin/python" - "$GLANCE_URL" <<'EOF'
import sys, sqlalchemy as sa
e = sa.create_engine(sys.argv[1])
with e.connect() as c:
    print(c.execute(sa.text("SELECT COUNT(*) FROM node_reference")).scalar(),
          c.execute(sa.text("SELECT COUNT(*) FROM cached_images")).scalar())
EOF
)
    if "$GLANCE_VENV/bin/glance-manage" --config-file "$WORK/glance-api-$db.conf" db sync \
        > "$WORK/results/$db-dbsync-after.log" 2>&1; then
        echo "ok, \"$(grep -E 'up to date|synced|Upgraded' "$WORK/results/$db-dbsync-after.log" \
            | tail -1)\" (node_reference, cached_images rows before: $rows)" \
            > "$WORK/results/$db-dbsync-after.rc"
    else
        echo "failed ($?) (rows before: $rows)" > "$WORK/results/$db-dbsync-after.rc"
        say "$db: glance-manage db sync after our nodes failed:"
        tail -20 "$WORK/results/$db-dbsync-after.log" >&2
    fi
    "$GLANCE_VENV/bin/glance-manage" --config-file "$WORK/glance-api-$db.conf" db version \
        > "$WORK/results/$db-dbversion.log" 2>&1 || true
}

for db in $DBS; do
    say "$db: setting up"
    setup_db "$db"
    for run in $(seq "$RUNS"); do
        say "$db: run $run/$RUNS: ours"
        cut -d' ' -f1 /proc/loadavg >> "$WORK/results/loadavg"
        "$PEER" --url "$OURS_URL" --node-url "http://ours:9292" --root "$WORK/cache" \
            --n "$N" --point-calls "$POINT_CALLS" --hit-calls "$HIT_CALLS" \
            --cache-calls "$CACHE_CALLS" --file-bytes "$FILE_BYTES" \
            > "$WORK/results/$db-ours-$run.json"
        [ "$run" = 1 ] && dbsync_after "$db"
        say "$db: run $run/$RUNS: Glance centralized_db"
        cut -d' ' -f1 /proc/loadavg >> "$WORK/results/loadavg"
        "$GLANCE_VENV/bin/python" "$HERE/glance_peer.py" --driver centralized_db \
            --connection "$GLANCE_URL" --node-url "http://glance:9292" \
            --root "$WORK/cache" --workloads central --n-meta "$N" \
            --meta-calls "$POINT_CALLS" --hit-calls "$HIT_CALLS" \
            --cache-calls "$CACHE_CALLS" --file-bytes "$FILE_BYTES" \
            --prune-timeout-s "$PRUNE_TIMEOUT_S" \
            > "$WORK/results/$db-glance-$run.json" 2> "$WORK/results/$db-glance-$run.err" || {
            say "$db: Glance's run failed:"; tail -30 "$WORK/results/$db-glance-$run.err" >&2; }
    done
done

# ---------------------------------------------------------------- table
print_table "$WORK/results"
