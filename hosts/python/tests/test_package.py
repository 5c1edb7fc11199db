"""The package as an application sees it: errors that are also the
matching built-ins, ids taken as Glance's drivers take them (``str()``)
and refused before any driver call otherwise, results that are plain dicts
typed as TypedDicts, the components found in the package (a wheel carries
them) with the environment only as an override, and ``py.typed``."""

from __future__ import annotations

import errno
import io
import json
import numbers
import os
import uuid
from pathlib import Path

import pytest

import image_cache_wasm
from conftest import component
from image_cache_wasm import (
    AlreadyCached,
    BadConfiguration,
    BeingCached,
    CachedImage,
    CacheError,
    ChecksumMismatch,
    CleanReport,
    DatabaseError,
    DriverFault,
    ImageCache,
    InvalidImageId,
    IoError,
    LoadError,
    LruEntry,
    NotConfigured,
    NotFound,
    Overloaded,
    PruneReport,
    SourceError,
    Unsupported,
    to_image_id,
)
from image_cache_wasm import cache as cache_module


def test_errors_are_the_matching_built_ins():
    expected = {
        NotFound: (FileNotFoundError, errno.ENOENT),
        AlreadyCached: (FileExistsError, errno.EEXIST),
        BeingCached: (FileExistsError, errno.EEXIST),
        InvalidImageId: (ValueError, None),
        BadConfiguration: (ValueError, None),
        NotConfigured: (RuntimeError, None),
        Unsupported: (NotImplementedError, None),
        SourceError: (OSError, errno.EIO),
        Overloaded: (TimeoutError, errno.ETIMEDOUT),
    }
    for cls, (builtin, code) in expected.items():
        e = cls("what happened")
        assert isinstance(e, builtin) and isinstance(e, CacheError), cls
        assert e.message == "what happened"
        assert "what happened" in str(e) and "[Errno" not in str(e), str(e)
        if code is not None:
            assert e.errno == code, cls
    assert isinstance(ChecksumMismatch("i", "md5:0", "md5:1"), ValueError)
    assert isinstance(DriverFault("sqlite", "it trapped"), RuntimeError)
    # Deliberately no built-in: neither is a file, a value or a timeout.
    for cls in (DatabaseError, LoadError):
        assert cls.__mro__[1:] == (CacheError, Exception, BaseException, object), cls
    # An IoError is an OSError with the errno of its fs code, never a
    # FileNotFoundError (kept for the image itself).
    for code, number in [("no-space", errno.ENOSPC), ("access-denied", errno.EACCES), ("not-found", errno.ENOENT),
                         ("timed-out", errno.ETIMEDOUT), ("limit-exceeded", errno.ENOBUFS), ("io", errno.EIO),
                         ("something-new", errno.EIO)]:
        e = IoError("disk", code)
        assert isinstance(e, OSError) and not isinstance(e, FileNotFoundError)
        assert (e.errno, e.code, str(e)) == (number, code, "I/O error: disk")


def test_a_missing_image_is_a_file_not_found_error(cache):
    with pytest.raises(FileNotFoundError) as e:
        cache.open_for_read("never")
    assert isinstance(e.value, NotFound) and e.value.errno == errno.ENOENT
    with pytest.raises(FileNotFoundError):
        cache.get_image_size("never")
    cache.cache("there", io.BytesIO(b"x"))
    with pytest.raises(FileExistsError) as e:
        cache.open_for_write("there")
    assert isinstance(e.value, AlreadyCached)
    w = cache.open_for_write("busy")
    with pytest.raises(FileExistsError) as e:
        cache.open_for_write("busy")
    assert isinstance(e.value, BeingCached)
    w.abort("test")
    with pytest.raises(NotImplementedError):
        cache.get_cached_nodes("there")  # local drivers have no nodes


class Digits(numbers.Integral):
    """An integer that is not an int (numpy's are like it)."""

    def __init__(self, n):
        self.n = n

    def __int__(self):
        return self.n

    def __index__(self):
        return self.n

    for _name in ["__abs__", "__add__", "__and__", "__ceil__", "__eq__", "__floor__", "__floordiv__",
                  "__invert__", "__le__", "__lshift__", "__lt__", "__mod__", "__mul__", "__neg__", "__or__",
                  "__pos__", "__pow__", "__radd__", "__rand__", "__rfloordiv__", "__rlshift__", "__rmod__",
                  "__rmul__", "__ror__", "__round__", "__rpow__", "__rrshift__", "__rshift__", "__rtruediv__",
                  "__rxor__", "__truediv__", "__trunc__", "__xor__"]:
        locals()[_name] = lambda self, *a: NotImplemented
    del _name


def test_ids_are_taken_as_glances_drivers_take_them(cache):
    u = uuid.UUID("6f1e9d2a-4a8b-4c3e-9d7f-0a1b2c3d4e5f")

    class Sub(str):
        def __str__(self):
            return "not-this"

    assert [to_image_id(x) for x in ("img", 7, u, Digits(42), Sub("sub"))] == ["img", "7", str(u), "42", "sub"]
    assert cache.cache(1, io.BytesIO(b"one")) == 3
    assert cache.is_cached(1) and cache.is_cached("1")
    assert cache.read(1) == b"one" and cache.get_hit_count(1) == 1
    assert cache.get_image_size(1) == 3
    cache.cache(u, io.BytesIO(b"uuid"))
    assert cache.is_cached(str(u)) and cache.get_image_size(u) == 4
    assert [i["image_id"] for i in cache.get_cached_images()] == sorted(["1", str(u)])
    assert cache.queue(2) is True and cache.is_queued(2) and cache.get_queued_images() == ["2"]
    cache.delete_queued_image(2)
    with cache.open_for_write(Digits(3)) as w:
        assert w.image_id == "3"
        w.write(b"three")
    assert b"".join(cache.cache_stream(4, [b"fo", b"ur"])) == b"four"
    assert cache.read(4) == b"four"
    cache.delete_cached_image(1)
    assert not cache.is_cached(1)
    assert cache.driver.discarded == 0


def test_anything_else_is_an_invalid_image_id_before_any_driver_call(cache, monkeypatch):
    calls = []
    real_call, real_checkout = cache.driver.call, cache.driver.checkout
    monkeypatch.setattr(cache.driver, "call", lambda *a, **k: calls.append(a) or real_call(*a, **k))
    monkeypatch.setattr(cache.driver, "checkout", lambda: calls.append("checkout") or real_checkout())
    before = sorted(os.listdir(cache.root))
    for bad in [None, b"img", 1.0, True, object(), ["a"], "", "../x", "a/b", "x\0y", "\ud800", "x" * 256]:
        for op in [cache.is_cached, cache.is_being_cached, cache.is_cacheable, cache.is_queued, cache.queue,
                   cache.get_hit_count, cache.get_image_size, cache.get_cached_nodes, cache.delete_cached_image,
                   cache.delete_queued_image, cache.open_for_write, cache.open_for_read, cache.read]:
            with pytest.raises(InvalidImageId) as e:
                op(bad)
            assert isinstance(e.value, ValueError)
        with pytest.raises(InvalidImageId):
            cache.cache(bad, io.BytesIO(b"x"))
        with pytest.raises(InvalidImageId):
            cache.cache_stream(bad, [b"x"])
    assert calls == [], "no driver call was made"
    assert cache.driver.discarded == 0, "no instance was discarded"
    assert sorted(os.listdir(cache.root)) == before
    with pytest.raises(InvalidImageId, match=r"invalid image id \(NoneType\): an image id is a str, an int or a uuid.UUID"):
        cache.is_cached(None)
    with pytest.raises(InvalidImageId, match=r"invalid image id \(bytes\)"):
        cache.is_cached(b"img")
    with pytest.raises(TypeError):
        cache.get_least_recently_accessed_batch("3")
    with pytest.raises(ValueError):
        cache.clean(-1)


def test_results_are_plain_dicts_with_the_typed_keys(cache):
    cache.cache("a", io.BytesIO(b"aa"))
    cache.cache("b", io.BytesIO(b"bbb"))
    images = cache.get_cached_images()
    assert all(type(i) is dict for i in images)
    assert set(images[0]) == set(CachedImage.__annotations__)
    assert images[0]["image_id"] == "a" and images[0]["size"] == 2
    json.dumps(images)  # as Glance's cache API serializes them
    batch = cache.get_least_recently_accessed_batch(5)
    assert [type(e) for e in batch] == [dict, dict] and set(batch[0]) == set(LruEntry.__annotations__)
    report = cache.prune(0)
    assert type(report) is dict and set(report) == set(PruneReport.__annotations__)
    assert {r["image_id"] for r in report["removed"]} == {"a", "b"} and report["bytes_removed"] == 5
    clean = cache.clean()
    assert type(clean) is dict and set(clean) == set(CleanReport.__annotations__)
    info = cache.info
    assert type(info) is dict and set(info) == {"name", "version", "description"}
    json.dumps([report, clean, info])


def test_the_package_is_typed():
    root = Path(image_cache_wasm.__file__).parent
    assert (root / "py.typed").is_file()


def test_components_come_from_the_package_with_the_environment_as_an_override(tmp_path, monkeypatch, runtime):
    packaged = tmp_path / "packaged"
    packaged.mkdir()
    real = component("sqlite_driver")
    (packaged / "sqlite_driver.wasm").write_bytes(real.read_bytes())
    monkeypatch.setattr(cache_module, "_package_components", lambda: packaged)
    monkeypatch.delenv("IMAGE_CACHE_COMPONENTS_DIR", raising=False)
    assert image_cache_wasm.components_dir() == packaged
    c = ImageCache(tmp_path / "root", driver="sqlite", runtime=runtime, fallback_to_sqlite=False)
    assert c.components == packaged
    c.close()
    monkeypatch.setenv("IMAGE_CACHE_COMPONENTS_DIR", str(tmp_path / "override"))
    assert image_cache_wasm.components_dir() == tmp_path / "override"
    assert image_cache_wasm.components_dir(tmp_path / "explicit") == tmp_path / "explicit"
    # Neither packaged nor in a checkout: the message says where they come from.
    monkeypatch.delenv("IMAGE_CACHE_COMPONENTS_DIR")
    monkeypatch.setattr(cache_module, "_package_components", lambda: None)
    monkeypatch.setattr(cache_module, "_repo_components", lambda: None)
    with pytest.raises(LoadError) as e:
        ImageCache(tmp_path / "root2", driver="xattr", runtime=runtime, fallback_to_sqlite=False)
    assert "image_cache_wasm/components" in str(e.value) and "IMAGE_CACHE_COMPONENTS_DIR" in str(e.value)


def test_in_a_checkout_the_components_are_the_built_ones():
    # This test suite runs from the repository (an editable install):
    # without the environment variable, cargo's output directory.
    repo_dir = cache_module._repo_components()
    assert repo_dir is not None and repo_dir.parts[-3:] == ("target", "guest", "components")
    assert cache_module._package_components() is None, (
        "src/image_cache_wasm/components exists: only a wheel build may make it"
    )
