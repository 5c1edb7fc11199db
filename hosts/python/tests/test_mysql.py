"""The MySQL/MariaDB backend's pure parts (image_cache_wasm/mysql.py),
without a server: URLs, the SHOW GRANTS fence, the grants to run, times,
placeholders and literals; the same cases as the Rust host's
``host/src/database/mysql.rs`` unit tests. (On a real MariaDB:
test_centralized_mariadb.py.)"""

from __future__ import annotations

import pymysql
import pytest

from image_cache_wasm import DatabaseRoot, DatabaseSettings, dialect_of_url
from image_cache_wasm import database, mysql
from image_cache_wasm.mysql import FIELD_TYPE, Target, bind, column_value, grant_problems, grant_statements


def test_the_urls_scheme_picks_the_backend():
    for url, dialect in [
        ("postgresql://u@h/d", "postgresql"),
        ("postgres://u@h/d", "postgresql"),
        ("postgresql+psycopg2://u@h/d", "postgresql"),
        ("host=/run/postgresql dbname=glance", "postgresql"),
        ("mysql://u@h/d", "mysql"),
        ("mysql+pymysql://u@h/d", "mysql"),
        ("mariadb+mariadbconnector://u@h/d", "mysql"),
        (" mysql+mysqldb://u@h/d ", "mysql"),
    ]:
        assert dialect_of_url(url) == dialect, url
    for url in ["sqlite:///x.db", "oracle://u:hunter22@h/d", "u:hunter22@h"]:
        with pytest.raises(ValueError) as e:
            dialect_of_url(url)
        assert "hunter22" not in str(e.value)
    root = DatabaseRoot().with_database("glance", DatabaseSettings("mysql+pymysql://g:pw@db/glance"))
    assert isinstance(root.backend("glance"), mysql.MysqlBackend)
    assert root.backend("glance").dialect == "mysql"
    assert database.grant_statements("mysql", "image_cache", "glance") == grant_statements("image_cache", "glance")
    assert database.grant_statements("postgresql", "image_cache", "glance")[0] == (
        "GRANT CONNECT ON DATABASE glance TO image_cache;"
    )


def test_glance_urls_parse_and_never_show_the_password():
    t = Target.parse("mysql+pymysql://glance:s%40cret@db.example:3307/glance?charset=utf8")
    assert (t.host, t.port, t.user, t.password, t.database) == ("db.example", 3307, "glance", "s@cret", "glance")
    assert t.tls == mysql.DISABLED
    assert "s@cret" in t.secrets and "s%40cret" in t.secrets and "db.example" in t.secrets
    assert "s@cret" not in repr(t)
    assert Target.parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem").tls == mysql.VERIFY_IDENTITY
    # The chain without the name: supported here (the Rust host refuses it
    # for a bug of its TLS client).
    assert Target.parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_check_hostname=false").tls == mysql.VERIFY_CA
    assert Target.parse("mysql://u:p@h/d?ssl_mode=VERIFY_CA").tls == mysql.VERIFY_CA
    assert Target.parse("mysql+pymysql://u:p@h/d?ssl_ca=/ca.pem&ssl_verify_cert=false").tls == mysql.REQUIRED
    assert Target.parse("mysql://u:p@h/d?ssl_mode=REQUIRED").tls == mysql.REQUIRED
    assert Target.parse("mysql://u:p@h/d?ssl-mode=verify_identity").tls == mysql.VERIFY_IDENTITY
    assert Target.parse("mysql://u:p@h/d?ssl_verify_cert=true").tls == mysql.VERIFY_IDENTITY
    assert Target.parse("mysql://u:p@h/d?ssl_mode=REQUIRED&ssl_disabled=true").tls == mysql.DISABLED
    t = Target.parse("mysql://u:p@h/d?unix_socket=/run/mysqld/mysqld.sock&connect_timeout=2.5&read_timeout=5")
    assert t.socket == "/run/mysqld/mysqld.sock" and t.connect_timeout == 2.5
    assert "/run/mysqld/mysqld.sock" in t.secrets
    assert Target.parse("mysql://h").host == "h" and Target.parse("mysql:///d").host == "localhost"
    for bad in [
        "mysql://u:hunter22@h/d?ssl_mode=PREFERRED",
        "mysql://u:hunter22@h/d?ssl_mode=sometimes",
        "mysql://u:hunter22@h/d?sslmode=require",
        "mysql://u:hunter22@h/d?charset=latin1",
        "mysql://u:hunter22@h/d?ssl_cert=/c.pem",
        "mysql://u:hunter22@h/d?ssl_ca=/ca.pem&ssl_mode=DISABLED",
        "mysql://u:hunter22@h:notaport/d",
        "mysql://u:hunter22@h/d?ssl_verify_cert=maybe",
        "mysql://u:hunter22@h/d?connect_timeout=-1",
        "mysql://u:hunter22%ff@h/d",
    ]:
        with pytest.raises(ValueError) as e:
            Target.parse(bad)
        assert "hunter22" not in str(e.value), str(e.value)
    with pytest.raises(ValueError) as e:
        DatabaseRoot().with_database("glance", DatabaseSettings("mysql://u:hunter22@h/d?ssl_mode=PREFERRED"))
    assert str(e.value).startswith('the connection URL of database "glance": ssl_mode=PREFERRED'), str(e.value)


def test_the_tls_contexts_say_what_the_url_asks(tmp_path):
    import ssl

    assert Target.parse("mysql://u:p@h/d").ssl_context() is None
    ctx = Target.parse("mysql://u:p@h/d?ssl_mode=REQUIRED").ssl_context()
    assert (ctx.check_hostname, ctx.verify_mode) == (False, ssl.CERT_NONE)
    ctx = Target.parse("mysql://u:p@h/d?ssl_mode=VERIFY_CA").ssl_context()
    assert (ctx.check_hostname, ctx.verify_mode) == (False, ssl.CERT_REQUIRED)
    ctx = Target.parse("mysql://u:p@h/d?ssl_mode=VERIFY_IDENTITY").ssl_context()
    assert (ctx.check_hostname, ctx.verify_mode) == (True, ssl.CERT_REQUIRED)
    with pytest.raises(OSError):
        Target.parse(f"mysql://u:p@h/d?ssl_ca={tmp_path}/missing.pem").ssl_context()


def test_grants_beyond_the_cache_tables_are_problems():
    fenced = [
        "GRANT USAGE ON *.* TO `glance`@`%` IDENTIFIED BY PASSWORD '*ABC'",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`cached_images` TO `glance`@`%`",
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `ic_1`.`node_reference` TO `glance`@`%`",
    ]
    assert grant_problems(fenced, "ic_1") == ([], [])
    # As the server prints them under ANSI_QUOTES.
    assert grant_problems([g.replace("`", '"') for g in fenced], "ic_1") == ([], [])
    for extra, says in [
        ("GRANT ALL PRIVILEGES ON *.* TO `root`@`localhost` WITH GRANT OPTION", "ALL PRIVILEGES on *.*"),
        ("GRANT FILE ON *.* TO `glance`@`%`", "FILE on *.*"),
        ("GRANT ALL PRIVILEGES ON `ic\\_1`.* TO `glance`@`%`", "ALL PRIVILEGES on ic_1.*"),
        ("GRANT SELECT ON `ic_1`.`images` TO `glance`@`%`", "SELECT on ic_1.images"),
        ("GRANT DROP ON `ic_1`.`cached_images` TO `glance`@`%`", "DROP on ic_1.cached_images"),
        ("GRANT SELECT ON `other`.`cached_images` TO `glance`@`%`", "SELECT on other.cached_images"),
        ("GRANT `dba` TO `glance`@`%`", "role `dba`"),
        ("GRANT PROXY ON ''@'%' TO 'glance'@'%'", "proxy"),
        ("GRANT EXECUTE ON PROCEDURE `ic_1`.`p` TO `glance`@`%`", "EXECUTE on PROCEDURE"),
        ("GRANT SELECT (`id`), UPDATE (`hits`) ON `ic_1`.`secrets` TO `glance`@`%`", "SELECT on ic_1.secrets"),
    ]:
        problems, _ = grant_problems(fenced + [extra], "ic_1")
        assert any(says in p for p in problems), (extra, problems)
    _, missing = grant_problems(fenced[:2], "ic_1")
    assert len(missing) == 4, missing
    problems, _ = grant_problems([fenced[1] + " WITH GRANT OPTION"], "ic_1")
    assert any("GRANT OPTION" in p for p in problems), problems


def test_grant_statements_name_the_account_and_tables():
    s = grant_statements("image_cache", "glance")
    assert s[0] == "GRANT SELECT, INSERT, UPDATE, DELETE ON `glance`.`cached_images` TO 'image_cache'@'%';"
    assert grant_statements("cache@10.0.0.%", "g")[1].endswith("TO 'cache'@'10.0.0.%';")
    assert grant_statements("o'brien", "my`db")[0] == (
        "GRANT SELECT, INSERT, UPDATE, DELETE ON `my``db`.`cached_images` TO 'o''brien'@'%';"
    )


def test_datetimes_are_unix_seconds_and_columns_keep_their_types():
    assert mysql.days_from_civil(1970, 1, 1) == 0
    assert mysql.days_from_civil(2000, 3, 1) == 11_017
    assert column_value(b"2026-12-07 09:30:00.5", FIELD_TYPE.DATETIME, 63) == 1_796_635_800.5
    assert column_value(b"2024-01-01", FIELD_TYPE.DATE, 63) == 1_704_067_200.0
    assert column_value(b"2024-01-01 00:00:00.000001", FIELD_TYPE.TIMESTAMP, 63) == 1_704_067_200.000001
    assert column_value(b"0001-01-01 00:00:00", FIELD_TYPE.DATETIME, 63) == -62_135_596_800.0
    with pytest.raises(ValueError, match="0-0-0 is not a time"):
        column_value(b"0000-00-00 00:00:00", FIELD_TYPE.DATETIME, 63)
    with pytest.raises(ValueError, match="cast it"):
        column_value(b"10:00:00", FIELD_TYPE.TIME, 63)
    assert column_value(b"-7", FIELD_TYPE.LONGLONG, 63) == -7
    assert column_value(b"2024", FIELD_TYPE.YEAR, 63) == 2024
    with pytest.raises(ValueError, match="signed 64-bit"):
        column_value(b"18446744073709551615", FIELD_TYPE.LONGLONG, 63)
    assert column_value(b"1.25", FIELD_TYPE.NEWDECIMAL, 63) == 1.25
    assert column_value(b"0.5", FIELD_TYPE.DOUBLE, 63) == 0.5
    assert column_value(b"\x00\xff", FIELD_TYPE.VAR_STRING, 63) == b"\x00\xff"
    assert column_value(b"\x01", FIELD_TYPE.BIT, 63) == b"\x01"
    assert column_value("é".encode(), FIELD_TYPE.VAR_STRING, 45) == "é"
    assert column_value("{}".encode(), FIELD_TYPE.BLOB, 224) == "{}"
    with pytest.raises(ValueError, match="not UTF-8"):
        column_value(b"\xff", FIELD_TYPE.STRING, 45)
    assert column_value(None, FIELD_TYPE.LONGLONG, 63) is None


def test_the_session_and_its_limits():
    setup = mysql.session_setup(2.7)
    assert setup[0] == "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"
    assert "time_zone = '+00:00'" in setup[1] and "NO_BACKSLASH_ESCAPES,ANSI_QUOTES" in setup[1]
    assert setup[2] == "SET SESSION innodb_lock_wait_timeout = 2, lock_wait_timeout = 2"
    assert mysql.session_setup(0.2)[2].endswith("= 1")
    assert mysql.server_limits("10.11.19-MariaDB-0+deb12u1", 1.5) == (
        "SET SESSION max_statement_time = 1.500, idle_transaction_timeout = 1"
    )
    assert mysql.server_limits("8.0.36", 1.5) == "SET SESSION max_execution_time = 1500"
    assert [mysql.error_code(c) for c in (1062, 1205, 1317, 1969, 3024, 1142, 1045, 2013, 1153, 1146)] == [
        "constraint", "timed-out", "timed-out", "timed-out", "timed-out", "access-denied", "unavailable",
        "unavailable", "limit-exceeded", "other",
    ]


class _Conn(pymysql.connections.Connection):
    """A PyMySQL connection that never connects, with the server status a
    session would have."""

    def __init__(self, status: int):
        super().__init__(defer_connect=True, charset="utf8mb4", conv=mysql._ENCODERS)
        self.server_status = status


NO_BACKSLASH_ESCAPES = 512


def test_placeholders_are_bound_outside_strings_and_names_with_pymysqls_escaping():
    conn = _Conn(NO_BACKSLASH_ESCAPES)
    out = bind(conn, "SELECT '?', \"a?\", `b?`, ?, ?, ?, ?, ?, ?, 1-?", [
        "it's a \\ ?", 7, 0.5, True, None, b"\x00\xff", -1,
    ]).decode()
    assert out == (
        "SELECT '?', \"a?\", `b?`,  'it''s a \\ ?' ,  7 ,  0.5e0 ,  1 ,  NULL ,  X'00ff' , 1- -1 "
    ), out
    # % is text (nothing is %-formatted), and the text goes as UTF-8.
    assert bind(conn, "SELECT '%s', ?", ["é%"]).decode() == "SELECT '%s',  'é%' "
    assert bind(conn, "SELECT 1", []) == b"SELECT 1"
    with pytest.raises(mysql._Count):
        bind(conn, "SELECT ?", [])
    with pytest.raises(mysql._Count):
        bind(conn, "SELECT '?'", [1])
    with pytest.raises(ValueError, match="parameter 1: NaN is not a number the server can store"):
        bind(conn, "SELECT ?", [float("nan")])
    with pytest.raises(ValueError, match="parameter 2: inf is not a number"):
        bind(conn, "SELECT ?, ?", [1, float("inf")])
    # Text is never sent unless the session reads it as it is escaped.
    with pytest.raises(mysql._NoBackslashEscapes):
        bind(_Conn(0), "SELECT ?", ["a\\'"])
