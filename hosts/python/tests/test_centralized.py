"""The centralized driver on a real PostgreSQL (tests/pg.py), in the Python
host: many nodes in one database, Glance's own schema, the role fence, what
a driver's SQL may not do, the bounds, the database going away and coming
back, TLS as libpq does it, and Glance's driver class on the shared
database. (The shared conformance scenarios run on it too:
test_scenarios.py.) The counterpart of the Rust suite's
``tests/centralized.rs``."""

from __future__ import annotations

import io
import os
import signal
import threading
import time
import types
from pathlib import Path

import pytest

import pg
from conftest import component
from image_cache_wasm import (
    CENTRALIZED_DATABASE,
    BadConfiguration,
    DatabaseError,
    DatabaseRoot,
    DbError,
    DriverFault,
    ImageCache,
    IoError,
    Limits,
    DatabaseSettings,
    Runtime,
    Unsupported,
)
from image_cache_wasm.runtime import InstanceState, _db_open, _db_statement, enter
from pg import PASSWORD

UUID_A = "6f1e9d2a-4a8b-4c3e-9d7f-0a1b2c3d4e5f"
UUID_B = "0c9b8a7d-6e5f-4a3b-8c1d-2e3f4a5b6c7d"


def image_bytes(seed: int, n: int) -> bytes:
    return bytes(((i * 31) + seed) & 0xFF for i in range(n))


@pytest.fixture(autouse=True)
def _built():
    component("centralized_driver")


def node(root: Path, databases: DatabaseRoot, name: str, runtime: Runtime, **kw) -> ImageCache:
    """A cache on ``root`` with the centralized driver as node ``name``."""
    return ImageCache(
        root,
        driver="centralized",
        databases=databases,
        runtime=runtime,
        fallback_to_sqlite=kw.pop("fallback_to_sqlite", False),
        options=[("worker_self_reference_url", name)],
        **kw,
    )


def put(cache: ImageCache, image_id: str, data: bytes) -> None:
    cache.cache(image_id, io.BytesIO(data))


def ids(cache: ImageCache):
    return [i["image_id"] for i in cache.get_cached_images()]


def soon() -> float:
    return time.monotonic() + 10


def within(seconds: float) -> float:
    return time.monotonic() + seconds


def test_two_nodes_share_one_database_and_keep_their_own_caches(tmp_path, pg_db, runtime):
    databases = pg_db.root()
    one = node(tmp_path / "one", databases, "http://node-1:9292", runtime)
    two = node(tmp_path / "two", databases, "http://node-2:9292", runtime)
    assert one.driver_name == two.driver_name == "centralized"

    put(one, UUID_A, image_bytes(1, 1000))
    put(two, UUID_A, image_bytes(1, 1000))
    put(two, UUID_B, image_bytes(2, 3000))

    assert ids(one) == [UUID_A]
    assert ids(two) == [UUID_B, UUID_A]
    both = ["http://node-1:9292", "http://node-2:9292"]
    # Cached on one node, listed by the other.
    assert one.get_cached_nodes(UUID_A) == both
    assert two.get_cached_nodes(UUID_A) == both
    assert one.get_cached_nodes(UUID_B) == ["http://node-2:9292"]
    assert one.get_cached_nodes("never") == []

    # Hits are per node.
    assert one.read(UUID_A) == image_bytes(1, 1000)
    one.read(UUID_A)
    assert one.get_hit_count(UUID_A) == 2
    assert two.get_hit_count(UUID_A) == 0
    assert one.get_cache_size() == 1000
    assert two.get_cache_size() == 4000

    # Pruning node 2 leaves node 1 alone.
    report = two.prune(0)
    assert len(report["removed"]) == 2
    assert ids(two) == []
    assert ids(one) == [UUID_A]
    assert one.get_hit_count(UUID_A) == 2
    assert one.get_cached_nodes(UUID_A) == ["http://node-1:9292"]

    # Deleting on node 1 touches only its rows.
    put(two, UUID_A, image_bytes(1, 1000))
    one.delete_cached_image(UUID_A)
    assert two.get_cached_nodes(UUID_A) == ["http://node-2:9292"]
    assert one.delete_all_cached_images() == 0
    assert ids(two) == [UUID_A]

    # What Glance sees in its tables.
    rows = pg_db.sql(
        "SELECT n.node_reference_url || ' ' || c.image_id || ' ' || c.hits FROM cached_images c "
        "JOIN node_reference n USING (node_reference_id) ORDER BY 1"
    )
    assert rows == f"http://node-2:9292 {UUID_A} 0"
    assert pg_db.sql("SELECT count(*) FROM node_reference") == "2", "one node_reference row per node"
    # Times are naive UTC, as Glance writes them.
    lag = pg_db.sql(
        "SELECT abs(extract(epoch FROM (now() AT TIME ZONE 'UTC') - last_modified)) < 60 FROM cached_images"
    )
    assert lag == "True"
    one.close()
    two.close()


def test_hits_from_many_threads_are_all_counted(tmp_path, pg_db, runtime):
    cache = node(tmp_path / "root", pg_db.root(), "http://n:9292", runtime)
    put(cache, UUID_A, b"x" * 100)
    failures = []

    def reader():
        for _ in range(10):
            try:
                cache.read(UUID_A)
            except Exception as e:  # reported below
                failures.append(e)

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]
    assert cache.get_hit_count(UUID_A) == 60
    # The pool bounds what the node holds: 4 by default.
    live, most = cache.databases.backend(CENTRALIZED_DATABASE).pool_status()
    assert most == 4 and 1 <= live <= 4
    cache.close()


def test_a_node_without_worker_self_reference_url_is_a_bad_configuration(tmp_path, pg_db, runtime):
    with pytest.raises(BadConfiguration, match="worker_self_reference_url"):
        ImageCache(tmp_path / "root", driver="centralized_db", databases=pg_db.root(), runtime=runtime,
                   fallback_to_sqlite=False)


def test_an_unreachable_database_is_an_error_that_never_shows_the_password(tmp_path, runtime):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg2://glance:{PASSWORD}@127.0.0.1:{port}/glance"

    def open_cache(fallback: bool) -> ImageCache:
        return node(tmp_path / "root", DatabaseRoot().with_database("glance", DatabaseSettings(url)),
                    "http://n:9292", runtime, fallback_to_sqlite=fallback)

    # Down is not a configuration to fix: a database error, which says
    # which database and never the password or the address.
    started = time.monotonic()
    with pytest.raises(DatabaseError) as e:
        open_cache(False)
    message = str(e.value)
    assert '"glance"' in message and "cannot be reached" in message, message
    assert PASSWORD not in message and str(port) not in message and "127.0.0.1" not in message, message
    assert time.monotonic() - started < 5, "a refused connection fails at once"
    # No fallback to sqlite for an outage, even when fallback is on.
    with pytest.raises(DatabaseError):
        open_cache(True)
    # No database configured at all.
    with pytest.raises(BadConfiguration) as e:
        ImageCache(tmp_path / "root", driver="centralized", runtime=runtime, fallback_to_sqlite=False,
                   options=[("worker_self_reference_url", "http://n:9292")])
    assert "image_cache_database_url" in str(e.value), str(e.value)
    # ... and with fallback on, that one is a configuration: sqlite takes over.
    cache = ImageCache(tmp_path / "root", driver="centralized", runtime=runtime,
                       options=[("worker_self_reference_url", "http://n:9292")])
    assert cache.driver_name == "sqlite"
    with pytest.raises(Unsupported):
        cache.get_cached_nodes(UUID_A)
    cache.close()


def test_a_missing_table_names_glance_manage_db_sync(tmp_path, pg_cluster, runtime):
    db = pg_cluster.bare_database()
    with pytest.raises(BadConfiguration) as e:
        node(tmp_path / "root", db.root(), "http://n:9292", runtime)
    message = str(e.value)
    assert "missing from the database" in message and "glance-manage db sync" in message, message
    assert PASSWORD not in message
    db.close()


def test_a_superuser_role_is_refused_unless_allowed(tmp_path, pg_cluster, runtime):
    db = pg_cluster.database()
    if db.superuser_url is None:
        pytest.skip("an external server: its admin is not ours to hand out")

    def open_cache(allow: bool) -> ImageCache:
        root = db.root_with(DatabaseSettings(db.superuser_url, allow_privileged_role=allow))
        return node(tmp_path / "root", root, "http://n:9292", runtime)

    with pytest.raises(BadConfiguration) as e:
        open_cache(False)
    message = str(e.value)
    assert "superuser" in message, message
    assert "GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference" in message, message
    assert "image-cache db grants" in message, message
    assert PASSWORD not in message
    open_cache(True).close()

    # A role that may run server programs is refused as well.
    db.sql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'runner') THEN "
        "CREATE ROLE runner LOGIN PASSWORD 'runner-pw'; END IF; END $$; "
        "GRANT pg_execute_server_program TO runner"
    )
    db.grant_cache_privileges("runner")
    root = db.root_with(DatabaseSettings(db.url.replace(f"glance:{PASSWORD}", "runner:runner-pw")))
    with pytest.raises(DbError) as e:
        root.open(CENTRALIZED_DATABASE, soon())
    assert e.value.code == "access-denied", e.value.message
    assert "pg_execute_server_program" in e.value.message
    # Refused once, refused again without asking the server.
    with pytest.raises(DbError):
        root.open(CENTRALIZED_DATABASE, soon())
    db.close()


def test_a_role_with_more_than_the_cache_tables_is_refused_with_the_grants_to_run(pg_cluster):
    db = pg_cluster.database()
    db.sql("CREATE TABLE image_locations (image_id TEXT, value TEXT)")

    def refusal(db) -> "str | None":
        root = db.root()
        try:
            root.open(CENTRALIZED_DATABASE, soon()).close()
        except DbError as e:
            assert e.code == "access-denied", e.message
            return e.message
        finally:
            root.close()
        return None

    assert refusal(db) is None, "the fenced role is accepted"
    for grant, revoke, expected in [
        ("GRANT SELECT ON image_locations TO glance", "REVOKE SELECT ON image_locations FROM glance",
         "SELECT on image_locations"),
        ("GRANT TRUNCATE, TRIGGER ON cached_images TO glance",
         "REVOKE TRUNCATE, TRIGGER ON cached_images FROM glance", "TRIGGER on cached_images"),
        ("GRANT CREATE ON SCHEMA public TO glance", "REVOKE CREATE ON SCHEMA public FROM glance",
         "may create objects in schema public"),
        (f"GRANT CREATE ON DATABASE {db.name} TO glance", f"REVOKE CREATE ON DATABASE {db.name} FROM glance",
         "may create schemas in the database"),
        ("ALTER TABLE image_locations OWNER TO glance", "ALTER TABLE image_locations OWNER TO postgres",
         "owns relation image_locations"),
        ("GRANT SELECT (value) ON image_locations TO glance", "REVOKE SELECT (value) ON image_locations FROM glance",
         "SELECT on image_locations"),
    ]:
        if db.superuser_url is None and "postgres" in revoke:
            continue  # an external server's admin has another name
        db.sql(grant)
        message = refusal(db)
        assert message is not None, f"{grant}: accepted"
        assert expected in message, f"{grant}: {message}"
        assert (
            "GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference TO image_cache" in message
            and "GRANT USAGE ON SEQUENCE" in message
        ), message
        assert PASSWORD not in message
        db.sql(revoke)
        assert refusal(db) is None, f"{revoke}: accepted again"
    # A role it may become with powers of its own.
    db.sql(
        "DO $$ BEGIN "
        "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'member_test') THEN "
        "CREATE ROLE member_test LOGIN PASSWORD 'member-pw'; END IF; "
        "IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'mighty_test') THEN "
        "CREATE ROLE mighty_test CREATEDB; END IF; END $$; "
        "GRANT mighty_test TO member_test"
    )
    db.grant_cache_privileges("member_test")
    member = db.root_with(DatabaseSettings(db.url.replace(f"glance:{PASSWORD}", "member_test:member-pw")))
    with pytest.raises(DbError) as e:
        member.open(CENTRALIZED_DATABASE, soon())
    assert "mighty_test" in e.value.message, e.value.message
    # Glance's own role (the owner of its database and tables) is refused.
    owned = pg_cluster.owned_database()
    message = refusal(owned)
    assert message is not None and "owns database" in message, message
    db.close()


@pytest.fixture
def attack_db(pg_cluster):
    """A database whose role may create tables (owned by it), with that
    allowed: the statement checks, the second layer, are tried on their
    own."""
    db = pg_cluster.owned_database()
    yield db
    db.close()


def test_sql_that_reaches_beyond_the_tables_is_refused(attack_db, tmp_path):
    root = attack_db.privileged_root()
    target = tmp_path / "pwned"
    c = root.open(CENTRALIZED_DATABASE, soon())
    c.execute("CREATE TABLE t (s TEXT)", [], soon())
    # tests/centralized.rs `sql_that_reaches_beyond_the_tables_is_refused`,
    # with the task's COPY, pg_read_file, two statements and SET ROLE.
    for sql in [
        f"COPY t TO '{target}'",
        f"COPY (SELECT 1) TO PROGRAM 'touch {target}'",
        "SELECT pg_read_file('/etc/passwd')",
        "SELECT lo_import('/etc/passwd')",
        f"SELECT lo_export(1, '{target}')",
        "SELECT dblink('host=127.0.0.1', 'select 1')",
        "SET ROLE postgres",
        "SET statement_timeout = 0",
        "ALTER SYSTEM SET archive_command = 'touch /tmp/x'",
        "SELECT inet_server_addr()",
        "SELECT current_setting('port')",
        "SELECT current_user",
        "SELECT * FROM pg_stat_activity",
        "SELECT query_to_xml('select 1', true, true, '')",
        "SELECT 1; DROP TABLE t",
        "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
        "DO $$ BEGIN END $$",
        "SELECT 1 --\r, pg_terminate_backend(1)",
    ]:
        for method in (c.query, c.execute):
            with pytest.raises(DbError) as e:
                method(sql, [], soon())
            assert e.value.code == "access-denied", f"{sql}: {e.value.message}"
            assert e.value.message.startswith('database "glance": '), e.value.message
    assert not target.exists()
    # The table is still there and the connection still works.
    assert c.execute("INSERT INTO t VALUES ($1)", ["ok"], soon()) == 1
    assert c.query("SELECT s FROM t", [], soon()) == [["ok"]]
    c.close()


def test_parameters_must_fit_the_servers_types(attack_db):
    c = attack_db.privileged_root().open(CENTRALIZED_DATABASE, soon())
    assert c.dialect == "postgresql"
    c.execute(
        "CREATE TABLE t (i INTEGER, b BIGINT, f DOUBLE PRECISION, s VARCHAR(4), x BYTEA, at TIMESTAMP, ok BOOLEAN)",
        [], soon(),
    )
    insert = "INSERT INTO t VALUES ($1, $2, $3, $4, $5, $6, $7)"
    good = [7, 1 << 40, 3, "abcd", b"\x00\x01\x02", 1_700_000_000.25, True]
    assert c.execute(insert, good, soon()) == 1
    for i, bad in [(0, 1 << 40), (0, "7"), (1, 1.5), (4, "x"), (5, float("inf")), (6, 1)]:
        values = list(good)
        values[i] = bad
        with pytest.raises(DbError) as e:
            c.execute(insert, values, soon())
        assert e.value.code == "other", e.value.message
        assert f"${i + 1}" in e.value.message, e.value.message
    # Too long for VARCHAR(4): the server says so.
    values = list(good)
    values[3] = "abcde"
    with pytest.raises(DbError) as e:
        c.execute(insert, values, soon())
    assert "(22001)" in e.value.message, e.value.message
    rows = c.query("SELECT * FROM t", [], soon())
    assert rows == [[7, 1 << 40, 3.0, "abcd", b"\x00\x01\x02", 1_700_000_000.25, True]]
    # The server stored naive UTC: 2023-11-14 22:13:20.25.
    assert c.query("SELECT at::text FROM t", [], soon()) == [["2023-11-14 22:13:20.25"]]
    # Integer Unix seconds for a time, NULL for anything, NUMERIC as real.
    c.execute("UPDATE t SET at = $1, s = $2", [0, None], soon())
    assert c.query("SELECT at, s, 2.5::numeric, EXTRACT(EPOCH FROM at) FROM t", [], soon()) == [[0.0, None, 2.5, 0.0]]
    with pytest.raises(DbError) as e:
        c.execute(insert, [None], soon())
    assert "7 parameters" in e.value.message, e.value.message
    # A type the interface does not carry: cast it.
    with pytest.raises(DbError) as e:
        c.query("SELECT '10.0.0.1'::inet", [], soon())
    assert e.value.code == "other" and "cast it" in e.value.message, e.value.message
    # A constraint is a constraint.
    c.execute("CREATE TABLE u (k INTEGER PRIMARY KEY)", [], soon())
    c.execute("INSERT INTO u VALUES ($1)", [1], soon())
    with pytest.raises(DbError) as e:
        c.execute("INSERT INTO u VALUES ($1)", [1], soon())
    assert e.value.code == "constraint" and "(23505)" in e.value.message, e.value.message
    # Rows changed, and a SELECT through execute counts its rows.
    assert c.execute("UPDATE u SET k = k + 1", [], soon()) == 1
    assert c.execute("SELECT 1 FROM generate_series(1, 3)", [], soon()) == 3
    c.close()


def test_results_time_and_connections_are_bounded(attack_db):
    root = attack_db.root(max_result_bytes=10_000, pool_size=2, allow_privileged_role=True)
    c = root.open(CENTRALIZED_DATABASE, soon())
    with pytest.raises(DbError) as e:
        c.query("SELECT repeat('x', 1000) FROM generate_series(1, 100)", [], soon())
    assert e.value.code == "limit-exceeded", e.value.message
    assert c.query("SELECT 1", [], soon()) == [[1]], "the connection is still usable"

    # A statement that runs past the deadline is stopped there, and on the
    # server too.
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        c.query("SELECT count(*) FROM generate_series(1, 10000000000)", [], within(0.5))
    assert e.value.code == "timed-out", e.value.message
    assert time.monotonic() - started < 2
    deadline = time.monotonic() + 10
    while attack_db.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%generate_series(1, 10000000000)%' "
        "AND state = 'active' AND pid <> pg_backend_pid()"
    ) != "0":
        assert time.monotonic() < deadline, "the query still runs on the server"
        time.sleep(0.05)
    # The connection it ran on is gone; the resource says so.
    with pytest.raises(DbError) as e:
        c.query("SELECT 1", [], soon())
    assert e.value.code == "unavailable" and "open a new one" in e.value.message
    c.close()

    # The pool's size bounds the connections: a third waits, then gives up
    # at its deadline.
    a = root.open(CENTRALIZED_DATABASE, soon())
    b = root.open(CENTRALIZED_DATABASE, soon())
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        root.open(CENTRALIZED_DATABASE, within(0.3))
    assert e.value.code == "timed-out", e.value.message
    assert time.monotonic() - started < 1
    a.close()
    root.open(CENTRALIZED_DATABASE, soon()).close()
    b.close()
    assert root.backend(CENTRALIZED_DATABASE).pool_status() == (2, 2)
    c = root.open(CENTRALIZED_DATABASE, soon())
    pid = c.session.pgconn.backend_pid
    assert attack_db.sql(f"SELECT application_name FROM pg_stat_activity WHERE pid = {pid}") == "image-cache"
    # Endless distinct SQL does not grow a connection's prepared statements
    # without bound.
    for i in range(300):
        assert c.query(f"SELECT $1::int + {i}", [1], soon()) == [[1 + i]]
    assert len(c.session.statements) <= 256
    assert int(attack_db.sql(f"SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}")) == 1
    c.close()


def test_the_session_timeouts_are_the_call_deadline(tmp_path, attack_db, artifacts):
    # statement_timeout, lock_timeout and idle_in_transaction_session_timeout
    # are set at connect to the call deadline (1.5 s here): a lock wait the
    # host would still allow (its own deadline 10 s away) is ended by the
    # server at 1.5 s.
    runtime = Runtime(Limits(call_deadline=1.5), artifacts=artifacts)
    root = attack_db.privileged_root()
    ImageCache(tmp_path / "root", databases=root, runtime=runtime).close()  # adopts 1.5 s
    backend = root.backend(CENTRALIZED_DATABASE)
    assert backend.statement_timeout == 1.5
    assert "-c statement_timeout=1500 -c lock_timeout=1500 -c idle_in_transaction_session_timeout=1500" in (
        backend._options()
    )
    c = root.open(CENTRALIZED_DATABASE, soon())
    c.execute("CREATE TABLE s (n TEXT)", [], soon())
    holder = threading.Thread(
        target=attack_db.sql, args=("BEGIN; LOCK TABLE s IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep(4); COMMIT",)
    )
    holder.start()
    waited = time.monotonic() + 20
    while attack_db.sql("SELECT count(*) FROM pg_locks WHERE relation = 's'::regclass AND granted") != "1":
        assert time.monotonic() < waited, "the administrator never took the lock"
        time.sleep(0.02)
    c.execute("BEGIN", [], soon())
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        c.execute("LOCK TABLE s IN ACCESS EXCLUSIVE MODE", [], soon())
    took = time.monotonic() - started
    c.execute("ROLLBACK", [], soon())
    holder.join()
    # statement_timeout and lock_timeout are equal: either ends it.
    assert e.value.code == "timed-out", e.value.message
    assert "(57014)" in e.value.message or "(55P03)" in e.value.message, e.value.message
    assert 1.0 < took < 3.0, took
    # A transaction left idle is ended by the server too.
    c.execute("BEGIN", [], soon())
    time.sleep(2.5)
    with pytest.raises(DbError) as e:
        c.query("SELECT 1", [], soon())
    assert e.value.code == "unavailable", e.value.message
    c.close()


def test_a_transaction_left_open_is_rolled_back_not_handed_on(attack_db):
    root = attack_db.privileged_root()
    c = root.open(CENTRALIZED_DATABASE, soon())
    c.execute("CREATE TABLE t (i INTEGER)", [], soon())
    c.execute("BEGIN", [], soon())
    c.execute("INSERT INTO t VALUES (1)", [], soon())
    assert c.in_transaction
    c.close()
    d = root.open(CENTRALIZED_DATABASE, soon())
    assert d.query("SELECT count(*) FROM t", [], soon()) == [[0]]
    # Not inside the abandoned transaction: this commits by itself.
    d.execute("INSERT INTO t VALUES (2)", [], soon())
    e = root.open(CENTRALIZED_DATABASE, soon())
    assert e.query("SELECT count(*) FROM t", [], soon()) == [[1]]
    d.close()
    e.close()


class _Handle:
    """A guest's handle of a host resource, as wasmtime-py hands it over."""

    def __init__(self, rep: int):
        self.rep = rep

    def to_host(self, store):
        return types.SimpleNamespace(rep=self.rep)


def test_a_transaction_open_when_the_call_returns_is_rolled_back(tmp_path, pg_db):
    # The host functions as a driver call uses them, and the end of the
    # call as the host's call wrapper (`enter`) ends it.
    from image_cache_wasm.fs import RootFs

    (tmp_path / "root").mkdir()
    state = InstanceState(RootFs(tmp_path / "root", 1000), Limits(), False, databases=pg_db.root())
    execute, query = _db_statement("execute"), _db_statement("query")
    with enter(state):
        state.deadline = soon()
        handle = _db_open(None, CENTRALIZED_DATABASE)
        c = _Handle(handle.rep)
        assert execute(None, c, "BEGIN", []) == 0
        assert execute(None, c, "LOCK TABLE cached_images IN ACCESS EXCLUSIVE MODE", []) == 0
        # While the call runs, the lock holds.
        with pytest.raises(Exception, match="lock timeout"):
            pg_db.sql("SET lock_timeout = '200ms'; SELECT count(*) FROM cached_images")
    # The call returned: rolled back, the lock gone, the connection usable.
    assert pg_db.sql("SET lock_timeout = '2s'; SELECT count(*) FROM cached_images") == "0"
    with enter(state):
        state.deadline = soon()
        assert query(None, c, "SELECT count(*)::bigint FROM cached_images", []) == [[0]]
        # An instance holds at most 4 connections.
        more = [_db_open(None, CENTRALIZED_DATABASE) for _ in range(3)]
        refused = _db_open(None, CENTRALIZED_DATABASE)
        assert refused.code == "limit-exceeded", refused.message
        assert "at most 4 database connections" in refused.message
        # Errors come back as the interface's records.
        bad = query(None, c, "SELECT * FROM nowhere", [])
        assert bad.code == "other" and "(42P01)" in bad.message, bad.message
        assert all(hasattr(h, "rep") for h in more)
    state.close()
    assert state.connections == {}


def test_errors_never_show_the_password_or_the_host(attack_db):
    root = attack_db.privileged_root()
    c = root.open(CENTRALIZED_DATABASE, soon())
    for sql in [
        "SELECT * FROM no_such_table",
        f"SELECT '{PASSWORD}'::int",
        "INSERT INTO nowhere VALUES (1)",
    ]:
        with pytest.raises(DbError) as e:
            c.query(sql, [], soon())
        assert PASSWORD not in e.value.message, e.value.message
        assert "127.0.0.1" not in e.value.message, e.value.message
    with pytest.raises(DbError) as e:
        c.query("SELECT * FROM no_such_table", [], soon())
    # The message the centralized driver looks for "42P01" in.
    assert e.value.message == 'database "glance": ERROR (42P01): relation "no_such_table" does not exist'
    c.close()
    with pytest.raises(DbError) as e:
        root.open("not-configured", soon())
    assert e.value.code == "access-denied"
    # A wrong password: unavailable, and neither password shows.
    wrong = attack_db.root_with(DatabaseSettings(attack_db.url.replace(PASSWORD, "not-the-Pw-77")))
    with pytest.raises(DbError) as e:
        wrong.open(CENTRALIZED_DATABASE, soon())
    assert e.value.code == "unavailable", e.value.message
    assert "password authentication failed" in e.value.message, e.value.message
    assert "not-the-Pw-77" not in e.value.message and PASSWORD not in e.value.message
    assert str(attack_db.cluster.port) not in e.value.message, e.value.message


def test_rows_and_files_are_reconciled(tmp_path, pg_db, runtime):
    me = "http://reconcile:9292"
    root = tmp_path / "root"
    cache = node(root, pg_db.root(), me, runtime)
    put(cache, "a", b"aaaa")
    put(cache, "b", b"bb")
    # A file without a row: listed with no hits; its first read makes one.
    (root / "copied-in").write_bytes(b"xyz")
    # A row without a file (wiped by hand): not listed.
    (root / "b").unlink()
    assert ids(cache) == ["a", "copied-in"]
    assert cache.get_cached_nodes("b") == [me]
    assert cache.get_cached_nodes("copied-in") == []
    cache.read("copied-in")
    assert cache.get_hit_count("copied-in") == 1
    assert cache.get_cached_nodes("copied-in") == [me]
    # Cached again over its old row: the row keeps its hits, takes the size.
    (root / "copied-in").unlink()
    put(cache, "copied-in", b"wxyz")
    assert cache.get_hit_count("copied-in") == 1
    assert pg_db.sql("SELECT size FROM cached_images WHERE image_id = 'copied-in'") == "4"
    # clean drops rows whose files are gone (once they are settled).
    pg_db.sql("UPDATE cached_images SET last_modified = last_modified - interval '1 hour'")
    cache.clean(86_400)
    assert pg_db.sql("SELECT string_agg(image_id, ',' ORDER BY image_id) FROM cached_images") == "a,copied-in"
    # Ids longer than Glance's VARCHAR(36) are cached without a row.
    long = "l" * 100
    put(cache, long, b"long")
    assert cache.read(long) == b"long"
    assert cache.get_hit_count(long) == 0
    assert cache.get_cached_nodes(long) == []
    # A checksum is kept as Glance keeps it: MD5 hex.
    cache.cache(UUID_A, io.BytesIO(b"sum"), checksum="md5:" + __import__("hashlib").md5(b"sum").hexdigest())
    assert pg_db.sql(f"SELECT checksum FROM cached_images WHERE image_id = '{UUID_A}'") == (
        __import__("hashlib").md5(b"sum").hexdigest()
    )
    cache.close()


def test_hot_swap_sqlite_to_centralized_and_back_on_a_live_root(tmp_path, pg_db, runtime):
    me = "http://swap:9292"
    cache = ImageCache(tmp_path / "root", driver="sqlite", databases=pg_db.root(), runtime=runtime,
                       fallback_to_sqlite=False, options=[("worker_self_reference_url", me)])
    put(cache, UUID_A, image_bytes(1, 100))
    cache.read(UUID_A)
    cache.read(UUID_A)
    assert cache.get_hit_count(UUID_A) == 2
    # A write in flight across the swap.
    writer = cache.open_for_write("in-flight")
    writer.write(b"half")

    cache.swap_driver("centralized_db")
    assert cache.driver_name == "centralized"
    # The file carries over; the sqlite hits stay in cache.db.
    assert ids(cache) == [UUID_A]
    assert cache.get_hit_count(UUID_A) == 0
    writer.write(b" and the rest")
    writer.commit()
    put(cache, UUID_B, image_bytes(2, 200))
    cache.read(UUID_B)
    cache.read(UUID_A)
    assert cache.get_hit_count(UUID_A) == 1
    assert cache.get_cached_nodes(UUID_B) == [me]
    assert cache.get_cached_nodes(UUID_A) == [me]
    assert ids(cache) == [UUID_B, UUID_A, "in-flight"]

    cache.swap_driver("sqlite")
    assert ids(cache) == [UUID_B, UUID_A, "in-flight"]
    assert cache.get_hit_count(UUID_A) == 2
    with pytest.raises(Unsupported):
        cache.get_cached_nodes(UUID_A)
    cache.close()


def test_losing_the_database_mid_run_fails_calls_and_recovers_when_it_is_back(tmp_path, pg_cluster, artifacts):
    cluster = pg.local()
    db = cluster.database()
    runtime = Runtime(Limits(call_deadline=3.0), artifacts=artifacts)
    root = tmp_path / "root"
    cache = node(root, db.root(), "http://n:9292", runtime)
    put(cache, "kept", image_bytes(1, 2000))
    cache.read("kept")

    cluster.stop()
    try:
        started = time.monotonic()
        with pytest.raises((IoError, DatabaseError)) as e:
            put(cache, "new", image_bytes(2, 2000))
        # The commit could not record the image: the write is aborted.
        assert "glance" in str(e.value), str(e.value)
        assert PASSWORD not in str(e.value)
        assert time.monotonic() - started < 4
        with pytest.raises(DatabaseError) as e:
            cache.get_cached_images()
        assert "unavailable" in str(e.value) or "cannot" in str(e.value) or "glance" in str(e.value)
        with pytest.raises(DatabaseError):
            cache.get_cached_nodes("kept")
        with pytest.raises((DatabaseError, IoError)):
            cache.read("kept")  # the hit cannot be counted
        # No image file lost, none half-published.
        assert (root / "kept").exists()
        assert not (root / "new").exists()
        assert not (root / "incomplete" / "new").exists()
        assert cache.is_cached("kept")
    finally:
        cluster.start()
    # Back by itself: the pool drops the dead connections.
    deadline = time.monotonic() + 20
    while True:
        try:
            images = cache.get_cached_images()
            break
        except DatabaseError:
            assert time.monotonic() < deadline, "the driver did not recover"
            time.sleep(0.1)
    assert [(i["image_id"], i["hits"]) for i in images] == [("kept", 1)]
    put(cache, "new", image_bytes(2, 2000))
    cache.read("kept")
    assert cache.get_hit_count("kept") == 2
    assert ids(cache) == ["kept", "new"]

    # A server that stops answering (frozen, not gone): the call still ends
    # by its deadline.
    postmaster = cluster.postmaster_pid()
    children = [int(p) for p in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
    frozen = [postmaster] + children
    for pid in frozen:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises((DatabaseError, DriverFault)):
            cache.get_cached_images()
        took = time.monotonic() - started
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert took < 5, took
    deadline = time.monotonic() + 20
    while True:
        try:
            cache.get_cached_images()
            break
        except (DatabaseError, DriverFault):
            assert time.monotonic() < deadline, "no recovery after the freeze"
            time.sleep(0.1)
    cache.close()
    db.close()


def test_tls_is_verified_as_libpq_does(tmp_path, pg_db, runtime):
    ca = pg_db.cluster.tls_ca
    if ca is None:
        pytest.skip("an external server's TLS is not the tests' to set (or no openssl made a CA)")

    def open_(url: str) -> None:
        root = DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(url))
        try:
            root.open(CENTRALIZED_DATABASE, soon()).close()
        finally:
            root.close()

    url = pg_db.url

    def with_(params: str) -> str:
        return f"{url}{'&' if '?' in url else '?'}{params}"

    def localhost(params: str) -> str:
        return with_(params).replace("@127.0.0.1:", "@localhost:")

    # The default (prefer) and require: encrypted, as libpq.
    open_(url)
    open_(with_("sslmode=require"))
    # Without TLS the server refuses.
    with pytest.raises(DbError) as e:
        open_(with_("sslmode=disable"))
    assert PASSWORD not in e.value.message
    # verify-full: the CA and the name must match.
    open_(localhost(f"sslmode=verify-full&sslrootcert={ca}"))
    with pytest.raises(DbError) as e:
        open_(with_(f"sslmode=verify-full&sslrootcert={ca}"))
    assert PASSWORD not in e.value.message
    # verify-ca: the CA must match, any name.
    open_(with_(f"sslmode=verify-ca&sslrootcert={ca}"))
    # Another CA: refused, whatever the name.
    other = tmp_path / "other-ca.crt"
    import subprocess

    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(tmp_path / "other.key"), "-out", str(other), "-days", "1", "-subj", "/CN=other CA"],
        check=True, capture_output=True,
    )
    for bad in [
        localhost(f"sslmode=verify-full&sslrootcert={other}"),
        with_(f"sslmode=verify-ca&sslrootcert={other}"),
        # require with a root given checks the CA, as libpq.
        with_(f"sslmode=require&sslrootcert={other}"),
    ]:
        with pytest.raises(DbError):
            open_(bad)
    # What psycopg2 also accepts: SQLAlchemy's form, client_encoding.
    sqlalchemy = localhost(f"sslmode=verify-full&sslrootcert={ca}&client_encoding=utf8").replace(
        "postgresql://", "postgresql+psycopg2://"
    )
    open_(sqlalchemy)
    # A driver works over it.
    databases = DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(sqlalchemy))
    cache = node(tmp_path / "root", databases, "http://tls:9292", runtime)
    put(cache, "over-tls", b"bytes")
    assert cache.read("over-tls") == b"bytes"
    cache.close()
    databases.close()


def test_glance_configures_the_centralized_driver_from_its_database_connection(tmp_path, pg_db):
    if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") != "1":
        pytest.importorskip("glance.image_cache")
    from glance import image_cache as glance_image_cache
    from oslo_config import cfg

    from image_cache_wasm import glance as wasm_glance

    CONF = cfg.CONF
    wasm_glance.register_database_opts()
    sqlalchemy = pg_db.url.replace("postgresql://", "postgresql+psycopg2://")
    overrides = [
        ("image_cache_dir", str(tmp_path / "cache"), None),
        ("image_cache_sqlite_db", "cache.db", None),
        ("image_cache_stall_time", 86400, None),
        ("image_cache_max_size", 10 * 1024**3, None),
        ("image_cache_wasm_driver", "centralized_db", None),
        ("worker_self_reference_url", "http://glance-api-1:9292", None),
        ("connection", sqlalchemy, "database"),
        ("image_cache_database_pool_size", 2, None),
    ]
    for name, value, group in overrides:
        CONF.set_override(name, value, group)
    try:
        cache = glance_image_cache.ImageCache.__new__(glance_image_cache.ImageCache)
        wasm_glance.use_in(cache)
        assert isinstance(cache.driver, wasm_glance.Driver), "no fallback to Glance's own driver"
        assert cache.driver.cache.driver_name == "centralized"
        backend = cache.driver.cache.databases.backend(CENTRALIZED_DATABASE)
        assert backend.pool_size == 2
        data = [b"glance " * 100]
        assert list(cache.get_caching_iter(UUID_A, None, iter(data))) == data
        with cache.open_for_read(UUID_A) as f:
            assert f.read() == data[0]
        assert cache.get_hit_count(UUID_A) == 1
        assert cache.driver.get_cached_nodes(UUID_A) == ["http://glance-api-1:9292"]
        rows = pg_db.sql("SELECT image_id || ' ' || hits FROM cached_images")
        assert rows == f"{UUID_A} 1"
        cache.driver.cache.close()
        cache.driver.cache.databases.close()
        # The database down is not a configuration Glance may fall back
        # from: it raises.
        CONF.set_override("connection", sqlalchemy.replace(f":{pg_db.cluster.port}/", ":1/"), "database")
        failing = glance_image_cache.ImageCache.__new__(glance_image_cache.ImageCache)
        with pytest.raises(DatabaseError):
            wasm_glance.use_in(failing)
    finally:
        for name, _value, group in overrides:
            CONF.clear_override(name, group)


def test_the_database_import_needs_its_grant(tmp_path, pg_db, runtime):
    from image_cache_wasm import LoadError

    path = component("centralized_driver")
    with pytest.raises(LoadError) as e:
        ImageCache(tmp_path / "root", driver=path, grants=["xattr"], databases=pg_db.root(), runtime=runtime,
                   fallback_to_sqlite=False, options=[("worker_self_reference_url", "http://n:9292")])
    assert "image-cache:driver/database@0.3.0, which it was not granted (granted: fs, clock, xattr)" in str(e.value)
    # Granted by the operator, as a plugin: it runs.
    cache = ImageCache(tmp_path / "root", driver=path, grants=["database"], databases=pg_db.root(), runtime=runtime,
                       fallback_to_sqlite=False, options=[("worker_self_reference_url", "http://n:9292")])
    put(cache, UUID_A, b"plugin")
    assert cache.get_cached_nodes(UUID_A) == ["http://n:9292"]
    cache.close()


def test_glance_database_options_map_as_the_rust_cli_does():
    if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") != "1":
        pytest.importorskip("glance.image_cache")
    from oslo_config import cfg

    from image_cache_wasm import glance as wasm_glance

    CONF = cfg.CONF
    wasm_glance.register_database_opts()
    assert wasm_glance.parse_duration("30") == 30
    assert wasm_glance.parse_duration("2.5") == 2.5
    assert wasm_glance.parse_duration("1m30s") == 90
    assert wasm_glance.parse_duration("1h") == 3600
    with pytest.raises(ValueError):
        wasm_glance.parse_duration("soon")
    names = [
        ("connection", "database"),
        ("max_pool_size", "database"),
        ("image_cache_database_url", None),
        ("image_cache_database_pool_size", None),
        ("image_cache_database_statement_timeout", None),
        ("image_cache_database_allow_privileged_role", None),
    ]
    try:
        assert wasm_glance.database_settings() is None, "no database configured"
        CONF.set_override("connection", "postgresql+psycopg2://glance:pw@db/glance", "database")
        s = wasm_glance.database_settings()
        assert s.url == "postgresql+psycopg2://glance:pw@db/glance"
        assert s.pool_size == 4, "oslo.db's default max_pool_size is not one the operator set"
        assert s.statement_timeout is None and s.connect_timeout == 10 and not s.allow_privileged_role
        CONF.set_override("max_pool_size", 3, "database")
        assert wasm_glance.database_settings().pool_size == 3
        # Our own options win.
        CONF.set_override("image_cache_database_url", "postgresql://image_cache:pw@db/glance")
        CONF.set_override("image_cache_database_pool_size", 2)
        CONF.set_override("image_cache_database_statement_timeout", "5s")
        CONF.set_override("image_cache_database_allow_privileged_role", True)
        s = wasm_glance.database_settings()
        assert (s.url, s.pool_size, s.statement_timeout, s.allow_privileged_role) == (
            "postgresql://image_cache:pw@db/glance", 2, 5.0, True
        )
        assert "pw" not in repr(s)
    finally:
        for name, group in names:
            CONF.clear_override(name, group)
