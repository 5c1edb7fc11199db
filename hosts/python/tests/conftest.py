"""Shared fixtures. The driver components must have been built (`cargo
build` at the repository root, or IMAGE_CACHE_COMPONENTS_DIR): without them
every test that needs one fails rather than being skipped."""

from __future__ import annotations

from pathlib import Path

import pytest

from image_cache_wasm import ImageCache, Limits, Runtime, components_dir

REPO = Path(__file__).resolve().parents[3]
SCENARIOS = REPO / "tests" / "scenarios"


def component(name: str) -> Path:
    path = components_dir() / f"{name}.wasm"
    if not path.is_file():
        pytest.fail(
            f"driver component {path} is missing: build it with `cargo build` at the "
            "repository root, or point IMAGE_CACHE_COMPONENTS_DIR at the built components"
        )
    return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Compiled components for the whole test run, in a scratch directory
    (never the user's cache): a runtime made for one test's limits loads
    them instead of compiling again."""
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def runtime(artifacts) -> Runtime:
    """One runtime (engine, compiled components) for the whole test run, as
    an embedding application would share it."""
    return Runtime(Limits(call_deadline=20.0), artifacts=artifacts)


@pytest.fixture(params=["sqlite", "xattr"])
def driver_name(request) -> str:
    component(f"{request.param}_driver")
    return request.param


@pytest.fixture
def cache(tmp_path, runtime, driver_name) -> ImageCache:
    c = ImageCache(tmp_path / "root", driver=driver_name, runtime=runtime, fallback_to_sqlite=False)
    yield c
    c.close()


# -- PostgreSQL (the centralized driver) -------------------------------------------


@pytest.fixture(scope="session")
def pg_cluster():
    """The session's PostgreSQL (tests/pg.py): a throwaway cluster, or the
    server named by IMAGE_CACHE_TEST_POSTGRES. Without either the tests
    that need it fail, saying how to get one (as the Rust suite does)."""
    import pg  # psycopg: the `test` extra installs it

    try:
        return pg.shared()
    except pg.Unavailable as e:
        pytest.fail(str(e))


@pytest.fixture
def pg_db(pg_cluster):
    """A database of this test: Glance's two tables, the role ``glance``
    granted exactly what ``image-cache db grants`` prints."""
    db = pg_cluster.database()
    yield db
    db.close()


# -- MariaDB (the centralized driver on MySQL) ---------------------------------------


@pytest.fixture(scope="session")
def maria_server():
    """The session's MariaDB (tests/mariadb.py): a throwaway server, or the
    one named by IMAGE_CACHE_TEST_MARIADB. Without either the tests that
    need it fail, saying how to get one (as the Rust suite does)."""
    import mariadb  # PyMySQL: the `test` extra installs it

    try:
        return mariadb.shared()
    except mariadb.Unavailable as e:
        pytest.fail(str(e))


@pytest.fixture
def maria_db(maria_server):
    """A database of this test: Glance's two tables, an account named as the
    database granted exactly what ``image-cache db grants --mysql`` prints."""
    db = maria_server.database()
    yield db
    db.close()
