"""The `fs` and `xattr` imports without wasm: what the guest may reach."""

from __future__ import annotations

import os
import time

import pytest

from image_cache_wasm.fs import FsError, RootFs
from image_cache_wasm.xattr import MAX_VALUE, Attributes, check_name, probe


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
    assert code(r.rename, "linkdir/secret", "stolen") == "access-denied"
    assert code(r.set_times, "linkdir/secret", 0.0, 0.0) == "access-denied"
    assert code(r.open, "fifo") == "is-a-directory"  # not a regular file, and no hang
    assert not (outside / "planted").exists()
    after = os.stat(outside / "secret")
    assert (after.st_atime_ns, after.st_mtime_ns) == (before.st_atime_ns, before.st_mtime_ns)
    assert (outside / "secret").read_bytes() == b"secret"
    r.remove_file("link")
    assert (outside / "secret").exists()


def test_messages_never_name_the_root(root):
    d, r = root
    for fn, args in [(r.open, ("missing",)), (r.list_dir, ("nowhere",)), (r.rename, ("a", "b"))]:
        with pytest.raises(FsError) as e:
            fn(*args)
        assert str(d) not in e.value.message, e.value.message
        assert e.value.code == "not-found"


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


def test_attributes_live_on_the_open_file(root):
    d, r = root
    f = r.create_new("img")
    attrs = Attributes(f)
    assert code(attrs.get, "user.hits") == "not-found"
    attrs.set("user.hits", b"3")
    assert attrs.get("user.hits") == b"3"
    assert attrs.list() == ["user.hits"]
    r.rename("img", "renamed")
    attrs.set("user.hits", b"4")
    assert Attributes(r.open("renamed")).get("user.hits") == b"4"
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
