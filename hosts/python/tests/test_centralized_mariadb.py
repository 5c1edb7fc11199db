"""The centralized driver on a real MariaDB (tests/mariadb.py), in the Python
host: Glance's tables and semantics on MySQL, the account fence, the
statement check as MySQL reads SQL, values escaped by PyMySQL as the
session reads them, deadlines that end the server's query, TLS as PyMySQL
and mysqlclient mean it, and outages. The counterpart of the Rust suite's
``tests/centralized/mariadb.rs``. (The conformance scenarios run on it
too: test_scenarios.py.)"""

from __future__ import annotations

import io
import os
import signal
import threading
import time
from pathlib import Path

import pytest

import mariadb
from conftest import component
from image_cache_wasm import (
    CENTRALIZED_DATABASE,
    BadConfiguration,
    CacheError,
    DatabaseError,
    DatabaseRoot,
    DatabaseSettings,
    DbError,
    DriverFault,
    ImageCache,
    IoError,
    Limits,
    Runtime,
)
from image_cache_wasm.mysql import MysqlBackend
from image_cache_wasm.runtime import InstanceState, _db_open, _db_statement, enter
from mariadb import PASSWORD
from test_centralized import UUID_A, UUID_B, _Handle, ids, image_bytes, node, put, soon, within


@pytest.fixture(autouse=True)
def _built():
    component("centralized_driver")


def open_(url: str, **settings):
    """Open and give back one connection of ``url`` (raises DbError)."""
    root = DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(url, **settings))
    try:
        root.open(CENTRALIZED_DATABASE, soon()).close()
    finally:
        root.close()


def test_two_nodes_share_one_mariadb_database_as_glance_does(tmp_path, maria_db, runtime):
    databases = maria_db.root()
    assert isinstance(databases.backend(CENTRALIZED_DATABASE), MysqlBackend)
    a = node(tmp_path / "a", databases, "http://a:9292", runtime)
    b = node(tmp_path / "b", databases, "http://b:9292", runtime)
    put(a, UUID_A, image_bytes(1, 3000))
    assert b.get_cached_nodes(UUID_A) == ["http://a:9292"]
    assert not b.is_cached(UUID_A), "files are per node"
    put(b, UUID_A, image_bytes(1, 3000))
    put(b, UUID_B, image_bytes(2, 10))
    a.read(UUID_A)
    a.read(UUID_A)
    assert a.get_hit_count(UUID_A) == 2
    assert b.get_hit_count(UUID_A) == 0
    assert a.get_cached_nodes(UUID_A) == ["http://a:9292", "http://b:9292"]
    # Times are naive UTC, as Glance writes them, in whole seconds.
    assert maria_db.sql(
        "SELECT ABS(TIMESTAMPDIFF(SECOND, last_modified, UTC_TIMESTAMP())) < 60, size, hits, checksum IS NULL "
        "FROM cached_images c JOIN node_reference n USING (node_reference_id) "
        f"WHERE image_id = '{UUID_A}' AND node_reference_url = 'http://a:9292'"
    ) == "1\t3000\t2\t1"
    # Prune and delete act on this node's rows only.
    report = a.prune(0)
    assert len(report["removed"]) == 1
    assert b.get_cached_nodes(UUID_A) == ["http://b:9292"]
    assert ids(b) == [UUID_B, UUID_A]
    assert b.delete_all_cached_images() == 2
    assert maria_db.sql("SELECT count(*) FROM cached_images") == "0"
    assert maria_db.sql("SELECT count(*) FROM node_reference") == "2"
    a.close()
    b.close()


def test_hits_from_many_threads_are_all_counted(tmp_path, maria_db, runtime):
    cache = node(tmp_path / "root", maria_db.root(), "http://n:9292", runtime)
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
    live, most = cache.databases.backend(CENTRALIZED_DATABASE).pool_status()
    assert most == 4 and 1 <= live <= 4
    cache.close()


def test_glance_rows_are_read_and_a_missing_table_names_glance_manage(tmp_path, maria_server, runtime):
    glance = maria_server.database()
    # Glance's API node cached an image (naive UTC times).
    glance.sql(
        "INSERT INTO node_reference (node_reference_url) VALUES ('http://glance-api:9292'), ('http://us:9292'); "
        "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, checksum, node_reference_id) "
        f"SELECT '{UUID_A}', '2024-01-01 00:00:00', '2023-12-31 00:00:00', 5, 7, "
        "'d41d8cd98f00b204e9800998ecf8427e', node_reference_id FROM node_reference"
    )
    root = tmp_path / "us"
    root.mkdir()
    (root / UUID_A).write_bytes(b"12345")
    cache = node(root, glance.root(), "http://us:9292", runtime)
    images = cache.get_cached_images()
    assert len(images) == 1
    assert images[0]["hits"] == 7
    assert images[0]["last_accessed"] == 1_704_067_200.0
    assert images[0]["last_modified"] == 1_703_980_800.0
    assert cache.get_cached_nodes(UUID_A) == ["http://glance-api:9292", "http://us:9292"]
    cache.cache(UUID_B, io.BytesIO(b"hello"), checksum="md5:5d41402abc4b2a76b9719d911017c592")
    assert glance.sql(
        "SELECT hits, size, checksum FROM cached_images c JOIN node_reference n USING (node_reference_id) "
        f"WHERE image_id = '{UUID_B}' AND node_reference_url = 'http://us:9292'"
    ) == "0\t5\t5d41402abc4b2a76b9719d911017c592"
    cache.close()
    glance.close()

    # Without the tables: refused, naming Glance's migrations; nothing made.
    # (As the administrator: a fenced account cannot be granted tables that
    # do not exist.)
    bare = maria_server.bare_database()
    with pytest.raises(BadConfiguration) as e:
        node(tmp_path / "fresh", bare.privileged_root(), "http://fresh:9292", runtime)
    message = str(e.value)
    assert "glance-manage db sync" in message and "image-cache db init" in message, message
    assert PASSWORD not in message
    assert bare.sql(f"SELECT count(*) FROM information_schema.tables WHERE table_schema = '{bare.name}'") == "0"
    bare.close()


def test_an_account_with_more_than_the_cache_tables_is_refused_with_the_grants_to_run(tmp_path, maria_db, runtime):
    db = maria_db
    db.sql(f"GRANT CREATE, DROP ON {db.name}.* TO '{db.name}'@'%'")
    with pytest.raises(BadConfiguration) as e:
        node(tmp_path / "root", db.root(), "http://n:9292", runtime)
    message = str(e.value)
    assert f"holds CREATE on {db.name}.*" in message, message
    assert "image-cache db grants --mysql" in message and "GRANT SELECT, INSERT, UPDATE, DELETE ON" in message, message
    assert PASSWORD not in message
    # The administrator's account (every privilege): refused too, unless
    # the operator allows it.
    admin = db.root_with(DatabaseSettings(db.admin_url))
    with pytest.raises(DbError) as e:
        admin.open(CENTRALIZED_DATABASE, soon())
    assert e.value.code == "access-denied", e.value.message
    assert "on *.*" in e.value.message, e.value.message
    # Refused once, refused again without asking the server.
    with pytest.raises(DbError) as e:
        admin.open(CENTRALIZED_DATABASE, soon())
    assert "on *.*" in e.value.message
    db.privileged_root().open(CENTRALIZED_DATABASE, soon()).close()
    # An account granted another database's cache tables too is refused:
    # MySQL's accounts are server-wide.
    other = db.server.database()
    other.grant_cache_privileges(db.name)
    db.sql(f"REVOKE CREATE, DROP ON {db.name}.* FROM '{db.name}'@'%'")
    with pytest.raises(DbError) as e:
        db.root().open(CENTRALIZED_DATABASE, soon())
    assert f"holds SELECT on {other.name}." in e.value.message, e.value.message
    other.close()


def test_mysql_statements_that_reach_beyond_the_tables_are_refused(maria_db):
    target = Path("/tmp/image-cache-py-pwned")
    c = maria_db.privileged_root().open(CENTRALIZED_DATABASE, soon())
    assert c.dialect == "mysql"
    for sql in [
        "SELECT LOAD_FILE('/etc/passwd')",
        "SELECT `load_file`('/etc/passwd')",
        f"SELECT 1 INTO OUTFILE '{target}'",
        "SELECT @@datadir",
        "SELECT @@hostname",
        "SELECT 1 /*!50000 , LOAD_FILE('/etc/passwd') */",
        "SELECT 1 /*M! , @@version */",
        "SELECT 1--1",
        "SELECT 1 # , LOAD_FILE('/etc/passwd')",
        "SELECT * FROM mysql.user",
        "SELECT * FROM information_schema.processlist",
        "SELECT * FROM performance_schema.threads",
        "SELECT CONNECTION_ID()",
        "SELECT UUID()",
        "SELECT DATABASE()",
        "SELECT CURRENT_USER()",
        "SELECT GET_LOCK('x', 1)",
        "SET SESSION max_statement_time = 0",
        "SET STATEMENT max_statement_time = 0 FOR SELECT SLEEP(1)",
        "SHOW GRANTS",
        "KILL QUERY 1",
        "LOAD DATA INFILE '/etc/passwd' INTO TABLE cached_images",
        "SELECT 1; DROP TABLE cached_images",
        "CREATE USER evil",
        "GRANT ALL ON *.* TO evil",
    ]:
        for method in (c.query, c.execute):
            with pytest.raises(DbError) as e:
                method(sql, [], soon())
            assert e.value.code == "access-denied", f"{sql}: {e.value.message}"
    assert not target.exists()
    # Strings are read as the check reads them: a backslash escapes nothing
    # (NO_BACKSLASH_ESCAPES), "..." names a column (ANSI_QUOTES).
    assert c.query("SELECT 'a\\', 'b'", [], soon()) == [["a\\", "b"]]
    assert c.query('SELECT "size" FROM cached_images', [], soon()) == []
    c.close()
    # The fenced account: what passes the check, the server refuses.
    f = maria_db.root().open(CENTRALIZED_DATABASE, soon())
    for sql in [
        "CREATE TABLE t (a INT)",
        "CREATE INDEX i ON cached_images (size)",
        "LOCK TABLES cached_images WRITE",
    ]:
        with pytest.raises(DbError) as e:
            f.execute(sql, [], soon())
        assert e.value.code == "access-denied", f"{sql}: {e.value.message}"
    f.close()


def test_values_and_results_keep_their_types_and_bounds(maria_db):
    root = maria_db.privileged_root()
    c = root.open(CENTRALIZED_DATABASE, soon())
    row = c.query(
        "SELECT ?, ?, ?, ?, CAST(? AS BINARY), CAST(1.25 AS DECIMAL(5,2)), FROM_UNIXTIME(FLOOR(?)), NULL, "
        "CAST(18446744073709551615 AS UNSIGNED) < 1",
        [(1 << 63) - 1, 0.5, "é", True, b"\x00\xff", 1_704_067_200.9],
        soon(),
    )[0]
    assert row == [(1 << 63) - 1, 0.5, "é", 1, b"\x00\xff", 1.25, 1_704_067_200.0, None, 0], row
    assert type(row[1]) is float and type(row[5]) is float and type(row[6]) is float
    assert c.query("SELECT ?, ?, -?, 1-?", [-(1 << 63), False, -5, -1], soon()) == [[-(1 << 63), 0, 5, 2]]
    # DATETIME, TIMESTAMP and DATE are Unix seconds, read as UTC.
    assert c.query(
        "SELECT CAST('2026-12-07 09:30:00.5' AS DATETIME(1)), DATE('2024-01-01'), "
        "CAST('2024-01-01 00:00:01' AS DATETIME)", [], soon()
    ) == [[1_796_635_800.5, 1_704_067_200.0, 1_704_067_201.0]]
    for sql, says in [
        ("SELECT CAST(18446744073709551615 AS UNSIGNED)", "does not fit in a signed 64-bit integer"),
        ("SELECT CAST('10:00' AS TIME)", "cast it"),
    ]:
        with pytest.raises(DbError) as e:
            c.query(sql, [], soon())
        assert e.value.code == "other" and says in e.value.message, e.value.message
        assert c.query("SELECT 1", [], soon()) == [[1]], "the connection goes on"
    with pytest.raises(DbError) as e:
        c.query("SELECT ?", [], soon())
    assert "1 parameters, 0 values" in e.value.message, e.value.message
    for bad in (float("nan"), float("inf")):
        with pytest.raises(DbError) as e:
            c.query("SELECT ?", [bad], soon())
        assert e.value.code == "other" and "parameter 1" in e.value.message, e.value.message
    c.close()
    # A result over the cap is refused, and the connection goes on.
    small = maria_db.privileged_root(max_result_bytes=10_000)
    c = small.open(CENTRALIZED_DATABASE, soon())
    with pytest.raises(DbError) as e:
        c.query("SELECT REPEAT('x', 20000)", [], soon())
    assert e.value.code == "limit-exceeded", e.value.message
    with pytest.raises(DbError) as e:
        c.query("SELECT REPEAT('x', 1000) FROM cached_images RIGHT JOIN (SELECT 1 UNION SELECT 2 UNION SELECT 3 "
                "UNION SELECT 4 UNION SELECT 5 UNION SELECT 6 UNION SELECT 7 UNION SELECT 8 UNION SELECT 9 "
                "UNION SELECT 10 UNION SELECT 11) AS n ON FALSE", [], soon())
    assert e.value.code == "limit-exceeded", e.value.message
    assert c.query("SELECT 1", [], soon()) == [[1]]
    c.close()
    # Constraint violations say so; rows changed are counted (matched, as
    # Glance's PyMySQL with FOUND_ROWS); a SELECT through execute counts
    # its rows.
    f = maria_db.root().open(CENTRALIZED_DATABASE, soon())
    with pytest.raises(DbError) as e:
        f.execute(
            "INSERT INTO cached_images (image_id, last_accessed, last_modified, size, hits, node_reference_id) "
            "VALUES ('x', NOW(), NOW(), 1, 0, 999)", [], soon(),
        )
    assert e.value.code == "constraint" and "(23000)" in e.value.message, e.value.message
    assert f.execute("INSERT INTO node_reference (node_reference_url) VALUES (?), (?)", ["a", "b"], soon()) == 2
    assert f.execute("UPDATE node_reference SET node_reference_url = node_reference_url", [], soon()) == 2
    assert f.execute("SELECT * FROM node_reference", [], soon()) == 2
    f.close()


def test_values_are_escaped_by_pymysql_as_the_session_reads_them(maria_db):
    c = maria_db.root().open(CENTRALIZED_DATABASE, soon())
    assert c.session.conn.server_status & 512, "NO_BACKSLASH_ESCAPES is in the server's status"
    tricky = [
        "a\\'b",
        "\\",
        "'; DROP TABLE cached_images; -- ",
        "it''s \\' \\\\ \" ` ? %s %% $1",
        "line\nbreak\ttab\r\x00nul \x1a",
        "é ☃",
    ]
    for value in tricky:
        assert c.query("SELECT ?", [value], soon()) == [[value]], value
        assert c.execute("INSERT INTO node_reference (node_reference_url) VALUES (?)", [value], soon()) == 1
        rows = c.query("SELECT node_reference_url FROM node_reference WHERE node_reference_url = ?", [value], soon())
        assert rows == [[value]], value
    assert int(maria_db.sql("SELECT count(*) FROM node_reference")) == len(tricky)
    assert maria_db.sql("SELECT count(*) FROM cached_images") == "0"
    # A `?` in a string or a quoted name is not a placeholder; `%` is text.
    assert c.query("SELECT '?', ?, '%s' AS \"a?\"", ["x"], soon()) == [["?", "x", "%s"]]
    assert c.query("SELECT `node_reference_url` AS `?` FROM node_reference WHERE node_reference_url = ?",
                   ["é ☃"], soon()) == [["é ☃"]]
    # Four-byte UTF-8 goes as utf8mb4 (Glance's utf8 tables cannot hold it:
    # the server says so).
    assert c.query("SELECT ?", ["🐘"], soon()) == [["🐘"]]
    with pytest.raises(DbError) as e:
        c.execute("INSERT INTO node_reference (node_reference_url) VALUES (?)", ["🐘"], soon())
    assert "(22007)" in e.value.message, e.value.message
    blob = bytes(range(256))
    assert c.query("SELECT CAST(? AS BINARY), LENGTH(?)", [blob, blob], soon()) == [[blob, 256]]
    c.close()


def test_a_statement_past_its_deadline_is_ended_on_the_server(maria_db):
    root = maria_db.privileged_root()
    c = root.open(CENTRALIZED_DATABASE, soon())
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        c.query("SELECT SLEEP(30)", [], within(1))
    assert e.value.code == "timed-out", e.value.message
    assert time.monotonic() - started < 3
    # KILL QUERY ends it on the server, well before its 30 s.
    deadline = time.monotonic() + 10
    while maria_db.server.admin_sql(
        None, "SELECT count(*) FROM information_schema.processlist WHERE info LIKE 'SELECT SLEEP(30)%'"
    ) != "0":
        assert time.monotonic() < deadline, "the query still runs on the server"
        time.sleep(0.1)
    # The connection that was cut is not handed on.
    with pytest.raises(DbError) as e:
        c.query("SELECT 1", [], soon())
    assert e.value.code == "unavailable" and "open a new one" in e.value.message
    c.close()
    c = root.open(CENTRALIZED_DATABASE, soon())
    assert c.query("SELECT 1", [], soon()) == [[1]]
    c.close()
    # The pool's size bounds the connections: a third waits, then gives up
    # at its deadline.
    bounded = maria_db.privileged_root(pool_size=2)
    a = bounded.open(CENTRALIZED_DATABASE, soon())
    b = bounded.open(CENTRALIZED_DATABASE, soon())
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        bounded.open(CENTRALIZED_DATABASE, within(0.3))
    assert e.value.code == "timed-out", e.value.message
    assert time.monotonic() - started < 1
    a.close()
    bounded.open(CENTRALIZED_DATABASE, soon()).close()
    b.close()
    assert bounded.backend(CENTRALIZED_DATABASE).pool_status() == (2, 2)
    # A transaction left open is rolled back when the connection goes.
    f = maria_db.root().open(CENTRALIZED_DATABASE, soon())
    f.execute("BEGIN", [], soon())
    f.execute("INSERT INTO node_reference (node_reference_url) VALUES ('http://left-open')", [], soon())
    assert f.in_transaction
    f.close()
    deadline = time.monotonic() + 5
    while maria_db.sql("SELECT count(*) FROM node_reference") != "0":
        assert time.monotonic() < deadline, "rows of a dropped transaction"
        time.sleep(0.05)


def test_the_session_limits_are_the_call_deadline(tmp_path, maria_db, artifacts):
    # max_statement_time, the lock waits and idle_transaction_timeout are
    # set at connect from the call deadline (1.5 s here).
    runtime = Runtime(Limits(call_deadline=1.5), artifacts=artifacts)
    root = maria_db.privileged_root()
    ImageCache(tmp_path / "root", databases=root, runtime=runtime).close()  # adopts 1.5 s
    assert root.backend(CENTRALIZED_DATABASE).statement_timeout == 1.5
    c = root.open(CENTRALIZED_DATABASE, soon())
    # The server ends a statement at 1.5 s though the host would wait 10.
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        c.query("SELECT SLEEP(5)", [], soon())
    took = time.monotonic() - started
    assert e.value.code == "timed-out" and "(70100)" in e.value.message, e.value.message
    assert 1.0 < took < 3.0, took
    assert c.query("SELECT 1", [], soon()) == [[1]]
    # A lock wait is ended by the server (innodb_lock_wait_timeout: 1 s).
    holder = threading.Thread(
        target=maria_db.sql,
        args=("BEGIN; SELECT * FROM node_reference FOR UPDATE; SELECT SLEEP(4); COMMIT",),
    )
    maria_db.sql("INSERT INTO node_reference (node_reference_url) VALUES ('locked')")
    holder.start()
    time.sleep(0.5)
    started = time.monotonic()
    with pytest.raises(DbError) as e:
        c.execute("UPDATE node_reference SET node_reference_url = 'x'", [], soon())
    took = time.monotonic() - started
    holder.join()
    assert e.value.code == "timed-out", e.value.message
    assert took < 3.0, took
    # A transaction left idle is ended by the server too.
    c.execute("BEGIN", [], soon())
    time.sleep(2.5)
    with pytest.raises(DbError) as e:
        c.query("SELECT 1", [], soon())
    assert e.value.code == "unavailable", e.value.message
    c.close()


def test_a_transaction_open_when_the_call_returns_is_rolled_back(tmp_path, maria_db):
    from image_cache_wasm.fs import RootFs

    (tmp_path / "root").mkdir()
    state = InstanceState(RootFs(tmp_path / "root", 1000), Limits(), False, databases=maria_db.root())
    execute, query = _db_statement("execute"), _db_statement("query")
    with enter(state):
        state.deadline = soon()
        c = _Handle(_db_open(None, CENTRALIZED_DATABASE).rep)
        assert execute(None, c, "BEGIN", []) == 0
        assert execute(None, c, "INSERT INTO node_reference (node_reference_url) VALUES (?)", ["mid-call"]) == 1
        assert query(None, c, "SELECT count(*) FROM node_reference", []) == [[1]]
    # The call returned: rolled back, the connection usable.
    assert maria_db.sql("SELECT count(*) FROM node_reference") == "0"
    with enter(state):
        state.deadline = soon()
        assert query(None, c, "SELECT count(*) FROM node_reference", []) == [[0]]
        bad = query(None, c, "SELECT * FROM node_reference WHERE no_such_column = 1", [])
        assert bad.code == "other" and "(42S22)" in bad.message, bad.message
    state.close()
    assert state.connections == {}


def test_errors_never_show_the_password_and_name_the_sqlstate(maria_db):
    c = maria_db.privileged_root().open(CENTRALIZED_DATABASE, soon())
    with pytest.raises(DbError) as e:
        c.query("SELECT * FROM no_such_table", [], soon())
    # The message the centralized driver looks for "42S02" in.
    assert e.value.message == (
        f'database "glance": ERROR 1146 (42S02): Table \'{maria_db.name}.no_such_table\' doesn\'t exist'
    )
    with pytest.raises(DbError) as e:
        c.query(f"SELECT '{PASSWORD}' + ", [], soon())
    assert PASSWORD not in e.value.message and "(42000)" in e.value.message, e.value.message
    c.close()
    wrong = maria_db.root_with(DatabaseSettings(maria_db.url.replace(PASSWORD, "not-the-Pw-77")))
    with pytest.raises(DbError) as e:
        wrong.open(CENTRALIZED_DATABASE, soon())
    assert e.value.code == "unavailable" and "(28000)" in e.value.message, e.value.message
    assert "not-the-Pw-77" not in e.value.message and "127.0.0.1" not in e.value.message
    # URLs that cannot be used are refused before connecting, never shown.
    for bad, says in [
        ("?ssl_mode=PREFERRED", "PREFERRED is not supported"),
        ("?ssl_mode=sometimes", "is not one of"),
        ("?sslmode=require", "does not know"),
        ("?charset=latin1", "host speaks utf8mb4"),
        ("?ssl_cert=/c.pem", "go together"),
        ("?ssl_ca=/ca.pem&ssl_mode=DISABLED", "TLS is disabled"),
        ("?connect_timeout=soon", "connect_timeout"),
    ]:
        url = maria_db.url.split("?")[0] + bad
        with pytest.raises(ValueError) as e:
            DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(url))
        assert says in str(e.value) and PASSWORD not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        DatabaseRoot().with_database(
            CENTRALIZED_DATABASE, DatabaseSettings(f"mysql+pymysql://u:{PASSWORD}@h:notaport/d")
        )
    assert PASSWORD not in str(e.value)
    with pytest.raises(ValueError) as e:
        DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(f"mysql://u:{PASSWORD}@h/"))
    assert "names no database" in str(e.value) and PASSWORD not in str(e.value)


def test_tls_is_required_by_the_server_and_verified_as_pymysql_does(tmp_path, maria_db, runtime):
    ca = maria_db.server.tls_ca
    if ca is None:
        pytest.skip("an external MariaDB's TLS is its own")
    plain = maria_db.url.replace("?ssl_mode=REQUIRED", "")
    by_name = plain.replace("127.0.0.1", "localhost")
    # The server takes no plain TCP connection.
    with pytest.raises(DbError) as e:
        open_(plain)
    assert e.value.code == "unavailable", e.value.message
    assert PASSWORD not in e.value.message
    # PyMySQL's ssl_ca verifies the chain and the name: the certificate is
    # for localhost, not 127.0.0.1.
    with pytest.raises(DbError) as e:
        open_(f"{plain}?ssl_ca={ca}")
    assert e.value.code == "unavailable" and "CERTIFICATE_VERIFY_FAILED" in e.value.message, e.value.message
    open_(f"{by_name}?ssl_ca={ca}")
    open_(f"{by_name}?ssl_mode=VERIFY_IDENTITY&ssl_ca={ca}")
    with pytest.raises(DbError) as e:
        open_(f"{plain}?ssl_mode=VERIFY_IDENTITY&ssl_ca={ca}")
    assert e.value.code == "unavailable", e.value.message
    # The chain without the name (unlike the Rust host, supported here):
    # 127.0.0.1 is fine, another CA is not.
    open_(f"{plain}?ssl_ca={ca}&ssl_check_hostname=false")
    open_(f"{plain}?ssl_mode=VERIFY_CA&ssl_ca={ca}")
    # Encrypted without verifying, as asked.
    open_(f"{plain}?ssl_ca={ca}&ssl_verify_cert=false")
    open_(f"{plain}?ssl_mode=REQUIRED")
    # Another CA: refused whatever the name, and whatever the check.
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = mariadb.make_ca(other_dir, "another CA")
    for url in [
        f"{by_name}?ssl_ca={other}",
        f"{plain}?ssl_ca={other}&ssl_check_hostname=false",
        f"{plain}?ssl_mode=VERIFY_CA&ssl_ca={other}",
        # No CA given: the system's, which do not know ours.
        f"{by_name}?ssl_mode=VERIFY_IDENTITY",
    ]:
        with pytest.raises(DbError) as e:
            open_(url)
        assert e.value.code == "unavailable", e.value.message
    # A cache over verified TLS.
    databases = DatabaseRoot().with_database(CENTRALIZED_DATABASE, DatabaseSettings(f"{by_name}?ssl_ca={ca}"))
    cache = node(tmp_path / "root", databases, "http://tls:9292", runtime)
    put(cache, UUID_A, b"over tls")
    assert cache.read(UUID_A) == b"over tls"
    cache.close()
    databases.close()


def test_losing_mariadb_mid_run_fails_calls_and_recovers_when_it_is_back(tmp_path, maria_server, artifacts):
    if not maria_server.is_local:
        pytest.skip("an external MariaDB is not ours to stop")
    db = maria_server.database()
    runtime = Runtime(Limits(call_deadline=3.0), artifacts=artifacts)
    root = tmp_path / "root"
    cache = node(root, db.root(), "http://n:9292", runtime)
    put(cache, "kept", image_bytes(1, 2000))
    cache.read("kept")
    maria_server.stop()
    try:
        started = time.monotonic()
        with pytest.raises((IoError, DatabaseError)) as e:
            put(cache, "new", image_bytes(2, 2000))
        assert PASSWORD not in str(e.value)
        assert time.monotonic() - started < 5
        with pytest.raises(DatabaseError):
            cache.get_cached_images()
        assert cache.is_cached("kept")
        assert not (root / "new").exists()
    finally:
        maria_server.start()
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
    assert ids(cache) == ["kept", "new"]

    # A server that stops answering (frozen, not gone): the call still ends
    # by its deadline, and the driver recovers when it answers again.
    pid = maria_server.child.pid
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises((DatabaseError, DriverFault)):
            cache.get_cached_images()
        took = time.monotonic() - started
    finally:
        os.kill(pid, signal.SIGCONT)
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


def test_prune_with_a_locked_mariadb_row_loses_no_bookkeeping(tmp_path, maria_db, artifacts):
    runtime = Runtime(Limits(call_deadline=3.0), artifacts=artifacts)
    root = tmp_path / "root"
    cache = node(root, maria_db.root(), "http://prune:9292", runtime)
    for i in range(250):
        put(cache, f"p-{i:03}", b"x")
    # Whole seconds: LRU ties are broken by id, which is caching order.
    locker = threading.Thread(
        target=maria_db.sql,
        args=("BEGIN; SELECT 1 FROM cached_images WHERE image_id = 'p-150' FOR UPDATE; SELECT SLEEP(8); COMMIT;",),
    )
    locker.start()
    time.sleep(1.5)
    try:
        report = cache.prune(0)
    except CacheError as e:  # stopped at its deadline
        report = e
    locker.join()
    if isinstance(report, dict):
        assert len(report["removed"]) == 100, report["failures"]
        assert report["failures"]
    files = sorted(p.name for p in root.iterdir() if p.is_file() and p.name.startswith("p-"))
    assert len(files) == 150, report
    assert ids(cache) == files, "rows and files agree"
    assert maria_db.sql("SELECT count(*) FROM cached_images") == "150"
    assert files[0] == "p-100"
    cache.close()


def test_six_nodes_starting_at_once_on_mariadb_all_start(tmp_path, maria_server, runtime):
    for round in range(2):
        db = maria_server.database()
        databases = db.root()
        failures = []

        def start(i: int) -> None:
            try:
                cache = node(tmp_path / f"{round}-{i}", databases, f"http://n{i}:9292", runtime)
                put(cache, UUID_A, b"x")
                cache.close()
            except Exception as e:  # reported below
                failures.append(e)

        threads = [threading.Thread(target=start, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, f"round {round}: {failures[0]!r}"
        assert db.sql("SELECT count(*) FROM node_reference") == "6"
        assert db.sql("SELECT count(*) FROM cached_images") == "6"
        db.close()


def test_glance_configures_the_centralized_driver_from_a_mysql_connection(tmp_path, maria_db):
    if os.environ.get("IMAGE_CACHE_REQUIRE_GLANCE") != "1":
        pytest.importorskip("glance.image_cache")
    from glance import image_cache as glance_image_cache
    from oslo_config import cfg

    from image_cache_wasm import glance as wasm_glance

    CONF = cfg.CONF
    wasm_glance.register_database_opts()
    overrides = [
        ("image_cache_dir", str(tmp_path / "cache"), None),
        ("image_cache_sqlite_db", "cache.db", None),
        ("image_cache_stall_time", 86400, None),
        ("image_cache_max_size", 10 * 1024**3, None),
        ("image_cache_wasm_driver", "centralized_db", None),
        ("worker_self_reference_url", "http://glance-api-1:9292", None),
        ("connection", maria_db.url, "database"),
    ]
    for name, value, group in overrides:
        CONF.set_override(name, value, group)
    try:
        cache = glance_image_cache.ImageCache.__new__(glance_image_cache.ImageCache)
        wasm_glance.use_in(cache)
        assert isinstance(cache.driver, wasm_glance.Driver), "no fallback to Glance's own driver"
        assert cache.driver.cache.driver_name == "centralized"
        assert isinstance(cache.driver.cache.databases.backend(CENTRALIZED_DATABASE), MysqlBackend)
        data = [b"glance " * 100]
        assert list(cache.get_caching_iter(UUID_A, None, iter(data))) == data
        with cache.open_for_read(UUID_A) as f:
            assert f.read() == data[0]
        assert cache.get_hit_count(UUID_A) == 1
        assert cache.driver.get_cached_nodes(UUID_A) == ["http://glance-api-1:9292"]
        assert maria_db.sql("SELECT CONCAT(image_id, ' ', hits) FROM cached_images") == f"{UUID_A} 1"
        cache.driver.cache.close()
        cache.driver.cache.databases.close()
    finally:
        for name, _value, group in overrides:
            CONF.clear_override(name, group)
