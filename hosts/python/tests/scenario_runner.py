"""Plays the shared scenarios (tests/scenarios/README.md) against the
Python host."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict

from image_cache_wasm import CacheError, ImageCache

#: The drivers a scenario without a `drivers` list runs on.
DRIVERS = ("sqlite", "xattr")
#: Drivers that need a shared database (a PostgreSQL or a MariaDB the tests
#: start, see pg.py and mariadb.py): they run every scenario without a
#: `drivers` list too, and those that name them, as the Rust conformance
#: suite's `centralized` and `centralized_mariadb` modules.
DATABASE_DRIVERS = ("centralized",)
#: Steps that check the LRU order, which follows the recorded access times.
LRU_OPS = {"get_least_recently_accessed", "get_least_recently_accessed_batch"}


def drivers_of(scenario: dict, with_database: bool = False) -> tuple:
    """The drivers ``scenario`` runs on: its ``drivers`` list, else every
    built-in driver (the database drivers only when asked for)."""
    if "drivers" in scenario:
        listed = tuple(scenario["drivers"])
        return listed if with_database else tuple(d for d in listed if d not in DATABASE_DRIVERS)
    return DRIVERS + (DATABASE_DRIVERS if with_database else ())


def load(path: Path) -> list:
    doc = json.loads(path.read_text())
    assert doc["format"] == 1, f"unknown scenario format {doc['format']}"
    return doc["scenarios"]


def data(spec: Any) -> bytes:
    """A data value: a string, {"pattern": seed, "len": n}, {"concat": [...]}."""
    if isinstance(spec, str):
        return spec.encode("utf-8")
    if isinstance(spec, dict) and "pattern" in spec:
        seed, n = spec["pattern"], spec["len"]
        return bytes(((i * 31) + seed) & 0xFF for i in range(n))
    if isinstance(spec, dict) and "concat" in spec:
        return b"".join(data(s) for s in spec["concat"])
    raise AssertionError(f"not a data value: {spec!r}")


def matches(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and matches(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        if isinstance(actual, tuple):
            actual = list(actual)
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(matches(e, a) for e, a in zip(expected, actual))
        )
    if isinstance(expected, bool) or isinstance(actual, bool):
        return expected is actual
    return expected == actual


class _Source:
    """Yields the chunks, then optionally fails as a broken image store."""

    def __init__(self, chunks, fail_at_end: bool):
        self.chunks = [data(c) for c in chunks]
        self.fail_at_end = fail_at_end

    def __iter__(self):
        yield from self.chunks
        if self.fail_at_end:
            raise ConnectionResetError("connection reset by the image store")


class Runner:
    def __init__(self, root: Path, driver: str, open_cache):
        self.root = root
        self.driver = driver
        self.open_cache = open_cache
        self.cache: ImageCache = open_cache()
        self.opened = [self.cache]
        self.sessions: Dict[str, Any] = {}
        self.last_passed = b""

    def close(self) -> None:
        for s in self.sessions.values():
            s.drop()
        for c in self.opened:
            c.close()

    def path(self, rel: str) -> Path:
        return self.root / rel

    def run(self, op: str, a: dict) -> Any:
        c = self.cache
        simple = {
            "is_cached", "is_cacheable", "is_being_cached", "is_queued", "queue_image",
            "get_hit_count", "get_image_size", "delete_cached_image", "delete_queued_image",
        }
        if op in simple:
            return getattr(c, op)(a["id"])
        if op in {"get_queued_images", "get_cache_size", "delete_all_cached_images",
                  "delete_all_queued_images", "get_cached_images"}:
            return getattr(c, op)()
        if op == "get_least_recently_accessed":
            r = c.get_least_recently_accessed()
            return None if r is None else [r[0], r[1]]
        if op == "get_least_recently_accessed_batch":
            return c.get_least_recently_accessed_batch(a["count"])
        if op == "clean":
            r = c.clean(a["stall_time"])
            return {
                "invalid": sorted(x["image_id"] for x in r["invalid"]),
                "incomplete": sorted(x["image_id"] for x in r["incomplete"]),
                "failures": len(r["failures"]),
            }
        if op == "prune":
            r = c.prune(a["max_size"])
            return {
                "removed": [x["image_id"] for x in r["removed"]],
                "bytes_removed": r["bytes_removed"],
                "size_after": r["size_after"],
            }
        if op == "put":
            with c.open_for_write(a["id"]) as w:
                w.write(data(a["data"]))
            return None
        if op == "get":
            with c.open_for_read(a["id"]) as r:
                return r.read()
        if op == "read_partial":
            r = c.open_for_read(a["id"])
            r.read(a["bytes"])
            r.close()
            return None
        if op == "open_for_write":
            self.sessions[a["session"]] = c.open_for_write(a["id"])
            return None
        if op == "write":
            self.sessions[a["session"]].write(data(a["data"]))
            return None
        if op == "commit":
            self.sessions.pop(a["session"]).commit(a.get("checksum"))
            return None
        if op == "abort":
            self.sessions.pop(a["session"]).abort(a["reason"])
            return None
        if op == "drop":
            self.sessions.pop(a["session"]).drop()
            return None
        if op == "cache_stream":
            passed = bytearray()
            self.last_passed = b""
            tee = c.cache_stream(a["id"], _Source(a["chunks"], a.get("fail_at_end", False)), a.get("checksum"))
            try:
                for chunk in tee:
                    passed += chunk
            finally:
                self.last_passed = bytes(passed)
            return {"cached": tee.report.cached, "bytes": tee.report.bytes}
        if op == "last_passed":
            return self.last_passed
        if op == "concurrent_gets":
            want = data(a["data"])
            ok = [0]
            lock = threading.Lock()
            failures = []

            def reader():
                for _ in range(a["each"]):
                    try:
                        got = c.read(a["id"])
                    except Exception as e:  # reported below
                        failures.append(e)
                        continue
                    if got == want:
                        with lock:
                            ok[0] += 1

            threads = [threading.Thread(target=reader) for _ in range(a["threads"])]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if failures:
                raise failures[0]
            return ok[0]
        if op == "write_file":
            p = self.path(a["path"])
            p.write_bytes(data(a["data"]))
            if "age" in a:
                t = time.time() - a["age"]
                os.utime(p, (t, t))
            return None
        if op == "mkdir":
            self.path(a["path"]).mkdir()
            return None
        if op == "list_files":
            return sorted(os.listdir(self.path(a["dir"])))
        if op == "reopen":
            self.cache = self.open_cache()
            self.opened.append(self.cache)
            return None
        raise AssertionError(f"unknown op {op!r}: the runner must implement every op")


BYTES_OPS = {"get", "last_passed"}


def tick(resolution: float) -> None:
    """Wait until a time recorded now sorts after every time recorded so
    far: into the next whole ``resolution`` (the Rust suite's
    ``TestCache::tick``)."""
    now = time.time()
    time.sleep(resolution - (now % resolution) + 0.02)


def play(scenario: dict, root: Path, driver: str, open_cache, time_resolution: float = 0.0) -> None:
    """Play ``scenario``. ``time_resolution``: the seconds the recorded
    times keep (1 where Glance's DATETIME columns keep whole seconds, on
    MySQL and MariaDB): in a scenario that checks the LRU order, each read
    waits for the next whole second first, as the Rust conformance tests
    do there (``t.tick()``), so its access time sorts after the others."""
    runner = Runner(root, driver, open_cache)
    ticks = time_resolution > 0 and any(step["op"] in LRU_OPS for step in scenario["steps"])
    try:
        for n, step in enumerate(scenario["steps"], 1):
            op, args = step["op"], step.get("args", {})
            where = f"{scenario['name']} [{driver}] step {n} {op} {args}"
            if ticks and op == "get":
                tick(time_resolution)
            if "expect_error" in step:
                want = step["expect_error"]
                try:
                    got = runner.run(op, args)
                except CacheError as e:
                    assert e.kind == want["kind"], f"{where}: expected {want['kind']}, got {e.kind}: {e}"
                    if "message_contains" in want:
                        assert want["message_contains"] in str(e), f"{where}: {e}"
                    continue
                raise AssertionError(f"{where}: expected error {want['kind']}, got {got!r}")
            got = runner.run(op, args)
            if "expect" in step:
                want = step["expect"]
                if op in BYTES_OPS:
                    assert got == data(want), f"{where}: bytes differ ({len(got)} bytes)"
                else:
                    assert matches(want, got), f"{where}: expected {want!r}, got {got!r}"
    finally:
        runner.close()
