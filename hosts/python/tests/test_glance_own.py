"""Glance's own tests, with the switch on: Glance 33's unit
``ImageCacheTestCase`` (``glance/tests/unit/test_image_cache.py``) and its
functional cache tests (``glance/tests/functional/test_cache_middleware.py``,
``glance/tests/functional/v2/test_cache_api.py``), from the installed
Glance, run by pytest in a child process with
``image_cache_wasm.glance.install()`` done first (``glance_switch_plugin.py``:
what ``image_cache_wasm.glance.wsgi`` does for glance-api), in a scratch
directory (Glance's tests read ``glance/tests/etc`` relative to the
working directory, and write ``run_tests.log`` there).

Every test must pass, and the plugin's record says which driver class each
test's caches ended up with: the component's (``image_cache_wasm.glance.Driver``)
for every ``sqlite`` and ``xattr`` test, Glance's own ``centralized_db``
driver only where Glance's tests run ``centralized_db`` on SQLite or a fake
database (the centralized component's hosts serve PostgreSQL and
MySQL/MariaDB; ``tests/test_centralized*.py`` run Glance's ``ImageCache``
on it there). Glance's sqlite fallback never appears.

Needs Glance and its test dependencies (``pip install -e
'hosts/python[test,glance]'``); skipped without Glance unless
IMAGE_CACHE_REQUIRE_GLANCE=1.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") != "1":
    pytest.importorskip("glance.image_cache")
    pytest.importorskip("fixtures")
    pytest.importorskip("testtools")

from conftest import component  # noqa: E402

HERE = Path(__file__).resolve().parent
OURS = "image_cache_wasm.glance.Driver"
GLANCE_CENTRALIZED = "glance.image_cache.drivers.centralized_db.Driver"
MODULES = [
    "glance.tests.unit.test_image_cache",
    "glance.tests.functional.test_cache_middleware",
    "glance.tests.functional.v2.test_cache_api",
]


def run_glance_tests(work: Path, modules, extra_env=None):
    """Glance's test modules under the switch; (outcomes, drivers):
    ``{"module::Class::test": "passed"|"failed"|"skipped"}`` and the
    plugin's record of driver classes per test."""
    import importlib.util

    spec = importlib.util.find_spec("glance")
    etc = Path(spec.origin).parent / "tests" / "etc"
    (work / "glance" / "tests").mkdir(parents=True)
    (work / "glance" / "tests" / "etc").symlink_to(etc)
    shutil.copy(HERE / "glance_switch_plugin.py", work / "glance_switch_plugin.py")
    record = work / "record.json"
    env = dict(os.environ, IMAGE_CACHE_GLANCE_DRIVERS=str(record), **(extra_env or {}))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "glance_switch_plugin",
         "-W", "ignore", "-q", "-rfEs", "--pyargs", *modules],
        cwd=work, env=env, capture_output=True, text=True, timeout=1200,
    )
    assert record.is_file(), f"pytest did not run:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    tests = json.loads(record.read_text())
    outcomes = {t: r["outcome"] for t, r in tests.items()}
    drivers = {t: r["drivers"] for t, r in tests.items()}
    return proc, outcomes, drivers


def test_glances_own_cache_tests_pass_on_the_components(tmp_path):
    component("sqlite_driver")
    component("xattr_driver")
    proc, outcomes, drivers = run_glance_tests(
        tmp_path, MODULES, {"IMAGE_CACHE_GLANCE_DEFAULT_DRIVER": "sqlite"}
    )
    not_passed = {t: o for t, o in outcomes.items() if o != "passed"}
    assert proc.returncode == 0 and not not_passed, f"{not_passed}\n{proc.stdout[-8000:]}"

    by_class = collections.defaultdict(list)
    for test in outcomes:
        module, cls, name = test.split("::")
        by_class[(module.rsplit(".", 1)[-1], cls)].append(test)
    counts = {k: len(v) for k, v in by_class.items()}
    # Glance 33.0.0's tests (pinned by the `glance` extra).
    assert counts == {
        ("test_image_cache", "TestImageCacheXattr"): 20,
        ("test_image_cache", "TestImageCacheSqlite"): 21,  # ImageCacheTestCase + the prefetcher
        ("test_image_cache", "TestImageCacheCentralizedDb"): 24,
        ("test_image_cache", "TestImageCacheNoDep"): 2,
        ("test_image_cache", "TestImagePrefetcher"): 1,
        ("test_cache_middleware", "TestImageCacheXattr"): 4,
        ("test_cache_middleware", "TestImageCacheSqlite"): 4,
        ("test_cache_api", "TestImageCache"): 19,
    }, counts
    assert sum(counts.values()) == 95

    def used(test):
        return set(drivers.get(test, []))

    # Glance's unit ImageCacheTestCase, 20 tests on each component.
    for cls in ("TestImageCacheSqlite", "TestImageCacheXattr"):
        for test in by_class[("test_image_cache", cls)]:
            assert used(test) == {OURS}, (test, used(test))
    assert used("glance.tests.unit.test_image_cache::TestImagePrefetcher::test_fetch_image_into_cache_without_auth") == {OURS}
    # Glance's functional cache tests: the middleware on both components,
    # the cache API on sqlite (a cache disabled makes none).
    for cls in ("TestImageCacheSqlite", "TestImageCacheXattr"):
        for test in by_class[("test_cache_middleware", cls)]:
            assert used(test) == {OURS}, (test, used(test))
    centralized = {"test_list_cached_nodes_centralized_cache_enabled",
                   "test_list_cached_nodes_nonexistent_image", "test_list_cached_nodes_invalid_uuid"}
    disabled = {"test_cache_api_cache_disabled", "test_cache_clean_disabled", "test_cache_prune_disabled"}
    for test in by_class[("test_cache_api", "TestImageCache")]:
        name = test.rsplit("::", 1)[1]
        if name in centralized:
            # centralized_db on Glance's SQLite test database: Glance's own.
            assert used(test) == {GLANCE_CENTRALIZED}, (test, used(test))
        elif name in disabled:
            assert used(test) == set(), (test, used(test))
        else:
            assert used(test) == {OURS}, (test, used(test))
    for test in by_class[("test_image_cache", "TestImageCacheCentralizedDb")]:
        assert used(test) == {GLANCE_CENTRALIZED}, (test, used(test))
    ours = sum(1 for v in drivers.values() if set(v) == {OURS})
    assert ours == 20 + 21 + 1 + 4 + 4 + 13, ours
    theirs = sum(1 for v in drivers.values() if set(v) == {GLANCE_CENTRALIZED})
    print(f"\nGlance's own cache tests with the switch on: {len(outcomes)} passed; {ours} on the components "
          f"(the unit ImageCacheTestCase: 20 on sqlite, 20 on xattr), {theirs} on Glance's own centralized_db "
          f"(a SQLite or fake database), {len(outcomes) - ours - theirs} with no cache driver")
