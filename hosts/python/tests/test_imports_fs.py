"""The `fs`, `clock` and `xattr` imports without wasm: what the guest may
reach."""

from __future__ import annotations

import os
import sqlite3
import threading
import time

import pytest

from image_cache_wasm.fs import MAX_DRIVER_FILE, MAX_IO, FsError, RootFs
from image_cache_wasm.runtime import InstanceState, Limits, _sleep, enter
from image_cache_wasm.xattr import MAX_VALUE, SEAL, Attributes, check_name, probe

#: Native SQLite's lock bytes (os_unix.c), which the driver's VFS uses too.
PENDING_BYTE = 0x4000_0000
RESERVED_BYTE = PENDING_BYTE + 1
SHARED_FIRST = PENDING_BYTE + 2
SHARED_SIZE = 510


@pytest.fixture
def root(tmp_path):
    d = tmp_path / "root"
    d.mkdir()
    r = RootFs(d)
    yield d, r
    r.close()


def code(fn, *args):
    with pytest.raises(FsError) as e:
        fn(*args)
    return e.value.code


def test_refuses_parent_and_absolute_paths_before_any_system_call(root):
    d, r = root
    for path in ["..", "../x", "a/../../x", "/etc/passwd", "/"]:
        assert code(r.open, path) == "access-denied", path
        assert code(r.create_new, path) == "access-denied", path
        assert code(r.stat, path) == "access-denied", path
        assert code(r.remove_file, path) == "access-denied", path
        assert code(r.list_dir, path) == "access-denied", path
        assert code(r.rename, "x", path) == "access-denied", path
    for path in ["a\\b", "nul\0"]:
        assert code(r.open, path) == "invalid-path"
    assert code(r.create_new, "") == "invalid-path"
    assert code(r.remove_file, ".") == "invalid-path"
    assert not (d.parent / "x").exists()


def test_never_follows_a_symlink_out_of_the_root(root, tmp_path):
    d, r = root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    before = os.stat(outside / "secret")
    (d / "link").symlink_to(outside / "secret")
    (d / "linkdir").symlink_to(outside)
    (d / "fifo").parent.mkdir(exist_ok=True)
    os.mkfifo(d / "fifo")

    assert code(r.open, "link") == "access-denied"  # final symlink never followed
    assert r.stat("link")["kind"] == "symlink"
    r.set_times("link", 0.0, None)  # the link's own times
    assert code(r.open, "linkdir/secret") == "access-denied"
    assert code(r.create_new, "linkdir/planted") == "access-denied"
    assert code(r.list_dir, "linkdir") == "access-denied"
    assert code(r.remove_file, "linkdir/secret") == "access-denied"
    assert code(r.rename, "linkdir/secret", "linkdir/stolen") == "access-denied"
    assert code(r.set_times, "linkdir/secret", 0.0, 0.0) == "access-denied"
    assert code(r.open, "fifo") == "access-denied"  # not a regular file, and no hang
    assert not (outside / "planted").exists()
    after = os.stat(outside / "secret")
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    assert (outside / "secret").read_bytes() == b"secret"
    r.remove_file("link")
    assert (outside / "secret").exists()


def test_messages_never_name_the_root(root):
    d, r = root
    for fn, args in [(r.open, ("missing",)), (r.list_dir, ("nowhere",)), (r.rename, ("mine/a", "mine/b"))]:
        with pytest.raises(FsError) as e:
            fn(*args)
        assert str(d) not in e.value.message, e.value.message
        assert e.value.code == "not-found"


def test_rename_forges_no_image(root):
    # Into the top of the root only incomplete/<name> -> <name> (a commit),
    # out of incomplete/ only to invalid/<name> (an abort); nothing leaves
    # the top of the root or moves into incomplete/ or queue/.
    d, r = root
    for sub in ["incomplete", "invalid", "mine", "queue"]:
        r.create_dir(sub)

    def make(path):
        r.create_new(path).close()

    make("incomplete/x")
    r.rename("incomplete/x", "x")
    assert (d / "x").is_file()
    make("incomplete/x")
    r.rename("incomplete/x", "invalid/x")
    make("mine/a")
    r.rename("mine/a", "mine/b")
    r.rename("./invalid/x", "mine//x")  # `.` and empty components are dropped
    assert sorted(os.listdir(d / "mine")) == ["b", "x"]

    make("mine/a")
    make("y")
    make("cache.db")
    make("incomplete/x")
    make("queue/x")
    for src, dst in [
        ("mine/a", "x"),
        ("x", "y"),
        ("x", "mine/x"),
        ("cache.db", "x"),
        ("mine/a", "incomplete/a"),
        ("incomplete/x", "mine/x"),
        ("queue/x", "invalid/x"),
        ("incomplete/x", "y"),  # another name's fill
        ("incomplete/x", "invalid/y"),
        ("incomplete/x", "incomplete/z"),
        ("./x", "./mine/z"),
    ]:
        with pytest.raises(FsError) as e:
            r.rename(src, dst)
        assert e.value.code == "access-denied", (src, dst)
        assert e.value.message == (
            f"{src} -> {dst}: not a rename a driver may make (into the top of the root "
            "only incomplete/<name> -> <name>, out of incomplete/ only to "
            "invalid/<name>; nothing leaves the top of the root)"
        )
    assert sorted(os.listdir(d)) == ["cache.db", "incomplete", "invalid", "mine", "queue", "x", "y"]
    assert sorted(os.listdir(d / "mine")) == ["a", "b", "x"]
    assert os.listdir(d / "incomplete") == ["x"] and os.listdir(d / "queue") == ["x"]
    # The path checks still come first.
    assert code(r.rename, "../x", "x") == "access-denied"
    assert code(r.rename, "incomplete/x", ".") == "invalid-path"


def test_create_new_is_exclusive_and_remove_refuses_directories(root):
    d, r = root
    first = r.create_new("x")
    assert code(r.create_new, "x") == "already-exists"
    first.close()
    r.create_dir("sub")
    assert code(r.remove_file, "sub") == "is-a-directory"
    assert code(r.create_dir, "sub") == "already-exists"


def test_listing_is_capped_and_skips_nothing_it_should_show(root):
    d, r = root
    for i in range(5):
        (d / str(i)).write_bytes(b"")
    (d / "dir").mkdir()
    names = {e["name"]: e["kind"] for e in r.list_names("")}
    assert names == {**{str(i): "regular-file" for i in range(5)}, "dir": "directory"}
    assert len(r.list_dir("")) == 6
    capped = RootFs(d, max_listing=3)
    assert code(capped.list_dir, "") == "limit-exceeded"
    capped.close()


def test_times_round_trip_and_bad_times_are_refused(root):
    d, r = root
    f = r.create_new("f")
    f.set_times(1_700_000_000.25, 1_600_000_000.5)
    m = r.stat("f")
    assert (m["accessed"], m["modified"]) == (1_700_000_000.25, 1_600_000_000.5)
    f.set_times(1_700_000_001.0, None)
    assert f.metadata()["modified"] == 1_600_000_000.5, "None leaves it unchanged"
    for t in [-1.0, float("nan"), float("inf"), 1e13]:
        assert code(f.set_times, t, None) == "invalid-argument"
    f.close()


def test_lock_waits_only_until_the_deadline(root):
    d, r = root
    a = r.create_new("lock")
    b = r.open("lock")
    assert a.try_lock()
    assert not b.try_lock()
    started = time.monotonic()
    assert code(b.lock, time.monotonic() + 0.2) == "timed-out"
    assert 0.15 < time.monotonic() - started < 2
    a.unlock()
    b.lock(time.monotonic() + 1)
    a.close()
    b.close()


def test_only_user_xattr_names_pass():
    for name in ["trusted.x", "security.selinux", "system.posix_acl_access", "user.", "hits", "USER.x"]:
        with pytest.raises(FsError) as e:
            check_name(name)
        assert e.value.code == "access-denied"
    check_name("user.hits")
    with pytest.raises(FsError):
        check_name("user." + "x" * 300)


def test_the_hosts_own_names_are_refused_and_hidden(root):
    for name in [SEAL, "user.image-cache.probe", "user.image-cache.x"]:
        with pytest.raises(FsError) as e:
            check_name(name)
        assert e.value.code == "access-denied"
        assert e.value.message == f'extended attribute "{name}": user.image-cache.* is the host\'s own'
    for name in ["user.image-cache-probe", "user.image-cache", "user.image-cachex.id"]:
        check_name(name)
    d, r = root
    f = r.create_new("img")
    attrs = Attributes(f)
    for call in (lambda: attrs.get(SEAL), lambda: attrs.set(SEAL, b"x"), lambda: attrs.remove(SEAL)):
        with pytest.raises(FsError) as e:
            call()
        assert e.value.code == "access-denied" and "the host's own" in e.value.message
    try:
        os.setxattr(f.fd, SEAL, b"img")
    except OSError as e:
        reason = f"the file system stores no user extended attributes ({e.strerror})"
        print(f"skipped: {reason}")
        f.close()
        pytest.skip(reason)
    attrs.set("user.hits", b"1")
    assert attrs.list() == ["user.hits"], "the seal is not listed"
    assert os.getxattr(f.fd, SEAL) == b"img", "nor removed, nor changed"
    f.close()


def test_attributes_live_on_the_open_file(root):
    d, r = root
    r.create_dir("incomplete")
    f = r.create_new("incomplete/img")
    attrs = Attributes(f)
    assert code(attrs.get, "user.hits") == "not-found"
    attrs.set("user.hits", b"3")
    assert attrs.get("user.hits") == b"3"
    assert attrs.list() == ["user.hits"]
    r.rename("incomplete/img", "img")  # the attribute follows the open file
    attrs.set("user.hits", b"4")
    assert Attributes(r.open("img")).get("user.hits") == b"4"
    attrs.remove("user.hits")
    attrs.remove("user.hits")
    assert code(attrs.set, "trusted.hits", b"1") == "access-denied"
    assert code(attrs.set, "user.big", b"\0" * (MAX_VALUE + 1)) == "limit-exceeded"
    assert code(Attributes(f, enabled=False).get, "user.hits") == "unsupported"
    f.close()


def test_probe_reports_support_and_leaves_nothing(root):
    d, r = root
    probe(r)
    with pytest.raises(FsError) as e:
        probe(r, enabled=False)
    assert e.value.code == "unsupported"
    assert str(d) not in e.value.message
    assert os.listdir(d) == []


# -- contract 0.3.0: a driver's own files ------------------------------------------


def message(fn, *args):
    with pytest.raises(FsError) as e:
        fn(*args)
    return e.value.code, e.value.message


def test_open_read_write_only_for_the_database_and_the_drivers_own_directories(root):
    d, r = root
    for name in ["cache.db", "cache.db-journal", "cache.db-wal", "meta/own.db", "a/b/c"]:
        if "/" in name:
            os.makedirs(d / os.path.dirname(name), exist_ok=True)
        r.open_read_write(name, True).close()
        assert (d / name).is_file(), name
    for name in ["other.db", "cache.db-shm", "cache.dbx", "image-1", "incomplete", "x-journal"]:
        c, m = message(r.open_read_write, name, True)
        assert c == "access-denied", name
        assert m == (
            f"{name}: not a file a driver may write (at the top of the root only the metadata "
            "database cache.db and its journal; nothing under incomplete/, invalid/, queue/)"
        ), m
        assert not (d / name).exists(), name
    for top in ["incomplete", "invalid", "queue"]:
        (d / top).mkdir()
        (d / top / "img").write_bytes(b"image bytes")
        assert code(r.open_read_write, f"{top}/img", False) == "access-denied"
        assert code(r.open_read_write, f"./{top}//new", True) == "access-denied"
        assert (d / top / "img").read_bytes() == b"image bytes"
        assert not (d / top / "new").exists()
    # Paths are checked as for every other call; ./ and // are one name.
    assert code(r.open_read_write, "../cache.db", True) == "access-denied"
    assert code(r.open_read_write, "/cache.db", True) == "access-denied"
    assert code(r.open_read_write, "", True) == "invalid-path"
    r.open_read_write("./cache.db", False).close()
    # The database's name is the configured one.
    r.open_read_write("glance.sqlite", True, "glance.sqlite").close()
    r.open_read_write("glance.sqlite-journal", True, "glance.sqlite").close()
    c, m = message(r.open_read_write, "cache.db", False, "glance.sqlite")
    assert c == "access-denied" and "metadata database glance.sqlite" in m


def test_open_read_write_creates_only_when_asked_and_never_truncates(root):
    d, r = root
    assert code(r.open_read_write, "cache.db", False) == "not-found"
    assert not (d / "cache.db").exists()
    f = r.open_read_write("cache.db", True)
    f.write_at(0, b"0123456789")
    f.close()
    g = r.open_read_write("cache.db", True)
    assert g.size() == 10 and g.read_at(0, 100) == b"0123456789", "opened again, not truncated"
    g.close()
    os.mkdir(d / "sub")
    os.mkdir(d / "sub" / "dir")
    assert code(r.open_read_write, "sub/dir", True) == "is-a-directory"
    (d / "sub" / "link").symlink_to(d / "cache.db")
    assert code(r.open_read_write, "sub/link", False) == "access-denied"


def test_read_at_is_short_at_the_end_and_capped(root):
    d, r = root
    (d / "cache.db").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    f = r.open("cache.db")
    assert f.size() == 2 * 1024 * 1024
    assert f.read_at(0, 4) == bytes([0, 1, 2, 3])
    assert f.read_at(2 * 1024 * 1024 - 2, 10) == bytes([254, 255]), "short at the end"
    assert f.read_at(2 * 1024 * 1024, 10) == b"", "nothing at the end"
    assert f.read_at(1 << 40, 10) == b"", "nothing past it"
    assert len(f.read_at(5, MAX_IO)) == MAX_IO
    c, m = message(f.read_at, 0, MAX_IO + 1)
    assert c == "limit-exceeded" and "more than 1048576 bytes in one read" in m
    assert code(f.read_at, (1 << 63) - 5, 10) == "invalid-argument"
    assert code(f.read_at, (1 << 64) - 1, 0) == "invalid-argument"
    assert f.read_at((1 << 63) - 11, 10) == b"", "the last offsets are fine"
    f.close()


def test_only_open_read_write_files_are_written_by_the_driver(root):
    d, r = root
    created = r.create_new("image")  # a write session's file: the host writes it
    (d / "other").write_bytes(b"image bytes")
    opened = r.open("other")
    for f in (created, opened):
        for fn, args in [(f.write_at, (0, b"forged")), (f.set_len, (0,))]:
            c, m = message(fn, *args)
            assert c == "access-denied", m
            assert "not opened with open-read-write (only the host writes an image's bytes)" in m
    assert (d / "other").read_bytes() == b"image bytes"
    created.close()
    opened.close()

    f = r.open_read_write("cache.db", True)
    f.write_at(0, b"hello")
    f.write_at(10, b"world")
    assert f.read_at(0, 100) == b"hello\0\0\0\0\0world"
    f.write_at(0, b"\xff" * MAX_IO)
    assert code(f.write_at, 0, b"\0" * (MAX_IO + 1)) == "limit-exceeded"
    c, m = message(f.write_at, MAX_DRIVER_FILE - 2, b"abc")
    assert c == "limit-exceeded" and "may not grow past 17179869184 bytes" in m, m
    assert code(f.write_at, (1 << 63) - 2, b"abc") == "invalid-argument"
    assert code(f.write_at, (1 << 64) - 1, b"") == "invalid-argument"
    f.set_len(3)
    assert f.size() == 3 and f.read_at(0, 10) == b"\xff" * 3
    f.set_len(4096)
    assert f.size() == 4096
    assert code(f.set_len, MAX_DRIVER_FILE + 1) == "limit-exceeded"
    f.sync_data()
    f.sync()
    f.close()


def test_range_locks_exclude_two_open_files_of_one_file(root):
    d, r = root
    a = r.open_read_write("cache.db", True)
    b = r.open_read_write("cache.db", False)
    reader = r.open("cache.db")
    assert a.set_range_lock(100, 10, "exclusive")
    assert not a.range_locked_elsewhere(100, 10), "its own lock is not elsewhere"
    assert b.range_locked_elsewhere(100, 10)
    assert b.range_locked_elsewhere(0, 0)
    assert not b.range_locked_elsewhere(0, 100)
    assert not b.set_range_lock(105, 1, "shared")
    assert not b.set_range_lock(0, 0, "exclusive")
    assert b.set_range_lock(0, 100, "exclusive"), "a range nobody holds"
    assert a.set_range_lock(100, 10, "shared"), "downgrade"
    assert b.set_range_lock(100, 10, "shared"), "shared with shared"
    assert reader.set_range_lock(100, 10, "shared"), "a read-only file takes shared locks too"
    assert not b.set_range_lock(100, 10, "exclusive")
    assert a.set_range_lock(0, 0, "unlocked")
    assert reader.set_range_lock(0, 0, "unlocked")
    assert b.set_range_lock(100, 10, "exclusive")
    # Length 0: to the end of the file and beyond.
    assert b.set_range_lock(0, 0, "unlocked")
    assert a.set_range_lock(PENDING_BYTE, 0, "exclusive")
    assert not b.set_range_lock(1 << 50, 1, "shared")
    assert b.set_range_lock(0, PENDING_BYTE, "exclusive")
    # Offsets and lengths must fit a signed 64-bit off_t, and so must their end.
    for start, length in [(1 << 63, 1), (0, 1 << 63), (1 << 62, 1 << 62), ((1 << 64) - 1, 0)]:
        assert code(a.set_range_lock, start, length, "shared") == "invalid-argument", (start, length)
        assert code(a.range_locked_elsewhere, start, length) == "invalid-argument", (start, length)
    assert a.set_range_lock((1 << 63) - 2, 1, "shared")
    a.close()  # its locks go with it
    assert b.set_range_lock(PENDING_BYTE, 0, "exclusive")
    b.close()
    reader.close()


def test_range_locks_conflict_with_native_sqlite_locks(root):
    d, r = root
    db = d / "cache.db"
    setup = sqlite3.connect(db)
    setup.executescript("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
    setup.close()
    # Opened before native SQLite takes its locks and closed after it drops
    # them: closing any descriptor of a file drops the process's POSIX
    # locks on it (native SQLite's), whoever opened it.
    f = r.open_read_write("cache.db", False)
    native = sqlite3.connect(db, timeout=0, isolation_level=None)
    native.execute("BEGIN EXCLUSIVE")
    try:
        assert f.range_locked_elsewhere(RESERVED_BYTE, 1), "native SQLite's RESERVED lock is seen"
        assert f.range_locked_elsewhere(SHARED_FIRST, SHARED_SIZE)
        assert not f.set_range_lock(SHARED_FIRST, SHARED_SIZE, "shared"), "no reader while it writes"
        assert not f.set_range_lock(PENDING_BYTE, 1, "shared")
    finally:
        native.execute("COMMIT")
    assert not f.range_locked_elsewhere(PENDING_BYTE, 2 + SHARED_SIZE)
    # The other way round: the driver's locks keep native SQLite out.
    assert f.set_range_lock(PENDING_BYTE, 1, "exclusive")
    assert f.set_range_lock(SHARED_FIRST, SHARED_SIZE, "exclusive")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        native.execute("SELECT count(*) FROM t").fetchone()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        native.execute("BEGIN EXCLUSIVE")
    assert f.set_range_lock(SHARED_FIRST, SHARED_SIZE, "shared")
    assert f.set_range_lock(PENDING_BYTE, 1, "unlocked")
    assert native.execute("SELECT count(*) FROM t").fetchone() == (1,), "readers share"
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        native.execute("BEGIN EXCLUSIVE")
    if native.in_transaction:
        native.execute("ROLLBACK")
    assert f.set_range_lock(0, 0, "unlocked")
    native.execute("BEGIN EXCLUSIVE")
    native.execute("INSERT INTO t VALUES (2)")
    native.execute("COMMIT")
    native.close()
    f.close()


def test_range_locks_are_released_when_the_call_ends_but_flock_locks_are_not(root):
    d, r = root
    state = InstanceState(r, Limits(), True)
    other = r.open_read_write("cache.db", True)
    with enter(state):
        held = r.open_read_write("cache.db", False)
        state.files[1] = held
        state.note_range_lock(held)
        assert held.set_range_lock(0, 0, "exclusive")
        assert held.try_lock(), "a whole-file flock lock (write sessions)"
        assert not other.set_range_lock(10, 1, "shared"), "held during the call"
        second = r.open_read_write("cache.db", False)
        state.note_range_lock(second)
        second.close()  # closed during the call: nothing to release
    assert not held.closed, "the file stays open"
    assert other.set_range_lock(0, 0, "exclusive"), "released when the call ended"
    assert not other.try_lock(), "flock locks outlive the call"
    assert other.set_range_lock(0, 0, "unlocked")
    with enter(state):
        assert held.set_range_lock(5, 5, "shared")
        try:
            raise RuntimeError("the call trapped")
        except RuntimeError:
            pass
    assert other.set_range_lock(0, 0, "exclusive"), "released again at the end of the next call"
    assert state.range_locked == {id(held): held}, "the closed file is forgotten"
    state.close()
    other.close()


def _opens_within(fn, seconds=5.0):
    """Run ``fn`` on a daemon thread: its error, or a failure if it hangs."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - reported below
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} blocked"
    return out.get("error")


def test_a_fifo_is_refused_without_blocking(root):
    d, r = root
    (d / "db").mkdir()
    os.mkfifo(d / "cache.db")
    os.mkfifo(d / "db" / "fifo")
    for fn in [
        lambda: r.open("cache.db"),
        lambda: r.open_read_write("cache.db", False),
        lambda: r.open_read_write("cache.db", True),
        lambda: r.open("db/fifo"),
        lambda: r.open_read_write("db/fifo", True),
    ]:
        e = _opens_within(fn)
        assert isinstance(e, FsError) and e.code == "access-denied", e
        assert e.message.endswith(": not a regular file"), e.message
    e = _opens_within(lambda: r.create_new("db/fifo"))
    assert isinstance(e, FsError) and e.code == "already-exists"


def test_a_hard_link_is_refused(root, tmp_path):
    d, r = root
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (d / "db").mkdir()
    os.link(outside / "secret", d / "cache.db")
    os.link(outside / "secret", d / "db" / "linked")
    for fn, path in [
        (lambda: r.open("cache.db"), "cache.db"),
        (lambda: r.open_read_write("cache.db", False), "cache.db"),
        (lambda: r.open_read_write("db/linked", True), "db/linked"),
    ]:
        e = _opens_within(fn)
        assert isinstance(e, FsError) and e.code == "access-denied", e
        assert e.message == (
            f"{path}: has 3 hard links; refused (it may be a link to a file outside the root)"
        ), e.message
    assert (outside / "secret").read_bytes() == b"secret"
    f = r.create_new("db/new")  # a fresh file has one link
    f.close()


def test_a_directory_is_not_a_file(root):
    d, r = root
    (d / "dir").mkdir()
    assert code(r.open, "dir") == "is-a-directory"


def test_clock_sleep_is_bounded_by_the_call_deadline(root):
    d, r = root
    state = InstanceState(r, Limits(), True)
    with enter(state):
        state.deadline = time.monotonic() + 5
        started = time.monotonic()
        assert _sleep(None, 2000) is True
        assert 0.001 <= time.monotonic() - started < 0.05
        started = time.monotonic()
        assert _sleep(None, 4_000_000_000) is True, "the deadline is still ahead"
        assert 0.09 <= time.monotonic() - started < 0.3, "at most 100 ms per call"
        assert _sleep(None, 0) is True
        state.deadline = time.monotonic() + 0.03
        started = time.monotonic()
        assert _sleep(None, 1_000_000) is False, "the deadline passed while it slept"
        assert 0.02 <= time.monotonic() - started < 0.09, "never past the deadline"
        started = time.monotonic()
        assert _sleep(None, 1_000_000) is False
        assert time.monotonic() - started < 0.01, "no pause once the deadline has passed"
    state.close()
