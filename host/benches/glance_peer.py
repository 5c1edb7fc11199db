#!/usr/bin/env python3
"""Peer benchmark driver for OpenStack Glance's own image cache.

Runs the same workloads as our Rust cache benchmarks against
``glance.image_cache.ImageCache`` with the ``sqlite``, ``xattr`` or
``centralized_db`` driver and prints ONE JSON object on stdout (progress goes
to stderr).

Run it with the interpreter of the venv that has glance installed:

    .venv-glance/bin/python host/benches/glance_peer.py --driver sqlite --root /tmp/gp
    .venv-glance/bin/python host/benches/glance_peer.py --driver centralized_db \
        --connection postgresql+psycopg2://glance:pw@127.0.0.1:5432/glance \
        --root /tmp/gp --workloads central

See host/benches/README-glance.md for the meaning of every number.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import logging
import os
import platform
import random
import shutil
import sys
import time
import uuid
import warnings

warnings.filterwarnings("ignore", category=DeprecationWarning)

from importlib import metadata  # noqa: E402

from oslo_config import cfg  # noqa: E402

from glance.common import utils as glance_utils  # noqa: E402
from glance import image_cache  # noqa: E402  (registers image_cache_* opts)
# Importing the drivers registers image_cache_sqlite_db (sqlite module).
from glance.image_cache.drivers import sqlite as sqlite_driver  # noqa: E402
from glance.image_cache.drivers import xattr as xattr_driver  # noqa: E402
# worker_self_reference_url (centralized_db's node name).
import glance.common.config  # noqa: E402,F401

CONF = cfg.CONF
KIB = 1024
MIB = 1024 * 1024
ALL_WORKLOADS = ("meta", "small", "big", "prune", "atime", "central")
DRIVERS = ("sqlite", "xattr", "centralized_db")
# Unix time of the oldest image's last access in `populate` (the Rust
# centralized bench uses the same).
BASE_TIME = 1700000000
# Glance's cache middleware serves a hit with utils.chunkiter(cache_file),
# i.e. 64 KiB reads; we read back the same way.
READ_CHUNK = 65536

perf = time.perf_counter


def log(msg):
    print("[glance_peer] " + msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# setup


def make_cache(driver, cache_dir, max_size=None):
    """Build an ImageCache exactly as Glance does: options on cfg.CONF."""
    CONF.set_override("image_cache_dir", cache_dir)
    CONF.set_override("image_cache_driver", driver)
    CONF.set_override("image_cache_sqlite_db", "cache.db")
    CONF.set_override("image_cache_stall_time", 86400)
    CONF.set_override("image_cache_max_size",
                      10 * 1024 ** 3 if max_size is None else max_size)
    if driver == "centralized_db":
        # Each workload starts with both tables empty; this node's row in
        # node_reference is then made by the driver's configure(), as when
        # glance-api starts.
        central_reset()
    cache = image_cache.ImageCache()
    mod = type(cache.driver).__module__
    if not mod.endswith("." + driver):
        # ImageCache silently falls back to sqlite if xattr can't configure.
        raise SystemExit("glance fell back to driver %s instead of %s "
                         "(xattr unsupported on %s?)" % (mod, driver,
                                                         cache_dir))
    return cache


def init_central_db(connection, node_url):
    """Point Glance's DB API at `connection`, as glance-api does from
    [database] connection: oslo.db's options registered, the URL set with
    set_override, the enginefacade rebuilt (as Glance's functional tests do
    with db_api.clear_db_env()). The tables must exist already
    (`glance-manage db sync`)."""
    from oslo_db import options as db_options
    from glance.db.sqlalchemy import api as db_api
    db_options.set_defaults(CONF)
    CONF.set_override("connection", connection, group="database")
    CONF.set_override("worker_self_reference_url", node_url)
    db_api.clear_db_env()
    return db_api


def central_engine():
    from glance.db.sqlalchemy import api as db_api
    return db_api.get_engine()


def central_reset():
    """Empty Glance's two cache tables (every phase starts from nothing)."""
    import sqlalchemy as sa
    with central_engine().begin() as conn:
        conn.execute(sa.text("DELETE FROM cached_images"))
        conn.execute(sa.text("DELETE FROM node_reference"))


def central_rows():
    """Rows of cached_images for this node (a check, not timed)."""
    import sqlalchemy as sa
    with central_engine().connect() as conn:
        return conn.execute(sa.text(
            "SELECT COUNT(*) FROM cached_images c JOIN node_reference n "
            "ON n.node_reference_id = c.node_reference_id "
            "WHERE n.node_reference_url = :u"),
            {"u": CONF.worker_self_reference_url}).scalar()


def central_insert(rows):
    """rows: (image_id, last_accessed, last_modified, hits, size), times
    in Unix seconds; one multi-row INSERT per 1000 rows, one transaction.
    The node's row must exist (make_cache made it)."""
    import sqlalchemy as sa
    from glance.db.sqlalchemy import models
    url = CONF.worker_self_reference_url
    utc = datetime.timezone.utc

    def naive(t):
        # Glance stores naive UTC (oslo_utils.timeutils.utcnow()).
        return datetime.datetime.fromtimestamp(t, utc).replace(tzinfo=None)

    table = models.CachedImages.__table__
    with central_engine().begin() as conn:
        node_id = conn.execute(sa.text(
            "SELECT node_reference_id FROM node_reference "
            "WHERE node_reference_url = :u"), {"u": url}).scalar_one()
        values = [{"image_id": iid, "last_accessed": naive(acc),
                   "last_modified": naive(mod), "hits": hits, "size": size,
                   "checksum": None, "node_reference_id": node_id}
                  for iid, acc, mod, hits, size in rows]
        for i in range(0, len(values), 1000):
            conn.execute(table.insert(), values[i:i + 1000])


class Ids:
    """Deterministic UUID-shaped image ids (Glance image ids are UUIDs)."""

    def __init__(self, seed):
        self.rng = random.Random(seed)

    def take(self, n):
        return [str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
                for _ in range(n)]


def populate(cache, driver, ids, nbytes, how):
    """Put len(ids) images of nbytes each into the cache.

    how == "driver": ImageCache.cache_image_iter (Glance's write path:
      incomplete/ file, md5, rename, + sqlite row / 'hits' xattr).
    how == "direct": write the final file ourselves, then the same driver
      metadata Glance's commit() writes (sqlite: one INSERT per image, all in
      ONE transaction; xattr: user.hits=0; centralized_db: rows in
      cached_images for this node, one transaction). Last-access times are
      spread one second apart in id order (sqlite/centralized_db
      last_accessed, xattr atime) so the LRU order is well defined
      (MariaDB's DATETIME keeps whole seconds).
    Returns seconds taken.
    """
    data = b"\xa5" * nbytes
    t0 = perf()
    if how == "driver":
        for iid in ids:
            if not cache.cache_image_iter(iid, iter([data])):
                raise RuntimeError("cache_image_iter refused " + iid)
        return perf() - t0
    d = cache.driver
    base = time.time() - len(ids) - 10
    if driver == "centralized_db":
        base = BASE_TIME
    rows = []
    for i, iid in enumerate(ids):
        path = d.get_image_filepath(iid)
        with open(path, "wb") as f:
            f.write(data)
        if driver == "xattr":
            xattr_driver.set_xattr(path, "hits", 0)
            os.utime(path, (base + i, base + i))
        else:
            rows.append((iid, base + i, base + i, 0, nbytes))
    if driver == "sqlite":
        from glance.image_cache.drivers import common
        with common.get_db(d.db_path) as db:
            db.executemany(
                "INSERT INTO cached_images (image_id, last_accessed, "
                "last_modified, hits, size) VALUES (?, ?, ?, ?, ?)", rows)
            db.commit()
    elif driver == "centralized_db":
        central_insert(rows)
    return perf() - t0


def us_per_op(fn, args):
    t0 = perf()
    for a in args:
        fn(a)
    return (perf() - t0) / len(args) * 1e6


def repeat_us(fn, min_calls=3, max_calls=20, budget_s=2.0):
    """Average us/call of a whole-cache scan; fewer calls when slow."""
    calls = 0
    t0 = perf()
    while calls < max_calls:
        fn()
        calls += 1
        if calls >= min_calls and perf() - t0 >= budget_s:
            break
    return (perf() - t0) / calls * 1e6, calls


def read_fully(cache, iid):
    n = 0
    with cache.open_for_read(iid) as f:
        for chunk in glance_utils.chunkiter(f, READ_CHUNK):
            n += len(chunk)
    return n


class Workdirs:
    def __init__(self, root, driver, keep):
        self.root, self.driver, self.keep = root, driver, keep
        self.tag = "%d-%d" % (os.getpid(), int(time.time()))

    @contextlib.contextmanager
    def fresh(self, name):
        path = os.path.join(self.root, "glance-%s-%s-%s"
                            % (self.driver, name, self.tag))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(path)
        try:
            yield path
        finally:
            if not self.keep:
                shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------
# workloads


def wl_meta(a, wd):
    n = a.n_meta
    calls = a.meta_calls
    ids = Ids(1)
    cached = ids.take(n)
    with wd.fresh("meta") as d:
        cache = make_cache(a.driver, d)
        log("meta: populating %d x %d B (%s)" % (n, a.file_bytes,
                                                 a.populate))
        pop_s = populate(cache, a.driver, cached, a.file_bytes, a.populate)
        rng = random.Random(2)
        hit_ids = [rng.choice(cached) for _ in range(calls)]
        miss_ids = ids.take(calls)
        out = {"n": n, "file_bytes": a.file_bytes, "populate": a.populate,
               "populate_s": round(pop_s, 3), "point_calls": calls}
        log("meta: point ops")
        out["is_cached_hit_us"] = us_per_op(cache.is_cached, hit_ids)
        out["is_cached_miss_us"] = us_per_op(cache.is_cached, miss_ids)
        out["get_hit_count_us"] = us_per_op(cache.get_hit_count, hit_ids)
        # queue_image: new (uncached) ids -> touches queue/<id>, returns True
        q_ids = ids.take(calls)
        res = []
        t0 = perf()
        for iid in q_ids:
            res.append(cache.queue_image(iid))
        out["queue_image_new_us"] = (perf() - t0) / calls * 1e6
        out["queue_image_new_all_true"] = all(res)
        # already queued -> 3 existence checks, returns False
        out["queue_image_already_queued_us"] = us_per_op(cache.queue_image,
                                                         q_ids)
        # already cached -> 1 existence check, returns False
        out["queue_image_already_cached_us"] = us_per_op(cache.queue_image,
                                                         hit_ids)
        out["queued_count"] = len(cache.get_queued_images())
        log("meta: scans")
        us, c = repeat_us(cache.get_cached_images, budget_s=a.scan_budget_s)
        out["get_cached_images_us"], out["get_cached_images_calls"] = us, c
        out["get_cached_images_len"] = len(cache.get_cached_images())
        us, c = repeat_us(cache.get_cache_size, budget_s=a.scan_budget_s)
        out["get_cache_size_us"], out["get_cache_size_calls"] = us, c
        out["get_cache_size_bytes"] = cache.get_cache_size()
    return out


def wl_small(a, wd):
    n = a.n_small
    ids = Ids(3).take(n)
    data = os.urandom(a.file_bytes)
    with wd.fresh("small") as d:
        cache = make_cache(a.driver, d)
        log("small: cache %d x %d B" % (n, a.file_bytes))
        t0 = perf()
        for iid in ids:
            cache.cache_image_iter(iid, iter([data]))
        cache_us = (perf() - t0) / n * 1e6
        log("small: read %d" % n)
        total = 0
        t0 = perf()
        for iid in ids:
            total += read_fully(cache, iid)
        read_us = (perf() - t0) / n * 1e6
        assert total == n * a.file_bytes, total
        hits = cache.get_hit_count(ids[0])
    return {"n": n, "file_bytes": a.file_bytes,
            "cache_image_iter_us": cache_us, "open_for_read_full_us": read_us,
            "hit_count_after_one_read": hits}


def wl_big(a, wd):
    size = a.big_mib * MIB
    chunk = os.urandom(MIB)
    # md5 baseline: Glance's cache_tee_iter always md5s every chunk.
    h = hashlib.md5(usedforsecurity=False)
    t0 = perf()
    for _ in range(64):
        h.update(chunk)
    md5_mb_s = 64 * MIB / (perf() - t0) / 1e6

    def chunks():
        for _ in range(a.big_mib):
            yield chunk

    with wd.fresh("big") as d:
        cache = make_cache(a.driver, d)
        log("big: cache %d MiB" % a.big_mib)
        t0 = perf()
        ok = cache.cache_image_iter("big-image", chunks())
        w_s = perf() - t0
        assert ok and cache.get_image_size("big-image") == size
        log("big: read back")
        t0 = perf()
        got = read_fully(cache, "big-image")
        r_s = perf() - t0
        assert got == size, got
    return {"mib": a.big_mib, "write_chunk_bytes": MIB,
            "read_chunk_bytes": READ_CHUNK,
            "cache_s": w_s, "cache_MB_s": size / w_s / 1e6,
            "cache_MiB_s": size / w_s / MIB,
            "read_s": r_s, "read_MB_s": size / r_s / 1e6,
            "read_MiB_s": size / r_s / MIB,
            "md5_baseline_MB_s": md5_mb_s,
            "note": "no fsync (Glance does none); read-back is served "
                    "from the page cache"}


def wl_prune(a, wd):
    results = []
    per_evict_const = None  # seconds per eviction not due to the LRU scan
    for n in sorted(a.prune_n):
        ids = Ids(100 + n).take(n)
        with wd.fresh("prune%d" % n) as d:
            cache = make_cache(a.driver, d)
            log("prune: populating %d (%s)" % (n, a.populate))
            pop_s = populate(cache, a.driver, ids, a.file_bytes, a.populate)
            total = cache.get_cache_size()
            max_size = total // 2
            expect_evict = n - max_size // a.file_bytes
            # cost of one LRU scan at this size (read-only)
            t0 = perf()
            for _ in range(3):
                cache.driver.get_least_recently_accessed()
            scan_s = (perf() - t0) / 3
            r = {"n": n, "file_bytes": a.file_bytes, "populate": a.populate,
                 "populate_s": round(pop_s, 3), "total_bytes": total,
                 "max_size": max_size, "lru_scan_s": scan_s}
            if per_evict_const is not None:
                est = expect_evict * (per_evict_const + scan_s)
                r["extrapolated_s"] = est
                if est > a.prune_timeout_s:
                    r["skipped"] = True
                    r["reason"] = ("extrapolated %.0f s > --prune-timeout-s "
                                   "%g (model: evictions x (per-eviction "
                                   "cost at smaller n + one LRU scan at "
                                   "this n))" % (est, a.prune_timeout_s))
                    log("prune: skip n=%d (%s)" % (n, r["reason"]))
                    results.append(r)
                    continue
            CONF.set_override("image_cache_max_size", max_size)
            log("prune: n=%d -> max_size %d" % (n, max_size))
            t0 = perf()
            files, nbytes = cache.prune()
            s = perf() - t0
            after = cache.get_cache_size()
            r.update({"skipped": False, "seconds": s, "evicted": files,
                      "evicted_bytes": nbytes, "size_after": after,
                      "us_per_evicted": s / max(files, 1) * 1e6})
            assert after <= max_size, (after, max_size)
            if files:
                per_evict_const = max(s / files - scan_s, 0.0)
            results.append(r)
    return {"sizes": results,
            "note": "ImageCache.prune(): one get_least_recently_accessed() "
                    "full scan (sqlite: ORDER BY last_accessed LIMIT 1 "
                    "without index; xattr: listdir+stat of every file) "
                    "per evicted image"}


def wl_atime(a, wd):
    """How the xattr driver's LRU key (st_atime) behaves on this mount."""
    with wd.fresh("atime") as d:
        cache = make_cache(a.driver, d)
        cache.cache_image_iter("a", iter([b"x" * 4096]))
        p = cache.driver.get_image_filepath("a")
        st0 = os.stat(p)
        time.sleep(1.1)
        read_fully(cache, "a")
        st1 = os.stat(p)
        time.sleep(1.1)
        read_fully(cache, "a")
        st2 = os.stat(p)
        lra = cache.driver.get_least_recently_accessed()
        import stat as st
        return {
            "atime_after_write": st0.st_atime,
            "atime_updated_by_1st_read": st1.st_atime_ns > st0.st_atime_ns,
            "atime_updated_by_2nd_read": st2.st_atime_ns > st1.st_atime_ns,
            "hits_after_2_reads": cache.get_hit_count("a"),
            "stat_tuple_atime_is_int": isinstance(
                os.stat(p)[st.ST_ATIME], int),
            "least_recently_accessed": list(lra) if lra else None,
        }


class PruneTimeout(Exception):
    pass


def central_id(i):
    """The ids the Rust centralized bench uses (36 characters)."""
    return "%08d-0000-4000-8000-000000000000" % i


def wl_central(a, wd):
    """The cells of centralized_vs_glance.sh, in the order the Rust side
    (its centralized-peer program) runs them, with the same ids, sizes and
    access times: N images (files + rows), list / is-cached / hit / cache a
    small image; N images pruned to half; N images deleted at once. Each
    phase starts with both tables empty and a fresh directory."""
    if a.driver != "centralized_db":
        raise SystemExit("workload central needs --driver centralized_db")
    n = a.n_meta
    ids = [central_id(i) for i in range(n)]
    out = {"n": n, "file_bytes": a.file_bytes,
           "node_url": CONF.worker_self_reference_url}

    # N images: list, is-cached, hit, cache one small image.
    with wd.fresh("central-meta") as d:
        cache = make_cache(a.driver, d)
        populate(cache, a.driver, ids, a.file_bytes, "direct")
        t0 = perf()
        calls = 0
        while calls < 20:
            got = cache.get_cached_images()
            calls += 1
            if calls >= 3 and perf() - t0 >= a.scan_budget_s:
                break
        out["list_us"] = (perf() - t0) / calls * 1e6
        out["list_calls"] = calls
        assert len(got) == n, len(got)
        calls = a.meta_calls

        def is_cached(i):
            assert cache.is_cached(ids[i * 7 % n])
        out["is_cached_us"] = us_per_op(is_cached, range(calls))
        hits = min(a.hit_calls, n)

        def hit(i):
            got = read_fully(cache, ids[i])
            assert got == a.file_bytes, got
        out["hit_us"] = us_per_op(hit, range(hits))
        out["hit_count_after_one_read"] = cache.get_hit_count(ids[0])
        assert out["hit_count_after_one_read"] == 1, out
        data = b"\x03" * a.file_bytes
        small = ["small-%08d" % i for i in range(a.cache_calls)]
        out["cache_us"] = us_per_op(
            lambda iid: cache.cache_image_iter(iid, iter([data])), small)
        # cache_tee_iter logs and swallows a failed commit: check the rows.
        rows = central_rows()
        out["rows_after_cache"] = rows
        assert rows == n + a.cache_calls, (rows, n + a.cache_calls)

    # N images pruned to half (Glance's ImageCache.prune(): one
    # get_least_recently_accessed() query and one delete per image).
    with wd.fresh("central-prune") as d:
        cache = make_cache(a.driver, d)
        populate(cache, a.driver, ids, a.file_bytes, "direct")
        max_size = n * a.file_bytes // 2
        CONF.set_override("image_cache_max_size", max_size)
        deadline = perf() + a.prune_timeout_s
        evicted = [0]
        delete = cache.driver.delete_cached_image

        def delete_with_deadline(image_id):
            if perf() > deadline:
                raise PruneTimeout()
            delete(image_id)
            evicted[0] += 1
        cache.driver.delete_cached_image = delete_with_deadline
        t0 = perf()
        try:
            files, _ = cache.prune()
            out["prune_s"] = perf() - t0
            out["prune_evicted"] = files
            assert files == n - n // 2, files
            assert central_rows() == n // 2
        except PruneTimeout:
            out["prune_s"] = None
            out["prune_timed_out_s"] = perf() - t0
            out["prune_evicted_before_timeout"] = evicted[0]
            log("central: prune timed out after %.0f s, %d of %d evicted"
                % (perf() - t0, evicted[0], n - n // 2))
        finally:
            cache.driver.delete_cached_image = delete
            CONF.set_override("image_cache_max_size", 10 * 1024 ** 3)

    # N images deleted at once.
    with wd.fresh("central-delete-all") as d:
        cache = make_cache(a.driver, d)
        populate(cache, a.driver, ids, a.file_bytes, "direct")
        t0 = perf()
        deleted = cache.delete_all_cached_images()
        out["delete_all_s"] = perf() - t0
        assert deleted == n, deleted
        assert central_rows() == 0
    return out


# --------------------------------------------------------------------------


def fs_info(path):
    path = os.path.realpath(path)
    best = ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, typ, opts = line.split()[:4]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) \
                    and len(mnt) >= len(best[0]):
                best = (mnt, typ, opts)
    probe = os.path.join(path, ".glance_peer_xattr_probe")
    try:
        with open(probe, "wb"):
            pass
        os.setxattr(probe, "user.probe", b"1")
        ok = True
    except OSError:
        ok = False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)
    return {"mount": best[0], "type": best[1], "options": best[2],
            "user_xattr": ok}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--driver", required=True, choices=DRIVERS)
    p.add_argument("--connection",
                   help="centralized_db: Glance's [database] connection "
                        "(SQLAlchemy URL; the tables must exist: "
                        "glance-manage db sync)")
    p.add_argument("--node-url", default="http://glance-peer:9292",
                   help="centralized_db: worker_self_reference_url")
    p.add_argument("--root", required=True,
                   help="parent dir; each workload gets a fresh subdir")
    p.add_argument("--workloads", default=",".join(ALL_WORKLOADS),
                   help="comma list of " + ",".join(ALL_WORKLOADS))
    p.add_argument("--n-meta", type=int, default=10000)
    p.add_argument("--meta-calls", type=int, default=5000,
                   help="calls per point-op in 'meta'")
    p.add_argument("--n-small", type=int, default=1000)
    p.add_argument("--hit-calls", type=int, default=1000,
                   help="central: reads of distinct cached images")
    p.add_argument("--cache-calls", type=int, default=300,
                   help="central: small images cached")
    p.add_argument("--file-bytes", type=int, default=4096,
                   help="size of each small image (meta/small/prune)")
    p.add_argument("--prune-n", default="2000,20000")
    p.add_argument("--prune-timeout-s", type=float, default=300.0)
    p.add_argument("--big-mib", type=int, default=1024)
    p.add_argument("--populate", choices=("direct", "driver"),
                   default="direct",
                   help="how meta/prune images are created (see README)")
    p.add_argument("--scan-budget-s", type=float, default=2.0)
    p.add_argument("--keep", action="store_true",
                   help="keep the workload dirs")
    a = p.parse_args()
    a.prune_n = [int(x) for x in a.prune_n.split(",") if x.strip()]
    wls = [w.strip() for w in a.workloads.split(",") if w.strip()]
    for w in wls:
        if w not in ALL_WORKLOADS:
            p.error("unknown workload " + w)
    if a.driver == "centralized_db":
        if not a.connection:
            p.error("--driver centralized_db needs --connection")
        init_central_db(a.connection, a.node_url)

    # Quiet, deterministic logging: WARNING and up to stderr (Glance's
    # LOG.debug/info calls are made but not emitted, as with debug=False
    # and a WARNING log level).
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    os.makedirs(a.root, exist_ok=True)
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # nothing but the JSON goes to stdout

    result = {
        "tool": "glance_peer",
        "glance_version": metadata.version("glance"),
        "python": platform.python_version(),
        "driver": a.driver,
        "root": os.path.realpath(a.root),
        "fs": fs_info(a.root),
        "params": {k: v for k, v in vars(a).items()
                   if k != "connection"},
        "units": "*_us = microseconds per call (time.perf_counter); "
                 "*_s = seconds; *_MB_s = 1e6 bytes/s",
        "workloads": {},
    }
    if a.driver == "xattr" and not result["fs"]["user_xattr"]:
        result["error"] = "filesystem at --root has no user xattr support"
        print(json.dumps(result), file=real_stdout)
        return 2
    wd = Workdirs(a.root, a.driver, a.keep)
    fns = {"meta": wl_meta, "small": wl_small, "big": wl_big,
           "prune": wl_prune, "atime": wl_atime, "central": wl_central}
    t_all = perf()
    for w in wls:
        t0 = perf()
        result["workloads"][w] = fns[w](a, wd)
        result["workloads"][w]["wall_s"] = round(perf() - t0, 3)
        log("%s done in %.1f s" % (w, perf() - t0))
    result["wall_s"] = round(perf() - t_all, 3)
    print(json.dumps(result, indent=1), file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
