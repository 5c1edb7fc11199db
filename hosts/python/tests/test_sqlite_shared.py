"""Native SQLite and the sqlite driver component share one ``cache.db``.

Contract 0.3.0 runs SQLite inside the driver, over ``fs``: its locks are the
host's open-file-description byte-range locks on the very bytes native
SQLite locks, so Glance's own processes (its sqlite driver, the cache
pruner and cleaner) and this driver can use one cache root at once.

The process holding ``BEGIN EXCLUSIVE`` is a child process, as Glance's are:
within one process, closing *any* descriptor of a file drops the process's
POSIX locks on it (native SQLite's), and a driver closes its files whenever
it likes.
"""

from __future__ import annotations

import hashlib
import io
import sqlite3
import subprocess
import sys
import time

import pytest

from conftest import component
from image_cache_wasm import DatabaseError, DriverFault, ImageCache, Limits, Runtime

#: Holds BEGIN EXCLUSIVE on the database argv[1] for argv[2] seconds,
#: changing a row in it, and says when it has the lock and when it let go.
HOLDER = r"""
import sqlite3, sys, time
db, hold = sys.argv[1], float(sys.argv[2])
c = sqlite3.connect(db, timeout=10, isolation_level=None)
c.execute("BEGIN EXCLUSIVE")
c.execute("UPDATE cached_images SET hits = hits + 100 WHERE image_id = 'native'")
print("locked", flush=True)
time.sleep(hold)
c.execute("COMMIT")
c.close()
print("released", flush=True)
"""


def hold_exclusive(db, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db), str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def released(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "released"
    assert proc.wait(timeout=10) == 0
    proc.stdout.close()


@pytest.fixture
def cache(tmp_path, runtime):
    component("sqlite_driver")
    c = ImageCache(tmp_path / "root", driver="sqlite", runtime=runtime, fallback_to_sqlite=False)
    yield c
    c.close()


def test_rows_written_by_one_are_read_by_the_other(cache):
    root = cache.root
    digest = "md5:" + hashlib.md5(b"driver bytes").hexdigest()
    cache.cache("from-driver", io.BytesIO(b"driver bytes"), checksum=digest)
    assert cache.read("from-driver") == b"driver bytes"

    native = sqlite3.connect(root / "cache.db", isolation_level=None)
    assert native.execute("PRAGMA journal_mode").fetchone() == ("delete",), "a rollback journal, as Glance keeps"
    row = native.execute(
        "SELECT size, hits, checksum FROM cached_images WHERE image_id = 'from-driver'"
    ).fetchone()
    assert row == (12, 1, digest)

    # What Glance's own sqlite driver writes: a file and a row.
    (root / "from-native").write_bytes(b"native bytes!")
    now = time.time()
    native.execute(
        "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        ("from-native", now - 60, now - 60, 13, 7, None),
    )
    native.execute("UPDATE cached_images SET hits = 41 WHERE image_id = 'from-driver'")
    assert cache.get_hit_count("from-native") == 7
    assert cache.get_hit_count("from-driver") == 41
    listed = {i["image_id"]: i["hits"] for i in cache.list_cached()}
    assert listed == {"from-driver": 41, "from-native": 7}
    assert cache.read("from-native") == b"native bytes!"
    assert native.execute(
        "SELECT hits FROM cached_images WHERE image_id = 'from-native'"
    ).fetchone() == (8,), "the driver's hit is native SQLite's row"
    cache.delete_cached_image("from-native")
    assert native.execute("SELECT count(*) FROM cached_images WHERE image_id = 'from-native'").fetchone() == (0,)
    assert native.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    native.close()


def test_the_drivers_writes_wait_while_native_sqlite_holds_the_database(cache):
    cache.cache("native", io.BytesIO(b"n"))
    db = cache.root / "cache.db"
    proc = hold_exclusive(db, 1.0)
    try:
        started = time.monotonic()
        # Every step of caching an image reads or writes the database: it
        # waits (SQLite's busy handler, on clock.sleep) until the native
        # transaction commits, then goes on.
        cache.cache("while-locked", io.BytesIO(b"cached while native SQLite wrote"))
        waited = time.monotonic() - started
    finally:
        released(proc)
    assert 0.7 <= waited < 10, waited
    assert cache.read("while-locked") == b"cached while native SQLite wrote"
    assert cache.get_hit_count("native") == 100, "the native transaction's change is seen"
    native = sqlite3.connect(db)
    assert native.execute(
        "SELECT hits FROM cached_images WHERE image_id = 'while-locked'"
    ).fetchone() == (1,)
    assert native.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    native.close()
    # No hot journal: the driver keeps its journal between transactions
    # (journal_mode=PERSIST) with the header zeroed, which SQLite reads as
    # no journal at all.
    journal = cache.root / "cache.db-journal"
    assert not journal.exists() or journal.read_bytes()[:8] == bytes(8)


def test_waiting_for_native_sqlite_ends_at_the_call_deadline(tmp_path, artifacts):
    component("sqlite_driver")
    runtime = Runtime(Limits(call_deadline=1.0), artifacts=artifacts)
    cache = ImageCache(tmp_path / "root", driver="sqlite", runtime=runtime, fallback_to_sqlite=False)
    cache.cache("native", io.BytesIO(b"n"))
    proc = hold_exclusive(cache.root / "cache.db", 3.0)
    try:
        started = time.monotonic()
        with pytest.raises((DatabaseError, DriverFault)) as e:
            cache.get_hit_count("native")
        took = time.monotonic() - started
        assert "locked" in str(e.value), e.value
        assert 0.9 <= took < 2.0, f"gave up at the deadline: {took}"
    finally:
        released(proc)
    assert cache.get_hit_count("native") == 100, "the next call works once the lock is gone"
    cache.close()
