"""Every shared scenario (tests/scenarios/conformance.json), for every
built-in driver, on the Python host: sqlite and xattr, and the centralized
driver on the session's PostgreSQL (tests/pg.py) and on its MariaDB
(tests/mariadb.py), a database of its own per scenario."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import SCENARIOS, component
from image_cache_wasm import ImageCache, Limits, Runtime
from scenario_runner import DATABASE_DRIVERS, drivers_of, load, play

CASES = [
    pytest.param(s, d, id=f"{d}-{s['name']}")
    for s in load(SCENARIOS / "conformance.json")
    for d in drivers_of(s)
]
DATABASE_CASES = [
    pytest.param(s, d, id=f"{d}-{s['name']}")
    for s in load(SCENARIOS / "conformance.json")
    for d in drivers_of(s, with_database=True)
    if d in DATABASE_DRIVERS
]


def test_the_scenario_file_covers_both_drivers():
    assert len(CASES) >= 2 * 25
    assert {c.values[1] for c in CASES} == {"sqlite", "xattr"}


@pytest.mark.parametrize("scenario,driver", CASES)
def test_scenario(scenario, driver, tmp_path, runtime):
    component(f"{driver}_driver")
    root = tmp_path / "root"

    def open_cache():
        return ImageCache(root, driver=driver, runtime=runtime, fallback_to_sqlite=False)

    play(scenario, root, driver, open_cache)


def test_the_scenario_file_covers_the_centralized_driver():
    assert len(DATABASE_CASES) >= 25


@pytest.mark.parametrize("scenario,driver", DATABASE_CASES)
def test_scenario_on_a_shared_database(scenario, driver, tmp_path, runtime, pg_db):
    component(f"{driver}_driver")
    root = tmp_path / "root"
    databases = pg_db.root()

    def open_cache():
        return ImageCache(root, driver=driver, databases=databases, runtime=runtime, fallback_to_sqlite=False,
                          options=[("worker_self_reference_url", "http://scenario-node:9292")])

    play(scenario, root, driver, open_cache)


@pytest.mark.parametrize("scenario,driver", DATABASE_CASES)
def test_scenario_on_mariadb(scenario, driver, tmp_path, runtime, maria_db):
    component(f"{driver}_driver")
    root = tmp_path / "root"
    databases = maria_db.root()

    def open_cache():
        return ImageCache(root, driver=driver, databases=databases, runtime=runtime, fallback_to_sqlite=False,
                          options=[("worker_self_reference_url", "http://scenario-node:9292")])

    # Glance's DATETIME columns keep whole seconds on MySQL and MariaDB.
    play(scenario, root, driver, open_cache, time_resolution=1.0)


HOSTILE = json.loads((SCENARIOS / "hostile.json").read_text())


def canary(outside: Path):
    return sorted((p.name, p.read_bytes()) for p in outside.iterdir())


@pytest.mark.parametrize("scenario", HOSTILE["scenarios"], ids=lambda s: s["name"])
def test_hostile_scenario(scenario, tmp_path, artifacts):
    assert HOSTILE["format"] == 1
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"do not read")
    victim = sqlite3.connect(outside / "victim.db")
    victim.executescript("CREATE TABLE t (x); INSERT INTO t VALUES ('victim');")
    victim.close()
    before = canary(outside)
    runtime = Runtime(Limits(call_deadline=HOSTILE["limits"]["call_deadline_ms"] / 1000), artifacts=artifacts)
    options = [(k, v.replace("$OUTSIDE", str(outside))) for k, v in HOSTILE["options"]]
    root = tmp_path / "root"
    path = component(HOSTILE["component"])

    def open_cache():
        return ImageCache(root, driver=path, grants=HOSTILE["grants"], options=options,
                          runtime=runtime, fallback_to_sqlite=False)

    play(scenario, root, "hostile", open_cache)
    assert canary(outside) == before, "nothing outside the root changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "root"], "nothing planted beside the root"
