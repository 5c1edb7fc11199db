"""A hostile driver component (guest/hostile: `is_cached(attack)` picks the
attack) gets the same refusals from the Python host as from the Rust host
(tests/hostile.rs, tests/attacks.rs): the attack fails, nothing outside the
root changes, the root's location is in no message, and the next call works.

Contract 0.3.0 retired the host-side `sqlite` import: SQL runs inside the
driver, over `fs`, so the SQL attacks are now attacks on what `fs` lets a
driver open and write, and on the deadline and memory cap that bound wasm.
"""

from __future__ import annotations

import fcntl
import io
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path

import pytest

from conftest import component
from image_cache_wasm import (
    DatabaseError,
    DriverFault,
    ImageCache,
    IoError,
    Limits,
    LoadError,
    Overloaded,
    Runtime,
)

DEADLINE = 0.8


def canary_state(d: Path):
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir())


class Scene:
    def __init__(self, top: Path, limits: Limits, artifacts: Path):
        self.root = top / "root"
        self.canary = top / "canary"
        self.canary.mkdir()
        (self.canary / "secret").write_bytes(b"do not read")
        victim = sqlite3.connect(self.canary / "victim.db")
        victim.executescript("CREATE TABLE t (x); INSERT INTO t VALUES ('victim');")
        victim.close()
        self.before = canary_state(self.canary)
        self.runtime = Runtime(limits, artifacts=artifacts)
        self.cache = ImageCache(
            self.root,
            driver=component("hostile_driver"),
            grants=["xattr"],
            options=[("hostile_target", str(self.canary / "victim.db"))],
            fallback_to_sqlite=False,
            runtime=self.runtime,
        )

    def discarded(self) -> int:
        return self.runtime.stats["instances_discarded"]

    def refusal(self, attack: str) -> Exception:
        with pytest.raises(Exception) as e:
            got = self.cache.is_cached(attack)
            pytest.fail(f"{attack}: the attack succeeded ({got})")
        text = str(e.value)
        assert str(self.root) not in text, f"{attack}: the root's location leaked: {text}"
        assert self.cache.is_cached("benign") is False, f"{attack}: the next call works"
        return e.value

    def database_refusal(self, attack: str, words: str) -> str:
        e = self.refusal(attack)
        assert isinstance(e, DatabaseError), f"{attack}: expected a database error, got {e!r}"
        assert words in e.message, f"{attack}: expected {words}: {e.message}"
        return e.message

    def fault(self, attack: str) -> str:
        before = self.discarded()
        e = self.refusal(attack)
        assert isinstance(e, DriverFault), f"{attack}: expected a driver fault, got {e!r}"
        assert self.discarded() == before + 1, f"{attack}: the instance is discarded"
        return e.message

    def check_nothing_outside_changed(self) -> None:
        assert canary_state(self.canary) == self.before, "nothing outside the root changed"
        assert not (self.root.parent / "hostile-planted.db").exists()
        assert not (self.root.parent / "outside.db").exists()
        assert not Path("hostile-planted.db").exists(), "nothing in the working directory"


@pytest.fixture
def scene(tmp_path, artifacts):
    s = Scene(tmp_path, Limits(call_deadline=DEADLINE, memory_bytes=64 << 20), artifacts)
    yield s
    s.cache.close()
    s.check_nothing_outside_changed()


def test_path_escapes_are_refused_by_the_host(scene):
    e = scene.refusal("escape-parent")
    assert isinstance(e, IoError) and "`..` is not allowed" in e.message
    e = scene.refusal("escape-absolute")
    assert isinstance(e, IoError) and "absolute paths are not allowed" in e.message
    assert scene.discarded() == 0, "a refusal is a value: the instance lives on"


def test_trusted_xattrs_are_refused(scene):
    e = scene.refusal("trusted-xattr")
    assert isinstance(e, IoError) and "only user.* names are allowed" in e.message, e


def test_sql_inside_the_driver_cannot_attach_or_write_files_outside_the_root(scene):
    # SQLite opens every file through fs: an absolute path, `..`, a file at
    # the top of the root other than the database: none opens.
    for attack in ["sql-attach", "sql-attach-relative", "sql-vacuum-into"]:
        scene.database_refusal(attack, "unable to open")
    assert not (scene.canary / "victim.db-journal").exists()
    assert not (scene.root.parent / "hostile-planted.db").exists()
    assert sorted(p.name for p in scene.root.iterdir() if p.name.startswith("cache.db")) == ["cache.db"]


def test_one_sqlite_opcode_is_stopped_at_the_deadline(scene):
    # instr() on a 4M-char haystack with a 2M-char needle: one VDBE opcode
    # for minutes, which a progress handler could not stop; as wasm the
    # epoch stops it like any other code.
    started = time.monotonic()
    m = scene.fault("sql-instr")
    took = time.monotonic() - started
    assert "deadline" in m, m
    assert took < DEADLINE + 3, f"stopped: {took}"


def test_sqlite_memory_is_bounded_by_the_drivers_memory(scene):
    # ORDER BY over 16 MB values: SQLite inside the driver runs out of its
    # heap (its own limit, within the instance's memory cap), never the
    # host's: a clean error of that statement.
    m = scene.database_refusal("sql-sort-memory", "out of memory")
    assert scene.discarded() == 0, m


def test_a_driver_cannot_write_an_images_bytes(scene):
    e = scene.refusal("write-image")
    assert isinstance(e, IoError), e
    assert e.code == "access-denied", e.code
    assert "AccessDenied" in e.message and "not a file a driver may write" in e.message, e.message
    assert (scene.root / "hostile-image").read_bytes() == b""
    assert (scene.root / "incomplete" / "hostile-image").read_bytes() == b""


def test_a_planted_fifo_or_hard_link_is_refused_without_blocking(scene, tmp_path):
    os.mkfifo(scene.root / "fifo")
    outside = tmp_path / "outside-link-target"
    outside.write_bytes(b"outside")
    os.link(outside, scene.root / "hardlink")
    outcome = {}

    def attack(name):
        try:
            scene.cache.is_cached(name)
        except Exception as e:  # noqa: BLE001 - checked below
            outcome[name] = e

    for name, words in [("open-fifo", "not a regular file"), ("open-hardlink", "has 2 hard links")]:
        t = threading.Thread(target=attack, args=(name,), daemon=True)
        t.start()
        t.join(DEADLINE * 0.9)
        assert not t.is_alive(), f"{name}: the host blocked"
        e = outcome[name]
        assert isinstance(e, IoError) and e.code == "access-denied", e
        assert words in e.message, e.message
        assert str(scene.root) not in str(e)
    assert scene.cache.is_cached("benign") is False
    assert outside.read_bytes() == b"outside"


def _locked_elsewhere(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_a_range_lock_never_outlives_the_call_that_took_it(tmp_path, artifacts):
    runtime = Runtime(Limits(call_deadline=5.0), artifacts=artifacts)
    cache = ImageCache(tmp_path / "root", driver=component("hostile_driver"), grants=["xattr"],
                       options=[("hostile_target", "cache.db")], runtime=runtime,
                       fallback_to_sqlite=False)
    db = tmp_path / "root" / "cache.db"
    db.write_bytes(b"")
    # The driver takes an exclusive lock on the whole file and keeps the
    # file open (in its own memory) after the call returns.
    assert cache.is_cached("hold-range-lock") is True
    assert not _locked_elsewhere(db), "released when the call ended"
    # Native SQLite gets its locks at once.
    native = sqlite3.connect(db, timeout=0, isolation_level=None)
    native.execute("BEGIN EXCLUSIVE")
    native.execute("CREATE TABLE t (x)")
    native.execute("COMMIT")
    native.close()
    # Again, on the same instance: taken and released once more.
    assert cache.is_cached("hold-range-lock") is True
    assert not _locked_elsewhere(db)
    cache.close()


def test_the_grant_sqlite_is_retired_and_grants_nothing(tmp_path, caplog, artifacts):
    import image_cache_wasm.contract as contract

    contract._warned_retired.discard("sqlite")
    with caplog.at_level("WARNING", logger="image_cache_wasm"):
        cache = ImageCache(tmp_path / "root", driver=component("hostile_driver"),
                           grants=["sqlite", "xattr"], runtime=Runtime(artifacts=artifacts),
                           fallback_to_sqlite=False)
        cache.swap_driver(component("hostile_driver"), grants=["sqlite", "xattr"])
    warned = [r for r in caplog.records if "retired" in r.getMessage()]
    assert len(warned) == 1, "warned once"
    assert "grants nothing" in warned[0].getMessage()
    assert cache.driver.loaded.grants == frozenset({"xattr"})
    assert cache.is_cached("benign") is False
    cache.close()


def test_a_lock_never_waits_past_the_deadline(scene):
    started = time.monotonic()
    m = scene.fault("lock-forever")
    # The lock gives up at the deadline (TimedOut); the epoch may stop the
    # guest's next instruction first. Either way: a deadline fault, on time.
    assert "deadline" in m, m
    assert time.monotonic() - started < DEADLINE + 3


def test_a_time_before_1970_is_an_error(scene):
    e = scene.refusal("set-times-negative")
    assert isinstance(e, IoError)
    assert "InvalidArgument" in e.message and "not a usable time" in e.message, e.message


def test_a_flood_of_error_text_is_cut_and_made_printable(scene):
    e = scene.refusal("error-flood")
    assert isinstance(e, IoError)
    assert len(e.message) < 2000
    assert "\x1b" not in e.message
    assert "flood" in e.message


def test_a_driver_that_spins_is_stopped_at_its_deadline(scene):
    started = time.monotonic()
    m = scene.fault("spin")
    assert "deadline" in m, m
    assert time.monotonic() - started < DEADLINE + 5


def test_a_driver_that_panics_gets_an_error_for_that_call(scene):
    m = scene.fault("panic")
    assert "unreachable" in m, m
    assert "\n" not in m


def test_a_driver_that_allocates_without_end_hits_its_memory_cap(scene):
    m = scene.fault("alloc")
    assert "trapped" in m, m


def test_a_driver_that_exhausts_handles_hits_the_resource_cap(scene):
    m = scene.fault("exhaust-handles")
    assert "resource table has no free keys" in m, m


def test_a_driver_that_returns_garbage_is_discarded(scene):
    before = scene.discarded()
    with pytest.raises(DriverFault, match="asked for 3 LRU entries, got 8"):
        scene.cache.get_least_recently_accessed_batch(3)
    with pytest.raises(DriverFault, match="not ordered by id"):
        scene.cache.get_cached_images()
    assert scene.discarded() == before + 2
    assert scene.cache.is_cached("benign") is False


def test_a_write_session_must_hand_back_its_own_incomplete_file(scene):
    before = scene.discarded()
    with pytest.raises(DriverFault) as e:
        scene.cache.open_for_write("wrong-file")
    assert 'handed back "decoy", which is not incomplete/wrong-file' in e.value.message, e.value.message
    assert scene.discarded() == before + 1
    assert scene.cache.is_cached("benign") is False


def test_a_read_session_must_hand_back_the_cached_image(scene):
    with pytest.raises(DriverFault) as e:
        scene.cache.open_for_read("read-db")
    assert "which is not read-db" in e.value.message, e.value.message


def test_a_checksum_that_would_inject_a_header_is_a_fault(scene):
    (scene.root / "bad-checksum").write_bytes(b"image bytes")
    before = scene.discarded()
    reader = scene.cache.open_for_read("bad-checksum")
    with pytest.raises(DriverFault) as e:
        reader.checksum()
    m = e.value.message
    assert 'the checksum of "bad-checksum" is not a short token of letters, digits and +/=_:-' in m, m
    assert "Set-Cookie" not in m and "\n" not in m
    assert str(scene.root) not in str(e.value)
    assert scene.discarded() == before + 1, "the instance is discarded"
    assert reader.closed, "the session ended"
    assert reader.checksum() is None and reader.read() == b"", "uncounted, nothing more to read"
    reader.close()
    assert scene.cache.is_cached("benign") is False, "the next call works"
    # A fresh session on a fresh instance is refused the same way.
    with scene.cache.open_for_read("bad-checksum") as again:
        with pytest.raises(DriverFault):
            again.checksum()
    assert scene.cache.is_cached("benign") is False


def test_ids_from_a_driver_are_checked_before_the_host_uses_them(scene):
    assert scene.cache.queue("bad-ids") is False
    with pytest.raises(DriverFault) as e:
        scene.cache.get_queued_images()
    assert 'get-queued-images returned invalid image id "../../etc/passwd"' in e.value.message


def test_instances_per_driver_are_capped_and_callers_wait_then_fail_clearly(tmp_path, artifacts):
    runtime = Runtime(Limits(call_deadline=5.0, instances=2, instance_wait=0.3), artifacts=artifacts)
    cache = ImageCache(tmp_path / "root", driver=component("hostile_driver"),
                       grants=["xattr"], runtime=runtime, fallback_to_sqlite=False)
    # Hold both instances with sessions the hostile driver never hands out:
    # use the pool directly, as a long call would.
    held = [cache.driver.checkout(), cache.driver.checkout()]
    started = time.monotonic()
    with pytest.raises(Overloaded, match="all 2 instances stayed busy for 0.3s"):
        cache.is_cached("c")
    assert time.monotonic() - started >= 0.3
    for inst in held:
        cache.driver.settle(inst, None)
    assert cache.is_cached("c") is False, "a freed instance serves the next call"


def test_a_component_is_refused_at_load_for_an_interface_it_was_not_granted(tmp_path):
    runtime = Runtime(artifacts=None)
    for grants in ([], ["sqlite"]):
        with pytest.raises(LoadError) as e:
            ImageCache(tmp_path / "root", driver=component("hostile_driver"), grants=grants,
                       fallback_to_sqlite=False, runtime=runtime)
        assert "image-cache:driver/xattr@0.3.0, which it was not granted (granted: fs, clock)" in str(e.value)
    assert not (tmp_path / "root" / "incomplete").exists(), "refused before anything ran"
    assert runtime.stats["compiled"] == 0, "refused before it was compiled"


def test_one_runtime_shared_by_a_hostile_and_a_good_driver(tmp_path, artifacts):
    runtime = Runtime(Limits(call_deadline=10.0, memory_bytes=64 << 20), artifacts=artifacts)
    hostile = ImageCache(tmp_path / "a", driver=component("hostile_driver"),
                         grants=["xattr"], runtime=runtime, fallback_to_sqlite=False)
    component("sqlite_driver")
    good = ImageCache(tmp_path / "b", driver="sqlite", runtime=runtime)
    with pytest.raises(DriverFault):
        hostile.is_cached("panic")
    good.cache("1", io.BytesIO(b"unaffected"))
    assert good.is_cached("1")
    assert good.read("1") == b"unaffected"


def test_a_driver_cannot_serve_one_images_bytes_as_another(scene):
    from image_cache_wasm.xattr import SEAL

    from test_seal import require_user_xattrs

    scene.root.mkdir(exist_ok=True)
    require_user_xattrs(scene.root)
    # Two images committed by the host (sealed with their ids).
    good = ImageCache(scene.root, driver="sqlite", runtime=scene.runtime, fallback_to_sqlite=False)
    good.cache("swap-source", io.BytesIO(b"the other image"))
    good.cache("swapped", io.BytesIO(b"this image"))
    good.close()
    # The hostile driver renames one over the other: the host refuses the
    # rename (nothing moves onto an image's name but its own fill).
    with pytest.raises(IoError) as e:
        scene.cache.open_for_read("swapped")
    assert e.value.code == "access-denied", e.value.message
    assert "not a rename a driver may make" in e.value.message, e.value.message
    assert (scene.root / "swapped").read_bytes() == b"this image"
    # Another process does the same (whatever is in the root): the seal
    # catches it before a byte is served.
    os.rename(scene.root / "swap-source", scene.root / "swapped")
    before = scene.discarded()
    good = ImageCache(scene.root, driver="sqlite", runtime=scene.runtime, fallback_to_sqlite=False)
    with pytest.raises(DriverFault) as e:
        good.open_for_read("swapped")
    good.close()
    m = e.value.message
    assert 'the read session of "swapped" handed back the file committed as "swap-source"' in m, m
    assert scene.discarded() == before + 1
    assert os.getxattr(scene.root / "swapped", SEAL) == b"swap-source"
    assert scene.cache.is_cached("benign") is False
