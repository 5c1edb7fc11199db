"""The `sqlite` import without wasm: what a driver's SQL may reach."""

from __future__ import annotations

import time

import pytest

from image_cache_wasm.fs import RootFs
from image_cache_wasm.sqlite import SqliteError, SqliteRoot, pragma_allowed, readable_table


def soon(seconds: float = 10.0) -> float:
    return time.monotonic() + seconds


@pytest.fixture
def setup(tmp_path):
    d = tmp_path / "root"
    d.mkdir()
    root = RootFs(d)
    yield d, root, SqliteRoot(root)
    root.close()


def err(fn, *args) -> SqliteError:
    with pytest.raises(SqliteError) as e:
        fn(*args)
    return e.value


def test_opens_only_plain_names_in_the_root(setup):
    d, root, sqlite = setup
    for name in ["../escape.db", "/tmp/abs.db", "sub/x.db", "", "..", ":memory:", "file:x.db?mode=memory", "a\\b"]:
        assert err(sqlite.open, name).code == "access-denied", name
    sqlite.open("cache.db").close()
    assert (d / "cache.db").exists()
    assert not (d.parent / "escape.db").exists()


def test_refuses_a_symlinked_database(setup, tmp_path):
    d, root, sqlite = setup
    (d / "evil.db").symlink_to(tmp_path / "victim.db")
    e = err(sqlite.open, "evil.db")
    assert e.code == "access-denied"
    assert str(d) not in e.message
    assert not (tmp_path / "victim.db").exists()


def test_executes_and_queries_with_typed_values(setup):
    d, root, sqlite = setup
    c = sqlite.open("t.db")
    c.execute_batch("CREATE TABLE t (i INTEGER, r REAL, s TEXT, b BLOB, n)", soon())
    assert c.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)", [-7, 1.5, "x", b"\x01\x02", None], soon()) == 1
    assert c.query("SELECT * FROM t", [], soon()) == [[-7, 1.5, "x", b"\x01\x02", None]]
    assert err(c.execute, "INSERT INTO nowhere VALUES (1)", [], soon()).code == "other"
    c.execute("PRAGMA journal_mode=WAL", [], soon())  # rows it returns are skipped
    c.execute("BEGIN IMMEDIATE", [], soon())
    c.execute("INSERT INTO t (i) VALUES (1)", [], soon())
    c.execute("ROLLBACK", [], soon())
    assert c.query("SELECT count(*) FROM t", [], soon()) == [[1]]
    c.close()


@pytest.mark.parametrize(
    "sql",
    [
        "ATTACH DATABASE '/tmp/stolen.db' AS stolen",
        "ATTACH DATABASE 'file:/etc/passwd?mode=ro' AS probe",
        "VACUUM INTO '/tmp/vacuumed.db'",
        "PRAGMA hard_heap_limit = 1",
        "PRAGMA soft_heap_limit = 1",
        "PRAGMA temp_store_directory = '/tmp'",
        "PRAGMA database_list",
        "SELECT file FROM pragma_database_list",
        "SELECT load_extension('/tmp/evil.so')",
        "CREATE TEMP TABLE t (x)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE TRIGGER tr AFTER INSERT ON t BEGIN SELECT 1; END",
        "PRAGMA mmap_size = 1000000",
        "PRAGMA writable_schema = 1",
    ],
)
def test_statements_that_reach_beyond_the_database_are_refused(setup, sql):
    d, root, sqlite = setup
    c = sqlite.open("t.db")
    c.execute_batch("CREATE TABLE IF NOT EXISTS t (x)", soon())
    e = err(c.query, sql, [], soon())
    assert e.code == "access-denied", e.message
    assert "/tmp" not in e.message or "/tmp" in sql
    c.close()


def test_attach_is_denied_by_the_authorizer_and_the_limit(setup, tmp_path):
    d, root, sqlite = setup
    c = sqlite.open("t.db")
    target = tmp_path / "outside.db"
    assert err(c.query, f"ATTACH DATABASE '{target}' AS x", [], soon()).code == "access-denied"
    assert err(c.query, f"VACUUM INTO '{target}'", [], soon()).code == "access-denied"
    assert not target.exists()
    c.close()


def test_a_runaway_query_is_stopped_at_the_deadline(setup):
    d, root, sqlite = setup
    c = sqlite.open("t.db")
    started = time.monotonic()
    e = err(
        c.query,
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
        [],
        soon(0.3),
    )
    assert e.code == "timed-out", e.message
    assert time.monotonic() - started < 3
    assert c.query("SELECT 1", [], soon()) == [[1]], "the connection works afterwards"
    c.close()


def test_lock_waits_end_at_the_deadline(setup):
    d, root, sqlite = setup
    a, b = sqlite.open("t.db"), sqlite.open("t.db")
    a.execute_batch("CREATE TABLE t (x)", soon())
    a.execute("BEGIN IMMEDIATE", [], soon())
    started = time.monotonic()
    assert err(b.execute, "INSERT INTO t VALUES (1)", [], soon(0.3)).code == "busy"
    assert time.monotonic() - started < 3
    a.execute("COMMIT", [], soon())
    assert b.execute("INSERT INTO t VALUES (1)", [], soon()) == 1
    a.close()
    b.close()


def test_values_and_results_are_capped(setup):
    d, root, sqlite = setup
    c = sqlite.open("t.db")
    assert err(c.query, "SELECT zeroblob(20000000)", [], soon()).code == "limit-exceeded"
    small = SqliteRoot(root, max_result_bytes=1000).open("t.db")
    small.execute_batch("CREATE TABLE t (s TEXT)", soon())
    for _ in range(20):
        small.execute("INSERT INTO t VALUES (?)", ["y" * 100], soon())
    assert err(small.query, "SELECT s FROM t", [], soon()).code == "limit-exceeded"
    assert err(c.query, "SELECT 1" + " " * (1024 * 1024), [], soon()).code == "limit-exceeded"
    c.close()
    small.close()


def test_the_allow_lists_match_the_rust_host():
    for pragma, value, ok in [
        ("journal_mode", "WAL", True),
        ("journal_mode", "memory", False),
        ("journal_mode", None, True),
        ("synchronous", "NORMAL", True),
        ("hard_heap_limit", "1", False),
        ("soft_heap_limit", "1", False),
        ("temp_store_directory", "'/tmp'", False),
        ("database_list", None, False),
        ("mmap_size", "1000000", False),
        ("data_version", "3", False),
    ]:
        assert pragma_allowed(pragma, value) is ok, (pragma, value)
    assert readable_table("cached_images")
    assert not readable_table("pragma_database_list")
    assert not readable_table("sqlite_dbpage")
