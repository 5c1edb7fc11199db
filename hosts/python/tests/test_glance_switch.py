"""The switch that puts Glance on the components by configuration:
``image_cache_wasm.glance.install()`` (what ``image_cache_wasm.glance.wsgi``
does before Glance's WSGI application loads), Glance's own
``glance.image_cache.ImageCache()`` picking our class for the driver its
``image_cache_driver`` names, glance-api itself started through the WSGI
module (the one-line change), and Glance's commands through ``python -m
image_cache_wasm.glance``.

Needs Glance (`pip install -e 'hosts/python[test,glance]'`); skipped
without it unless IMAGE_CACHE_REQUIRE_GLANCE=1.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from unittest import mock

import pytest

if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") != "1":
    pytest.importorskip("glance.image_cache")

from glance import image_cache as glance_image_cache  # noqa: E402
from oslo_config import cfg  # noqa: E402

from conftest import component  # noqa: E402
from image_cache_wasm import InvalidImageId  # noqa: E402
from image_cache_wasm import glance as wasm_glance  # noqa: E402

CONF = cfg.CONF
HERE = Path(__file__).resolve().parent
GLANCE_SQLITE = "glance.image_cache.drivers.sqlite.Driver"
GLANCE_CENTRALIZED = "glance.image_cache.drivers.centralized_db.Driver"
OURS = "image_cache_wasm.glance.Driver"


def class_of(cache) -> str:
    cls = type(cache.driver)
    return f"{cls.__module__}.{cls.__qualname__}"


@pytest.fixture
def conf(tmp_path):
    """Glance's options for a cache in tmp_path; ``set(name, value,
    group=None)`` overrides more, all cleared afterwards."""
    wasm_glance.register_database_opts()
    done = []

    def set_(name, value, group=None):
        CONF.set_override(name, value, group)
        done.append((name, group))

    set_("image_cache_dir", str(tmp_path / "cache"))
    set_("image_cache_sqlite_db", "cache.db")
    yield set_
    for name, group in reversed(done):
        CONF.clear_override(name, group)


@pytest.fixture
def switch():
    was = wasm_glance.installed()
    wasm_glance.install()
    yield
    if not was:
        wasm_glance.uninstall()


def test_install_switches_glances_own_image_cache_onto_the_components(conf, tmp_path):
    component("sqlite_driver")
    component("xattr_driver")
    assert not wasm_glance.installed()
    conf("image_cache_driver", "sqlite")
    assert class_of(glance_image_cache.ImageCache()) == GLANCE_SQLITE
    wasm_glance.install()
    try:
        wasm_glance.install()  # idempotent
        assert wasm_glance.installed()
        for glance_name in ("sqlite", "xattr", "SQLite"):
            conf("image_cache_driver", glance_name)
            cache = glance_image_cache.ImageCache()
            assert class_of(cache) == OURS
            assert cache.driver.cache.driver_name == glance_name.lower()
            cache.driver.cache.close()
        # image_cache_wasm_driver names another component (or a file).
        conf("image_cache_driver", "xattr")
        conf("image_cache_wasm_driver", "sqlite")
        cache = glance_image_cache.ImageCache()
        assert class_of(cache) == OURS and cache.driver.cache.driver_name == "sqlite"

        # Glance's callers pass ints (its own tests do) and UUIDs: taken as
        # str(); anything else is an InvalidImageId (a ValueError), with no
        # driver call and no instance discarded.
        assert cache.cache_image_file(1, io.BytesIO(b"x" * 1024)) is True
        assert cache.is_cached(1) and cache.get_image_size("1") == 1024
        u = uuid.uuid4()
        assert list(cache.get_caching_iter(u, None, iter([b"ab", b"cd"]))) == [b"ab", b"cd"]
        assert cache.is_cached(str(u))
        with cache.open_for_read(u) as f:
            assert f.read() == b"abcd"
        assert cache.get_hit_count(u) == 1
        for bad in (None, b"1", 1.5, object()):
            with pytest.raises(InvalidImageId):
                cache.is_cached(bad)
            with pytest.raises(ValueError):
                cache.get_image_size(bad)
        with pytest.raises(FileNotFoundError):
            cache.get_image_size(2)
        assert cache.driver.cache.driver.discarded == 0
        cache.driver.cache.close()

        # A component that cannot be configured: Glance's own fallback.
        conf("image_cache_wasm_driver", str(tmp_path / "no-such-driver.wasm"))
        assert class_of(glance_image_cache.ImageCache()) == GLANCE_SQLITE
    finally:
        wasm_glance.uninstall()
    assert not wasm_glance.installed()
    CONF.clear_override("image_cache_wasm_driver")
    conf("image_cache_driver", "xattr")
    assert class_of(glance_image_cache.ImageCache()) == "glance.image_cache.drivers.xattr.Driver"


def test_centralized_db_on_a_database_the_component_cannot_serve_stays_on_glances_driver(conf, switch, tmp_path, caplog):
    conf("image_cache_driver", "centralized_db")
    conf("worker_self_reference_url", "http://glance-api-1:9292")
    conf("connection", f"sqlite:///{tmp_path / 'glance.sqlite'}", "database")
    with mock.patch("glance.db.get_api"), caplog.at_level(logging.WARNING):
        cache = glance_image_cache.ImageCache()
    assert class_of(cache) == GLANCE_CENTRALIZED, "Glance's own centralized_db, never its sqlite fallback"
    assert "the database is not PostgreSQL, MySQL or MariaDB" in caplog.text


def test_centralized_db_runs_on_the_component_on_postgresql(conf, switch, tmp_path, pg_db, pg_cluster, caplog):
    component("centralized_driver")
    conf("image_cache_driver", "centralized_db")
    conf("worker_self_reference_url", "http://glance-api-1:9292")
    conf("image_cache_database_pool_size", 2)
    # A role granted what `image-cache db grants` prints: the component.
    conf("connection", pg_db.url.replace("postgresql://", "postgresql+psycopg2://"), "database")
    cache = glance_image_cache.ImageCache()
    try:
        assert class_of(cache) == OURS and cache.driver.cache.driver_name == "centralized"
        image = str(uuid.uuid4())
        assert list(cache.get_caching_iter(image, None, iter([b"shared"]))) == [b"shared"]
        assert cache.get_cached_nodes(image) == ["http://glance-api-1:9292"]
        assert pg_db.sql("SELECT count(*) FROM cached_images") == "1"
    finally:
        cache.driver.cache.close()
        cache.driver.cache.databases.close()

    # Glance's own role (it owns the database): the component refuses it,
    # and Glance's own centralized_db driver serves instead, with the reason
    # in the log (never Glance's sqlite fallback, local bookkeeping for a
    # shared cache).
    owned = pg_cluster.owned_database()
    try:
        conf("connection", owned.url.replace("postgresql://", "postgresql+psycopg2://"), "database")
        with mock.patch("glance.db.get_api"), caplog.at_level(logging.WARNING):
            cache = glance_image_cache.ImageCache()
        assert class_of(cache) == GLANCE_CENTRALIZED
        assert "cannot run on the centralized component" in caplog.text
        assert "owns database" in caplog.text and "image-cache db grants" in caplog.text
        # ... until the cache gets a role of its own.
        conf("image_cache_database_url", pg_db.url)
        cache = glance_image_cache.ImageCache()
        assert class_of(cache) == OURS
        cache.driver.cache.close()
        cache.driver.cache.databases.close()
    finally:
        owned.close()


def smoke(tmp_path: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(HERE / "glance_wsgi_smoke.py"), str(tmp_path), *args],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("driver", ["sqlite", "xattr"])
def test_glance_api_through_the_wsgi_module_caches_on_the_components(tmp_path, driver):
    component(f"{driver}_driver")
    seen = smoke(tmp_path, driver, "image_cache_wasm.glance.wsgi")
    image = seen["image_id"]
    # Cached by the middleware on the first download, served from the
    # cache on the second (one hit), listed by the cache API.
    assert seen["cached_file"] and seen["cached_images"] == [[image, 1, 143360]], seen
    assert seen["drivers"] == [OURS], seen
    assert seen["seal"] == image, "committed by image_cache_wasm (its seal is on the file)"


def test_glance_api_without_the_switch_keeps_glances_driver(tmp_path):
    seen = smoke(tmp_path, "sqlite", "glance.wsgi.api")
    assert seen["drivers"] == [GLANCE_SQLITE] and seen["seal"] is None, seen
    assert seen["cached_images"] == [[seen["image_id"], 1, 143360]], seen


def test_glances_commands_run_under_the_switch(tmp_path):
    component("sqlite_driver")
    from image_cache_wasm import ImageCache

    root = tmp_path / "cache"
    with ImageCache(root, driver="sqlite", fallback_to_sqlite=False) as c:
        c.cache("old", io.BytesIO(b"x" * 4096))
    conf_file = tmp_path / "glance-api.conf"
    conf_file.write_text(textwrap.dedent(f"""\
        [DEFAULT]
        image_cache_dir = {root}
        image_cache_driver = sqlite
        image_cache_max_size = 0
        """))
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "image_cache_wasm.glance", "glance-cache-pruner",
         "--config-file", str(conf_file)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Image cache driver 'sqlite' runs on the sqlite component" in proc.stderr, proc.stderr[-4000:]
    assert not (root / "old").exists(), "pruned"
    usage = subprocess.run([sys.executable, "-m", "image_cache_wasm.glance", "no-such-command"],
                           capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "glance-cache-pruner" in usage.stderr
