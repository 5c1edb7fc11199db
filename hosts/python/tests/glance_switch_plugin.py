"""A pytest plugin that runs Glance's own tests with the switch on:
``image_cache_wasm.glance.install()`` before any of them, as
``image_cache_wasm.glance.wsgi`` does for glance-api. It records, per
test, the driver class every ``glance.image_cache.ImageCache`` ended up
with, so the caller can check the tests ran on the components (and not on
Glance's own drivers, or on Glance's fallback).

Not a test module: ``tests/test_glance_own.py`` and
``.ci/python-package-check.sh`` copy it into a scratch directory (Glance's
tests read ``glance/tests/etc`` relative to the working directory) and run

    python -m pytest -p glance_switch_plugin --pyargs glance.tests.unit.test_image_cache ...

with ``IMAGE_CACHE_GLANCE_DRIVERS=<file>``: a JSON object, test
(``module::Class::test``) -> ``{"outcome": "passed"|"failed"|"skipped",
"drivers": [the driver classes (module.Class) of the caches it made]}``.

``IMAGE_CACHE_GLANCE_DEFAULT_DRIVER=sqlite`` sets the default of Glance's
``image_cache_driver`` for every test (Glance 33's is ``centralized_db``).
Only the tests that leave the option at its default see it:
``test_cache_middleware.TestImageCacheSqlite``, which Glance runs on the
default, ``centralized_db`` on a SQLite database, where the switch leaves
Glance's own driver (the centralized component's hosts serve PostgreSQL
and MySQL/MariaDB only); with it, that class runs on the sqlite component,
as its name says.
"""

from __future__ import annotations

import json
import os

# Glance's [database] options: its full test run has them registered by
# other test modules before the functional tests run; on their own they
# need this import.
import glance.db.migration  # noqa: F401
from glance import image_cache

from image_cache_wasm import glance as wasm_glance

wasm_glance.install()

import pytest

_current = "<collection>"
_drivers: dict = {}
_outcomes: dict = {}
_init_driver = image_cache.ImageCache.init_driver  # the switch's


def _recording_init_driver(self):
    _init_driver(self)
    cls = type(self.driver)
    _drivers.setdefault(_current, []).append(f"{cls.__module__}.{cls.__qualname__}")


image_cache.ImageCache.init_driver = _recording_init_driver


def _test_id(item) -> str:
    cls = getattr(item, "cls", None)
    return f"{item.module.__name__}::{cls.__name__ if cls else ''}::{item.name}"


def pytest_runtest_setup(item):
    global _current
    _current = _test_id(item)
    default = os.environ.get("IMAGE_CACHE_GLANCE_DEFAULT_DRIVER")
    if default:
        # Again before every test: Glance's config fixture resets defaults.
        image_cache.CONF.set_default("image_cache_driver", default)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    test = _test_id(item)
    if report.failed:
        _outcomes[test] = "failed"
    elif report.skipped and _outcomes.get(test) != "failed":
        _outcomes[test] = "skipped"
    else:
        _outcomes.setdefault(test, "passed")


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("IMAGE_CACHE_GLANCE_DRIVERS")
    if out:
        record = {t: {"outcome": o, "drivers": _drivers.get(t, [])} for t, o in _outcomes.items()}
        with open(out, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
