"""Every shared scenario (tests/scenarios/conformance.json), for both
built-in drivers, on the Python host."""

from __future__ import annotations

import pytest

from conftest import SCENARIOS, component
from image_cache_wasm import ImageCache
from scenario_runner import DRIVERS, load, play

CASES = [
    pytest.param(s, d, id=f"{d}-{s['name']}")
    for s in load(SCENARIOS / "conformance.json")
    for d in s.get("drivers", DRIVERS)
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
