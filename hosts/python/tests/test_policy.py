"""The statement check (image_cache_wasm/policy.py) and the PostgreSQL
backend's pure parts, without a server: the same strings as the Rust host's
``host/src/database/policy.rs`` and ``postgres.rs`` unit tests."""

from __future__ import annotations

import math
import struct

import pytest

from image_cache_wasm import DatabaseRoot, DatabaseSettings, DbError
from image_cache_wasm import postgres
from image_cache_wasm.policy import PolicyError, check, first_word

#: What the centralized driver runs, and harmless look-alikes.
ALLOWED = [
    "SELECT hits FROM cached_images WHERE image_id = $1 AND node_reference_id = $2",
    "INSERT INTO cached_images (image_id) VALUES ($1) ON CONFLICT (image_id, node_reference_id) DO UPDATE SET hits = 0",
    "UPDATE cached_images SET hits = hits + 1 WHERE id = $1;",
    "DELETE FROM cached_images WHERE node_reference_id = $1",
    "CREATE TABLE IF NOT EXISTS node_reference (node_reference_id BIGSERIAL NOT NULL)",
    "CREATE UNIQUE INDEX IF NOT EXISTS x ON t (a)",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "WITH n AS (SELECT 1) SELECT * FROM n",
    "SELECT 'pg_read_file(''/etc/passwd'')' -- pg_read_file\n",
    "SELECT $$ COPY x TO PROGRAM $$",
    "SELECT /* SET ROLE postgres; */ 1",
]

#: host/src/database/policy.rs `refuses_what_reaches_beyond_the_tables`.
REFUSED = [
    "COPY cached_images TO '/tmp/x'",
    "SELECT 1 --\r, pg_terminate_backend(1)",
    "SELECT 1 --\r, set_config('statement_timeout', '0', false)",
    "--\r CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    "COPY (SELECT 1) TO PROGRAM 'touch /tmp/pwned'",
    "copy t from program 'id'",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT \"pg_read_file\"('/etc/passwd')",
    "SELECT PG_READ_BINARY_FILE('/etc/passwd')",
    "SELECT pg_catalog.pg_ls_dir('.')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '/tmp/x')",
    "SELECT dblink_exec('host=10.0.0.1', 'x')",
    "SET ROLE postgres",
    "SET SESSION AUTHORIZATION postgres",
    "SET statement_timeout = 0",
    "RESET ALL",
    "SHOW data_directory",
    "ALTER SYSTEM SET archive_command = 'x'",
    "ALTER ROLE glance SUPERUSER",
    "LOAD 'plpgsql'",
    "DO $$ BEGIN PERFORM 1; END $$",
    "CREATE EXTENSION dblink",
    "CREATE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    "CREATE OR REPLACE FUNCTION f() RETURNS int AS 'select 1' LANGUAGE sql",
    "CREATE ROLE evil SUPERUSER",
    "GRANT pg_execute_server_program TO glance",
    "SELECT set_config('role', 'postgres', false)",
    "SELECT current_setting('data_directory')",
    "SELECT inet_server_addr()",
    "SELECT current_user",
    "SELECT user",
    "SELECT version()",
    "SELECT query_to_xml('select pg_read_file(''x'')', true, true, '')",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM pg_stat_activity",
    "SELECT 1; SELECT 2",
    "SELECT 1; COPY t TO '/tmp/x'",
    "LISTEN x",
    "NOTIFY x",
    "PREPARE p AS SELECT 1",
    "VACUUM FULL",
    "TRUNCATE cached_images",
    "",
    "   ",
    "SELECT 'unterminated",
    "SELECT U&\"pg\\005fread_file\"('x')",
    "SELECT date'\\' , pg_read_file('x') --'",
]


@pytest.mark.parametrize("sql", ALLOWED)
def test_allows_what_the_centralized_driver_runs(sql):
    check(sql)


@pytest.mark.parametrize("sql", REFUSED)
def test_refuses_what_reaches_beyond_the_tables(sql):
    with pytest.raises(PolicyError):
        check(sql)


def test_the_refusals_say_what_to_change():
    def why(sql: str) -> str:
        with pytest.raises(PolicyError) as e:
            check(sql)
        return str(e.value)

    assert why("COPY t TO '/x'") == "a driver may not run COPY statements"
    assert why("CREATE FUNCTION f()") == "a driver may create tables and indexes, not FUNCTION"
    assert why("SELECT 1; SELECT 2") == "one statement per call"
    assert why("SELECT pg_read_file('x')") == 'a driver\'s SQL may not use "pg_read_file"'
    assert why("SELECT 'x") == "unterminated string in SQL"
    assert why("SELECT /* /* */ 1") == "unterminated comment in SQL"
    assert why("SELECT 1 " * 20_000) == "SQL text is longer than 65536 bytes"
    assert why("") == "empty statement"


def test_first_words():
    assert first_word("  -- x\n begin") == "begin"
    assert first_word("COMMIT;") == "commit"
    assert first_word("") is None


def test_sqlalchemy_urls_become_libpq_urls():
    assert (
        postgres.libpq_url("postgresql+psycopg2://glance:s3cret@db.example/glance")
        == "postgresql://glance:s3cret@db.example/glance"
    )
    assert postgres.libpq_url(" postgres://u@h/d ") == "postgresql://u@h/d"
    with pytest.raises(ValueError) as e:
        postgres.libpq_url("mysql+pymysql://glance:s3cret@db/glance")
    assert "mysql" in str(e.value) and "s3cret" not in str(e.value)
    assert postgres.libpq_url("host=/run/postgresql dbname=glance") == "host=/run/postgresql dbname=glance"
    with pytest.raises(ValueError) as e:
        postgres.libpq_url("glance:s3cret@db")
    assert "s3cret" not in str(e.value)


def test_a_url_that_cannot_be_used_is_refused_without_showing_it():
    for url, expected in [
        ("postgresql://g:hunter22@h/d?sslmode=sometimes", 'sslmode="sometimes" is not one of'),
        ("postgresql://g:hunter22@h/d?client_encoding=latin1", "the cache speaks UTF8 only"),
        ("postgresql://g:hunter22@h/d?nonsense=1", "is not a valid PostgreSQL URL"),
        ("sqlite://g:hunter22@h/d", 'is a "sqlite" URL'),
        ("g:hunter22@h/d", "is not a URL"),
    ]:
        with pytest.raises(ValueError) as e:
            DatabaseRoot().with_database("glance", DatabaseSettings(url))
        assert expected in str(e.value), str(e.value)
        assert "hunter22" not in str(e.value)
    # What psycopg2 accepts too: key=value, client_encoding=utf8, TLS options.
    for url in [
        "host=/run/postgresql dbname=glance user=image_cache",
        "postgresql+psycopg2://g:pw@db/glance?client_encoding=utf8&sslmode=verify-full&sslrootcert=/ca.pem",
        "postgresql://g:pw@db/glance?sslmode=require&sslcert=/c.pem&sslkey=/k.pem",
    ]:
        DatabaseRoot().with_database("glance", DatabaseSettings(url))


def test_secrets_are_scrubbed_and_never_shown():
    root = DatabaseRoot().with_database(
        "glance", DatabaseSettings("postgresql+psycopg2://glance:hunter22@db.internal:5433/glance")
    )
    backend = root.backend("glance")
    m = backend.scrub(
        'could not connect to db.internal with password hunter22: connection to server at "db.internal", '
        "port 5433 failed"
    )
    assert "hunter22" not in m and "db.internal" not in m and "5433" not in m, m
    assert "hunter22" not in repr(DatabaseSettings("postgresql://a:hunter22@h/d"))
    assert "hunter22" not in repr(root) and "hunter22" not in repr(backend)
    assert repr(root) == "DatabaseRoot(names=['glance'])"


def test_a_name_that_is_not_configured_is_access_denied():
    with pytest.raises(DbError) as e:
        DatabaseRoot().open("elsewhere")
    assert e.value.code == "access-denied"
    assert e.value.message == (
        'no database named "elsewhere" is configured for this driver (the operator sets it with '
        "image_cache_database_url, IMAGE_CACHE_DATABASE_URL, --database-url or Glance's [database] connection)"
    )


def test_parameters_take_the_servers_types():
    conv = postgres.convert_param
    assert conv(7, postgres.INT4) == struct.pack(">i", 7)
    for value, oid in [
        (1 << 40, postgres.INT4),
        (70_000, postgres.INT2),
        ("1", postgres.INT8),
        (1.5, postgres.INT8),
        (True, postgres.INT4),
        (b"\x01", postgres.TEXT),
        (math.nan, postgres.TIMESTAMP),
        (1e300, postgres.TIMESTAMP),
        ("x", 869),  # inet
        (1 << 60, postgres.FLOAT8),  # not exact as a real
    ]:
        with pytest.raises(ValueError):
            conv(value, oid)
    assert conv(None, postgres.TIMESTAMP) is None
    # Unix seconds as naive UTC: microseconds since 2000-01-01.
    assert conv(1.5e9, postgres.TIMESTAMP) == struct.pack(">q", (1_500_000_000 - 946_684_800) * 1_000_000)
    assert conv(946_684_800, postgres.TIMESTAMPTZ) == struct.pack(">q", 0)
    assert conv(3, postgres.FLOAT8) == struct.pack(">d", 3.0)
    assert conv("é", postgres.VARCHAR) == "é".encode()
    assert conv(b"\x00\xff", postgres.BYTEA) == b"\x00\xff"
    with pytest.raises(ValueError, match="the server expects int4, not text"):
        conv("7", postgres.INT4)
    with pytest.raises(ValueError, match="does not fit in int2"):
        conv(1 << 20, postgres.INT2)
    with pytest.raises(ValueError, match="inf is not a time"):
        conv(math.inf, postgres.TIMESTAMP)


def test_results_come_back_as_the_interface_carries_them():
    read = postgres._column_reader
    us = (1_700_000_000 - 946_684_800) * 1_000_000 + 250_000
    assert read(postgres.TIMESTAMP)(struct.pack(">q", us)) == 1_700_000_000.25
    assert read(postgres.TIMESTAMPTZ)(struct.pack(">q", (1 << 63) - 1)) == math.inf
    # numeric 12345.678: digits 1, 2345, 6780; weight 1; dscale 3.
    raw = struct.pack(">HhHH3H", 3, 1, 0, 3, 1, 2345, 6780)
    assert read(postgres.NUMERIC)(raw) == 12345.678
    assert read(postgres.NUMERIC)(struct.pack(">HhHH2H", 2, 0, 0x4000, 2, 7, 5000)) == -7.5
    assert math.isnan(read(postgres.NUMERIC)(struct.pack(">HhHH", 0, 0, 0xC000, 0)))
    assert read(postgres.BOOL)(b"\x01") is True
    assert read(postgres.INT8)(struct.pack(">q", -5)) == -5
    assert read(869) is None  # inet: the query must cast it


def test_sqlstates_map_to_the_interfaces_codes():
    code = postgres.sqlstate_code
    assert code("23505") == "constraint"
    assert code("57014") == "timed-out" and code("55P03") == "timed-out"
    assert code("42501") == "access-denied"
    for s in ("08006", "57P01", "28P01", "53300", "3D000"):
        assert code(s) == "unavailable", s
    assert code("54000") == "limit-exceeded"
    assert code("42P01") == "other" and code(None) == "other"


def test_the_grants_are_those_the_rust_cli_prints():
    assert postgres.grant_statements("image_cache", "glance") == [
        "GRANT CONNECT ON DATABASE glance TO image_cache;",
        "GRANT USAGE ON SCHEMA public TO image_cache;",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON cached_images, node_reference TO image_cache;",
        "GRANT USAGE ON SEQUENCE cached_images_id_seq, node_reference_node_reference_id_seq TO image_cache;",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
    ]
    assert postgres.grant_statements('Cache "Role"', "my-db")[0] == 'GRANT CONNECT ON DATABASE "my-db" TO "Cache ""Role""";'


#: host/src/database/policy.rs `mysql_allows_what_the_centralized_driver_runs`.
MYSQL_ALLOWED = [
    "SELECT hits FROM cached_images WHERE image_id = ? AND node_reference_id = ?",
    "INSERT INTO cached_images (image_id, last_accessed) VALUES (?, FROM_UNIXTIME(?)) "
    "ON DUPLICATE KEY UPDATE last_accessed = VALUES(last_accessed), hits = hits + 1",
    "INSERT INTO node_reference (node_reference_url) VALUES (?) "
    "ON DUPLICATE KEY UPDATE node_reference_id = node_reference_id",
    "SELECT `image_id` FROM `cached_images` WHERE size > 0",
    "SELECT 'it''s -- not a comment, /* nor this */ # nor this'",
    "SELECT 1 FROM cached_images LIMIT 0",
    "SELECT SLEEP(1)",
    "BEGIN",
    "COMMIT;",
]

#: host/src/database/policy.rs `mysql_refuses_what_reaches_beyond_the_tables`.
MYSQL_REFUSED = [
    "SELECT LOAD_FILE('/etc/passwd')",
    "SELECT `load_file`('/etc/passwd')",
    "SELECT * FROM cached_images INTO OUTFILE '/tmp/x'",
    "SELECT 1 INTO DUMPFILE '/tmp/x'",
    "SELECT @@datadir",
    "SELECT @@hostname",
    "SELECT @x := 1",
    "SELECT 1 /*!50000 , LOAD_FILE('/etc/passwd') */",
    "SELECT 1 /*M!100000 , @@version */",
    "SELECT 1--1",
    "SELECT 1 # , load_file('x')",
    "SELECT 1 -- x",
    "SELECT `'`, load_file('x'), `'`",
    "SELECT * FROM mysql.user",
    "SELECT * FROM `mysql`.`user`",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM performance_schema.threads",
    "SELECT * FROM sys.processlist",
    "SELECT DATABASE()",
    "SELECT SCHEMA()",
    "SELECT CONNECTION_ID()",
    "SELECT UUID()",
    "SELECT CURRENT_USER()",
    "SELECT USER()",
    "SELECT VERSION()",
    "SELECT GET_LOCK('x', 10)",
    "SET sql_mode = ''",
    "SET SESSION max_statement_time = 0",
    "SET STATEMENT max_statement_time = 0 FOR SELECT 1",
    "SHOW GRANTS",
    "SHOW PROCESSLIST",
    "KILL 1",
    "LOAD DATA INFILE '/etc/passwd' INTO TABLE cached_images",
    "HANDLER cached_images OPEN",
    "DO SLEEP(1)",
    "CALL p()",
    "REPLACE INTO cached_images VALUES (1)",
    "GRANT ALL ON *.* TO glance",
    "CREATE USER evil",
    "CREATE PROCEDURE p() SELECT 1",
    "SELECT 1; SELECT 2",
    "SELECT `unterminated",
    # What PostgreSQL reads as a dollar quote is plain text on MySQL.
    "SELECT $a$, load_file('x'), $a$",
]


@pytest.mark.parametrize("sql", MYSQL_ALLOWED)
def test_mysql_allows_what_the_centralized_driver_runs(sql):
    check(sql, "mysql")


@pytest.mark.parametrize("sql", MYSQL_REFUSED)
def test_mysql_refuses_what_reaches_beyond_the_tables(sql):
    with pytest.raises(PolicyError):
        check(sql, "mysql")
