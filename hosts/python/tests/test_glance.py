"""Glance's own ``glance.image_cache.ImageCache`` running on our Glance
driver class (image_cache_wasm.glance.Driver), for both components: it
caches (through its caching tee), reads, prunes and cleans images, with
Glance's commit / rollback / "incomplete fetch" semantics.

Needs Glance (`pip install -e 'hosts/python[test,glance]'`). Without it the
module is skipped, unless IMAGE_CACHE_REQUIRE_GLANCE=1 (as in CI), where a
missing Glance is a failure.
"""

from __future__ import annotations

import hashlib
import os
import time

import pytest

if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") == "1":
    import glance  # noqa: F401  (an ImportError fails the run)
else:
    pytest.importorskip("glance.image_cache")

from glance import image_cache as glance_image_cache  # noqa: E402
from glance.common import exception  # noqa: E402
from oslo_config import cfg  # noqa: E402

from conftest import component  # noqa: E402
from image_cache_wasm import glance as wasm_glance  # noqa: E402

CONF = cfg.CONF


def chunks(seed: int, n: int = 8, size: int = 700):
    return [bytes(((i * 31) + seed + k) & 0xFF for i in range(size)) for k in range(n)]


@pytest.fixture
def glance_cache(tmp_path, driver_name):
    component(f"{driver_name}_driver")
    CONF.set_override("image_cache_dir", str(tmp_path / "cache"))
    CONF.set_override("image_cache_sqlite_db", "cache.db")
    CONF.set_override("image_cache_stall_time", 86400)
    CONF.set_override("image_cache_max_size", 10 * 1024**3)
    CONF.set_override("image_cache_wasm_driver", driver_name)
    # Glance's ImageCache, with our class where Glance would import its own
    # (ImageCache.__init__ = pick a class by name, then configure_driver()).
    cache = glance_image_cache.ImageCache.__new__(glance_image_cache.ImageCache)
    wasm_glance.use_in(cache)
    assert isinstance(cache.driver, wasm_glance.Driver), "no fallback to Glance's own driver"
    assert cache.driver.cache.driver_name == driver_name
    yield cache
    cache.driver.cache.close()
    CONF.clear_override("image_cache_wasm_driver")
    CONF.clear_override("image_cache_dir")


def test_glance_caches_reads_prunes_and_cleans_through_the_component(glance_cache, tmp_path):
    c = glance_cache
    root = tmp_path / "cache"
    assert c.get_cache_size() == 0

    # Glance's caching tee: the chunks pass through, and the image is cached.
    data = chunks(1)
    md5 = hashlib.md5(b"".join(data)).hexdigest()
    passed = list(c.get_caching_iter("img-1", md5, iter(data)))
    assert passed == data
    assert c.is_cached("img-1")
    assert c.get_image_size("img-1") == 5600
    assert not c.driver.is_cacheable("img-1")

    # cache_image_file and cache_image_iter (Glance's prefetcher's path).
    src = tmp_path / "src.img"
    src.write_bytes(b"".join(chunks(2)))
    assert c.cache_image_file("img-2", open(src, "rb")) is True
    assert c.cache_image_iter("img-3", iter(chunks(3)), None) is True
    assert c.cache_image_iter("img-3", iter(chunks(3)), None) is False, "already cached"

    # Reads through Glance's open_for_read count hits.
    with c.open_for_read("img-1") as f:
        assert f.read() == b"".join(data)
    with c.open_for_read("img-1") as f:
        assert f.read(10) == data[0][:10]  # Glance counts a read that ends normally
    assert c.get_hit_count("img-1") == 2
    with pytest.raises(FileNotFoundError):
        with c.open_for_read("never-cached"):
            pass

    images = c.get_cached_images()
    assert [i["image_id"] for i in images] == ["img-1", "img-2", "img-3"]
    assert {i["size"] for i in images} == {5600}
    assert c.get_cache_size() == 3 * 5600

    # Queue, as the API and the prefetcher do.
    assert c.queue_image("img-4") is True
    assert c.queue_image("img-4") is False
    assert c.queue_image("img-1") is False
    assert c.get_queued_images() == ["img-4"]
    assert c.cache_image_iter("img-4", iter(chunks(4)), None)
    assert c.get_queued_images() == [], "caching takes it off the queue"

    # Glance's prune: least recently accessed first, down to the max size.
    with c.open_for_read("img-2") as f:
        f.read()
    with c.open_for_read("img-3") as f:
        f.read()
    with c.open_for_read("img-1") as f:
        f.read()
    CONF.set_override("image_cache_max_size", 2 * 5600)
    assert c.prune() == (2, 2 * 5600)
    assert [i["image_id"] for i in c.get_cached_images()] == ["img-1", "img-3"]
    CONF.clear_override("image_cache_max_size")

    # Clean: invalid files, and incomplete files older than the stall time.
    (root / "invalid" / "broken").write_bytes(b"x")
    (root / "incomplete" / "stalled").write_bytes(b"x")
    old = time.time() - 2 * 86400
    os.utime(root / "incomplete" / "stalled", (old, old))
    (root / "incomplete" / "fresh").write_bytes(b"x")
    c.clean()
    assert sorted(os.listdir(root / "invalid")) == []
    assert sorted(os.listdir(root / "incomplete")) == ["fresh"]
    c.clean(stall_time=0)
    assert os.listdir(root / "incomplete") == []

    c.delete_cached_image("img-1")
    assert not c.is_cached("img-1")
    assert c.delete_all_cached_images() == 1
    assert c.get_cache_size() == 0


def test_a_bad_checksum_rolls_back_into_invalid(glance_cache, tmp_path):
    c = glance_cache
    data = chunks(5)
    with pytest.raises(exception.GlanceException):
        list(c.get_caching_iter("bad", "0" * 32, iter(data)))
    assert not c.is_cached("bad")
    assert os.listdir(tmp_path / "cache" / "invalid") == ["bad"]
    assert c.get_cached_images() == []


def test_a_failing_source_rolls_back_and_the_response_continues(glance_cache, tmp_path):
    c = glance_cache

    def source():
        yield b"first"
        raise IOError("connection reset by the image store")

    # Glance logs the failure and keeps responding (nothing more to send).
    assert list(c.get_caching_iter("src-fail", None, source())) == [b"first"]
    assert not c.is_cached("src-fail")
    assert os.listdir(tmp_path / "cache" / "invalid") == ["src-fail"]


def test_an_abandoned_fetch_is_an_incomplete_fetch(glance_cache, tmp_path):
    c = glance_cache
    it = c.get_caching_iter("abandoned", None, iter(chunks(6)))
    assert next(it) == chunks(6)[0]
    assert c.driver.is_being_cached("abandoned")
    it.close()  # the client went away
    assert not c.is_cached("abandoned")
    assert not c.driver.is_being_cached("abandoned")
    assert os.listdir(tmp_path / "cache" / "invalid") == ["abandoned"]


def test_a_driver_that_cannot_configure_falls_back_to_glances_sqlite(tmp_path):
    CONF.set_override("image_cache_dir", str(tmp_path / "cache"))
    CONF.set_override("image_cache_wasm_driver", str(tmp_path / "no-such-driver.wasm"))
    try:
        cache = glance_image_cache.ImageCache.__new__(glance_image_cache.ImageCache)
        with pytest.raises(exception.BadDriverConfiguration):
            wasm_glance.Driver().configure()
        wasm_glance.use_in(cache)
        assert type(cache.driver).__module__ == "glance.image_cache.drivers.sqlite"
    finally:
        CONF.clear_override("image_cache_wasm_driver")
        CONF.clear_override("image_cache_dir")


def test_the_driver_class_implements_every_method_of_glances_interface():
    import inspect

    from glance.image_cache.drivers import base

    required = {
        name
        for name, fn in inspect.getmembers(base.Driver, inspect.isfunction)
        if "NotImplementedError" in inspect.getsource(fn) or name in ("configure", "get_image_size")
    }
    assert {"get_cache_size", "get_cached_images", "is_cached", "open_for_write", "open_for_read",
            "clean", "get_least_recently_accessed", "get_queued_images"} <= required
    missing = [n for n in sorted(required) if getattr(wasm_glance.Driver, n) is getattr(base.Driver, n)]
    assert missing == [], f"not implemented on the component: {missing}"
    assert issubclass(wasm_glance.Driver, base.Driver)
