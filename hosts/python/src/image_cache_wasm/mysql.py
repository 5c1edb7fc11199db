"""The ``database`` interface on MySQL and MariaDB, with PyMySQL.

A port of the Rust host's ``host/src/database/mysql.rs``. What the host
enforces, whatever the driver's SQL says (as on PostgreSQL):

- the driver names a database; the URL, host, user's password and socket
  stay here and are scrubbed from every message;
- the database fences the driver by its own privileges: an account with
  anything beyond ``SELECT, INSERT, UPDATE, DELETE`` on Glance's two cache
  tables (read from ``SHOW GRANTS``: no global or database-wide privilege,
  no ``GRANT OPTION``, no ``PROXY``, no role, no routine) is refused at its
  first connection, with the statements that make a dedicated account
  (:func:`grant_statements`, ``image-cache db grants --mysql``);
- each statement passes ``policy.check`` for MySQL (no comments, no
  variables, no ``LOAD_FILE``/``OUTFILE``, no system schemas, ...), and
  every session runs with ``NO_BACKSLASH_ESCAPES`` and ``ANSI_QUOTES`` so
  the server reads strings and names as the check does;
- parameters (``?``) are bound here, each value escaped by PyMySQL's own
  escaping for the session's ``NO_BACKSLASH_ESCAPES`` (read from the
  server's status, checked before every text value), at the ``?`` the
  statement check's tokenizer found outside strings and quoted names;
  booleans are 0 and 1, blobs ``X'..'``;
- results come back typed (``DATETIME``, ``TIMESTAMP`` and ``DATE`` as Unix
  seconds: the session's time zone is UTC; ``DECIMAL`` as real; binary
  strings as blobs), streamed (PyMySQL's unbuffered cursor) and capped in
  bytes as they arrive; the pool caps the connections;
- every call ends by the driver call's deadline: PyMySQL blocks, so each
  socket read and write is given what is left of it; a statement still
  running then is ended on the server with ``KILL QUERY`` from a connection
  of its own, and the connection that timed out is dropped;
- every session has a statement time limit (``max_statement_time`` on
  MariaDB, ``max_execution_time`` on MySQL), lock wait limits
  (``innodb_lock_wait_timeout``, ``lock_wait_timeout``) and, on MariaDB, an
  idle-transaction limit (``idle_transaction_timeout``), READ COMMITTED and
  UTC.

URLs are Glance's (``mysql+pymysql://user:password@host:port/db``), with
PyMySQL's TLS parameters (``ssl_ca``, ``ssl_cert``, ``ssl_key``,
``ssl_check_hostname``, ``ssl_verify_cert``, ``ssl_disabled``) or
mysqlclient's ``ssl_mode`` (``DISABLED``, ``REQUIRED``, ``VERIFY_CA``,
``VERIFY_IDENTITY``; ``PREFERRED`` is refused: it falls back to plain text).
Unlike the Rust host, a chain-only check (``VERIFY_CA``,
``ssl_check_hostname=false``) is supported: Python's ``ssl`` verifies the
chain without the name.
"""

from __future__ import annotations

import logging
import math
import select
import ssl
import threading
import time
import urllib.parse
from typing import Any, List, Optional, Sequence, Tuple

try:
    import pymysql
    import pymysql.converters
    import pymysql.cursors
    from pymysql.constants import CLIENT, FIELD_TYPE, SERVER_STATUS
except ImportError as _e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "the MySQL/MariaDB backend needs PyMySQL: pip install 'image_cache_wasm[centralized]'"
    ) from _e

if tuple(pymysql.VERSION[:2]) < (1, 2):  # pragma: no cover - an old PyMySQL
    # Before 1.2 a server without TLS was silently spoken to in plain text
    # whatever the TLS settings, and errors did not carry their SQLSTATE
    # (the centralized driver reads 42S02 in them).
    raise ImportError(
        f"the MySQL/MariaDB backend needs PyMySQL 1.2 or later (this is {pymysql.VERSION_STRING}): "
        "pip install 'image_cache_wasm[centralized]'"
    )

from . import policy
from .database import DbError, Pool, timed_out, value_size
from .errors import quoted

log = logging.getLogger("image_cache_wasm")

#: Glance's two cache tables as its migrations create them on MySQL (the
#: 2024.1 ``cache`` migration: InnoDB, utf8). Drivers never create them:
#: ``glance-manage db sync`` does.
GLANCE_CACHE_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGINT NOT NULL AUTO_INCREMENT,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
) ENGINE=InnoDB CHARSET=utf8""",
    """CREATE TABLE IF NOT EXISTS cached_images (
    id BIGINT NOT NULL AUTO_INCREMENT,
    image_id VARCHAR(36) NOT NULL,
    last_accessed DATETIME NOT NULL,
    last_modified DATETIME NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
) ENGINE=InnoDB CHARSET=utf8""",
)

#: The tables a cache driver's account may read and write.
CACHE_TABLES = ("cached_images", "node_reference")
#: The DML it needs on them.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")

#: How long a ``KILL QUERY`` may take (it runs in the background).
KILL_TIMEOUT = 5.0
#: An idle pooled connection older than this is closed, not reused.
IDLE_TTL = 60.0
#: MySQL's character set number for binary strings.
BINARY_CHARSET = 63


def ident(name: str) -> str:
    """``name`` as a MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def account(role: str) -> str:
    """``user`` or ``user@host`` as a MySQL account (``'user'@'%'`` by
    default)."""

    def quote(s: str) -> str:
        return "'" + s.replace("'", "''") + "'"

    if "@" in role:
        user, host = role.rsplit("@", 1)
        return f"{quote(user)}@{quote(host)}"
    return f"{quote(role)}@'%'"


def grant_statements(role: str, database: str) -> List[str]:
    """The statements an administrator runs to give the cache's account
    (``role``, or ``user@host``; made with ``CREATE USER ... IDENTIFIED
    BY``) exactly what a driver needs: DML on the two cache tables of
    ``database`` (``image-cache db grants --mysql``)."""
    who, db = account(role), ident(database)
    return [f"GRANT {', '.join(TABLE_PRIVILEGES)} ON {db}.{ident(t)} TO {who};" for t in CACHE_TABLES]


# -- URLs ----------------------------------------------------------------------------

DISABLED, REQUIRED, VERIFY_CA, VERIFY_IDENTITY = "disabled", "required", "verify-ca", "verify-identity"


def _truth(key: str, value: str) -> bool:
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"the database URL's {key} must be true or false, not {policy._debug(value)}")


class Target:
    """A MySQL URL as the parts a connection needs. Errors never show it."""

    def __init__(self) -> None:
        self.host = "localhost"
        self.port = 3306
        self.user: Optional[str] = None
        self.password: Optional[str] = None
        self.database: Optional[str] = None
        self.socket: Optional[str] = None
        self.tls = DISABLED
        self.ca: Optional[str] = None
        self.cert: Optional[str] = None
        self.key: Optional[str] = None
        self.connect_timeout: Optional[float] = None
        #: Strings never shown: the URL, its password (as given and
        #: decoded), the host, the socket.
        self.secrets: List[str] = []

    def __repr__(self) -> str:
        return f"Target(tls={self.tls!r})"

    @classmethod
    def parse(cls, url: str) -> "Target":
        url = url.strip()
        if "://" not in url:
            raise ValueError("the database connection is not a URL")
        rest = url.split("://", 1)[1]
        try:
            parts = urllib.parse.urlsplit("mysql://" + rest)
            port = parts.port
        except ValueError:
            raise ValueError("the database connection is not a valid MySQL URL (invalid port number)") from None

        def decode(s: str) -> str:
            try:
                return urllib.parse.unquote(s, errors="strict")
            except UnicodeDecodeError:
                raise ValueError("the database URL's user or password is not UTF-8") from None

        t = cls()
        t.secrets = [url]
        if parts.username:
            t.user = decode(parts.username)
        if parts.password is not None:
            t.secrets.append(parts.password)
            t.password = decode(parts.password)
            t.secrets.append(t.password)
        database = parts.path.lstrip("/").split("/", 1)[0]
        if database:
            t.database = decode(database)
        t.host = parts.hostname or "localhost"
        t.secrets.append(t.host)
        t.port = port or 3306
        mode: Optional[str] = None
        verify_cert: Optional[bool] = None
        check_hostname: Optional[bool] = None
        for key, value in urllib.parse.parse_qsl(parts.query, keep_blank_values=True):
            if key == "ssl_ca":
                t.ca = value
            elif key == "ssl_cert":
                t.cert = value
            elif key == "ssl_key":
                t.key = value
            elif key == "ssl_verify_cert":
                verify_cert = _truth(key, value)
            elif key == "ssl_check_hostname":
                check_hostname = _truth(key, value)
            elif key == "ssl_disabled":
                if _truth(key, value):
                    mode = DISABLED
            elif key in ("ssl_mode", "ssl-mode"):
                upper = value.upper()
                if upper == "DISABLED":
                    mode = DISABLED
                elif upper == "REQUIRED":
                    mode = REQUIRED
                elif upper == "VERIFY_CA":
                    mode = VERIFY_CA
                elif upper == "VERIFY_IDENTITY":
                    mode = VERIFY_IDENTITY
                elif upper == "PREFERRED":
                    raise ValueError(
                        "ssl_mode=PREFERRED is not supported: it falls back to plain text when TLS "
                        "fails, which anyone on the path can force; say REQUIRED (or VERIFY_CA, "
                        "VERIFY_IDENTITY) or DISABLED"
                    )
                else:
                    raise ValueError(
                        f"ssl_mode {policy._debug(upper)} is not one of DISABLED, REQUIRED, VERIFY_CA, "
                        "VERIFY_IDENTITY"
                    )
            elif key == "unix_socket":
                t.socket = value
                t.secrets.append(value)
            elif key == "charset":
                # The host always speaks utf8mb4, which holds utf8.
                if value.lower() not in ("utf8", "utf8mb4", "utf8mb3"):
                    raise ValueError(
                        f"charset {policy._debug(value)} is not supported: the host speaks utf8mb4"
                    )
            elif key == "connect_timeout":
                try:
                    seconds = float(value)
                except ValueError:
                    seconds = math.nan
                if not (math.isfinite(seconds) and 0 < seconds < 86_400):
                    raise ValueError(f"connect_timeout must be seconds, not {policy._debug(value)}")
                t.connect_timeout = seconds
            elif key in ("read_timeout", "write_timeout"):
                # PyMySQL's socket timeouts: the driver call's deadline
                # bounds every read and write here.
                pass
            else:
                raise ValueError(
                    f"the database URL has a parameter this host does not know: {policy._debug(key)} "
                    "(known: ssl_ca, ssl_cert, ssl_key, ssl_verify_cert, ssl_check_hostname, ssl_mode, "
                    "ssl_disabled, unix_socket, charset, connect_timeout)"
                )
        # PyMySQL: any ssl_* file turns TLS on, verifying the certificate
        # and the host name unless told not to.
        pymysql_tls = t.ca is not None or t.cert is not None or t.key is not None
        if mode is not None:
            t.tls = mode
        elif pymysql_tls or verify_cert is True or check_hostname is True:
            if verify_cert is False:
                t.tls = REQUIRED
            elif check_hostname is False:
                t.tls = VERIFY_CA
            else:
                t.tls = VERIFY_IDENTITY
        else:
            t.tls = DISABLED
        if (t.cert is None) != (t.key is None):
            raise ValueError("ssl_cert and ssl_key go together (a client certificate and its key)")
        if t.tls == DISABLED and pymysql_tls:
            raise ValueError("TLS files are given but TLS is disabled")
        t.secrets = sorted({s for s in t.secrets if s}, key=len, reverse=True)
        return t

    def ssl_context(self) -> Optional[ssl.SSLContext]:
        """The TLS settings of a new connection (the files are read now, so
        a renewed CA or client certificate is picked up), or None."""
        if self.tls == DISABLED:
            return None
        if self.tls == REQUIRED:
            # Encrypted, the server not verified (as mysqlclient's REQUIRED
            # and PyMySQL's ssl_verify_cert=false).
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        else:
            # The given CA only, as libmysqlclient and PyMySQL do; else the
            # system's.
            ctx = ssl.create_default_context(cafile=self.ca)
            # As PyMySQL: servers' own self-made certificates do not pass
            # Python 3.13's strict X.509 checks.
            ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
            ctx.check_hostname = self.tls == VERIFY_IDENTITY
            ctx.verify_mode = ssl.CERT_REQUIRED
        if self.cert is not None:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


# -- sessions -------------------------------------------------------------------------

_SQL_MODE = (
    "STRICT_TRANS_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE,ERROR_FOR_DIVISION_BY_ZERO,"
    "NO_ENGINE_SUBSTITUTION,NO_BACKSLASH_ESCAPES,ANSI_QUOTES"
)


def session_setup(timeout: float) -> List[str]:
    """The session every connection gets: PostgreSQL's isolation (READ
    COMMITTED: a scan does not wait on locked rows it does not change, so a
    prune is not stopped by another session's lock on a row it keeps), UTC
    times, strings and names read as the statement check reads them, and
    the lock wait limits (whole seconds, at least 1)."""
    seconds = max(1, int(timeout))
    return [
        "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
        f"SET SESSION time_zone = '+00:00', sql_mode = '{_SQL_MODE}', character_set_results = 'utf8mb4'",
        f"SET SESSION innodb_lock_wait_timeout = {seconds}, lock_wait_timeout = {seconds}",
    ]


def server_limits(version: str, timeout: float) -> str:
    """The statement and idle-transaction limits, which MariaDB and MySQL
    name differently; run on each new connection once its server is known."""
    if "mariadb" in version.lower():
        return (
            f"SET SESSION max_statement_time = {max(timeout, 0.001):.3f}, "
            f"idle_transaction_timeout = {max(1, int(timeout))}"
        )
    return f"SET SESSION max_execution_time = {max(1, int(timeout * 1000))}"


def error_code(code: int) -> str:
    """A MySQL server error number as the interface's error code (the Rust
    host's ``error_code``)."""
    # Duplicate key, foreign key, NOT NULL, no default, CHECK.
    if code in (1062, 1216, 1217, 1451, 1452, 1048, 1364, 1557, 1586, 3819, 4025):
        return "constraint"
    # Lock wait timeout; statement time exceeded (MySQL 3024, MariaDB
    # 1969); interrupted (KILL QUERY).
    if code in (1205, 3024, 1969, 1317, 1907):
        return "timed-out"
    # A privilege the account lacks.
    if code in (1044, 1142, 1143, 1227, 1370, 1410):
        return "access-denied"
    # Bad login, too many connections, unknown database, shutting down,
    # connection lost or refused.
    if code in (1040, 1045, 1049, 1053, 1129, 1130, 1203, 2002, 2003, 2006, 2013):
        return "unavailable"
    # Packet or row too large, out of memory or sort space.
    if code in (1037, 1038, 1118, 1153, 1301):
        return "limit-exceeded"
    return "other"


# -- SHOW GRANTS ------------------------------------------------------------------------


def _split_top(s: str, sep: str) -> Optional[Tuple[str, str]]:
    """Split ``s`` at the first ``sep`` (matched case-insensitively)
    outside backquotes, quotes and brackets."""
    quote: Optional[str] = None
    depth = 0
    upper = s.upper()
    for at, c in enumerate(s):
        if quote is not None:
            if c == quote:
                quote = None
        elif c in "`'\"":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif depth == 0 and upper.startswith(sep, at):
            return s[:at], s[at + len(sep):]
    return None


def _unquote(name: str) -> str:
    """A quoted (backquotes, or double quotes under ``ANSI_QUOTES``) or bare
    name without its quotes (and a database-level grant's ``\\_`` and
    ``\\%`` unescaped)."""
    name = name.strip()
    inner = name
    for q in "`\"":
        if len(name) >= 2 and name.startswith(q) and name.endswith(q):
            inner = name[1:-1].replace(q + q, q)
            break
    return inner.replace("\\_", "_").replace("\\%", "%")


def grant_problems(grants: Sequence[str], database: str) -> Tuple[List[str], List[str]]:
    """What ``SHOW GRANTS`` says the account may do beyond a cache driver's
    needs in ``database`` (the problems), and what it lacks of them."""
    problems: List[str] = []
    held: List[Tuple[str, str]] = []
    for line in grants:
        line = line.strip()
        if line[:6].upper() != "GRANT ":
            # `SET DEFAULT ROLE ...` and the like: about roles, which a
            # `GRANT role TO` line already reported.
            continue
        body = line[6:]
        if _split_top(line, " WITH GRANT OPTION") is not None:
            problems.append("may grant its privileges (WITH GRANT OPTION)")
        split = _split_top(body, " ON ")
        if split is None:
            to = _split_top(body, " TO ")
            role = to[0] if to is not None else ""
            problems.append(f"is granted the role {role.strip()}")
            continue
        privileges_text, rest = split
        to = _split_top(rest, " TO ")
        obj = (to[0] if to is not None else rest).strip()
        listed: List[str] = []
        remaining = privileges_text.strip()
        while True:
            one = _split_top(remaining, ",")
            if one is None:
                listed.append(remaining)
                break
            listed.append(one[0])
            remaining = one[1]
        # `SELECT (col, ...)`: a column grant of SELECT.
        privileges = [p.split("(", 1)[0].strip().upper() for p in listed]
        privileges = [p for p in privileges if p]
        if "PROXY" in privileges:
            problems.append(f"may proxy as {obj}")
            continue
        upper = obj.upper()
        if upper.startswith(("FUNCTION ", "PROCEDURE ", "PACKAGE ")):
            problems.append(f"holds {', '.join(privileges)} on {obj}")
            continue
        dot = _split_top(obj, ".")
        if dot is not None:
            db, table = _unquote(dot[0]), _unquote(dot[1])
        else:
            db, table = database, _unquote(obj)
        for privilege in privileges:
            needed = db == database and table in CACHE_TABLES and privilege in TABLE_PRIVILEGES
            if needed:
                held.append((table, privilege))
            elif privilege == "USAGE":
                pass  # no privilege at all
            else:
                on = f"{db}.*" if table == "*" else f"{db}.{table}"
                problems.append(f"holds {privilege} on {on}")
    # As Rust's Vec::dedup: consecutive repeats only.
    deduped: List[str] = []
    for p in problems:
        if not deduped or deduped[-1] != p:
            deduped.append(p)
    missing = [f"{p} on {t}" for t in CACHE_TABLES for p in TABLE_PRIVILEGES if (t, p) not in held]
    return deduped, missing


# -- values ------------------------------------------------------------------------------


def _rust_float(x: float) -> str:
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return repr(x)


def literal(conn: "pymysql.Connection", v: Any) -> str:
    """A guest value as a SQL literal, escaped by PyMySQL for this
    connection (``NO_BACKSLASH_ESCAPES`` as the server's status says).
    ValueError says why a value cannot be sent."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return conn.escape(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"{_rust_float(v)} is not a number the server can store")
        return conn.escape(v)
    if isinstance(v, str):
        if not conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
            # Never sent with escaping the server would read otherwise.
            raise _NoBackslashEscapes()
        return conn.escape(v)
    if isinstance(v, (bytes, bytearray, memoryview)):
        return conn.escape(bytes(v))
    raise ValueError(f"{type(v).__name__} is not a value of this interface")


class _NoBackslashEscapes(Exception):
    """The session lost NO_BACKSLASH_ESCAPES (never expected)."""


def bind(conn: "pymysql.Connection", sql: str, params: Sequence[Any]) -> bytes:
    """``sql`` with each ``?`` placeholder (as the statement check's
    tokenizer sees them: outside strings and quoted names) replaced by its
    value's literal, as UTF-8. ValueError says why it cannot be."""
    marks = policy.placeholders(sql)
    if len(marks) != len(params):
        raise _Count(len(marks), len(params))
    raw = sql.encode("utf-8", "surrogatepass")
    if not marks:
        return raw
    out = bytearray()
    last = 0
    for i, (at, v) in enumerate(zip(marks, params)):
        out += raw[last:at]
        try:
            text = literal(conn, v)
        except ValueError as why:
            raise ValueError(f"parameter {i + 1}: {why}") from None
        # Spaces around it, so no literal runs into what is around it
        # (`1-?` with -1 is `1- -1 `, never a `--` comment).
        out += b" " + text.encode("utf-8", "surrogatepass") + b" "
        last = at + 1
    out += raw[last:]
    return bytes(out)


class _Count(Exception):
    def __init__(self, want: int, given: int):
        super().__init__(f"the statement has {want} parameters, {given} values were given")


_INTEGERS = {FIELD_TYPE.TINY, FIELD_TYPE.SHORT, FIELD_TYPE.LONG, FIELD_TYPE.LONGLONG, FIELD_TYPE.INT24,
             FIELD_TYPE.YEAR}
_FLOATS = {FIELD_TYPE.FLOAT, FIELD_TYPE.DOUBLE}
_DECIMALS = {FIELD_TYPE.DECIMAL, FIELD_TYPE.NEWDECIMAL}
_DATES = {FIELD_TYPE.DATE, FIELD_TYPE.DATETIME, FIELD_TYPE.TIMESTAMP, FIELD_TYPE.NEWDATE}
_I64 = 1 << 63


def days_from_civil(y: int, m: int, d: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date."""
    y = y - 1 if m <= 2 else y
    era = y // 400
    yoe = y - era * 400
    mp = (m + 9) % 12
    doy = (153 * mp + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146_097 + doe - 719_468


def unix_seconds(text: str) -> float:
    """A ``DATE`` or ``DATETIME`` as the server prints it (UTC) in Unix
    seconds; years 1 to 9999."""
    date, _, clock = text.partition(" ")
    try:
        y, mo, d = (int(x) for x in date.split("-"))
        h = mi = s = us = 0
        if clock:
            hms, _, frac = clock.partition(".")
            h, mi, s = (int(x) for x in hms.split(":"))
            if frac:
                us = int(frac[:6].ljust(6, "0"))
    except ValueError:
        raise ValueError(f"{policy._debug(text)} is not a time") from None
    if not (1 <= y <= 9999 and 1 <= mo <= 12 and 1 <= d <= 31):
        raise ValueError(f"{y}-{mo}-{d} is not a time")
    return days_from_civil(y, mo, d) * 86_400.0 + h * 3600.0 + mi * 60.0 + s + us / 1e6


def column_value(raw: Optional[bytes], field_type: int, charset: int) -> Any:
    """A result value (as the text protocol carries it) of a column of
    ``field_type`` and ``charset`` as a guest value; ValueError says why
    it cannot be."""
    if raw is None:
        return None
    if field_type in _INTEGERS:
        i = int(raw)
        if not -_I64 <= i < _I64:
            raise ValueError(f"{i} does not fit in a signed 64-bit integer")
        return i
    if field_type in _FLOATS:
        return float(raw)
    if field_type in _DECIMALS:
        text = raw.decode("ascii", "replace")
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{policy._debug(text)} is not a decimal number") from None
    if field_type in _DATES:
        return unix_seconds(raw.decode("ascii", "replace"))
    if field_type == FIELD_TYPE.TIME:
        raise ValueError("its type TIME is not one this interface carries; cast it (CAST(... AS CHAR))")
    if field_type == FIELD_TYPE.NULL:
        return None
    if charset == BINARY_CHARSET:
        return bytes(raw)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("text that is not UTF-8") from None


# -- connections --------------------------------------------------------------------------

#: PyMySQL's encoders only: result values stay as the server sent them
#: (bytes), converted here by column type.
_ENCODERS = {k: v for k, v in pymysql.converters.conversions.items() if not isinstance(k, int)}


class _Deadline(Exception):
    """The call's deadline passed before or while waiting on the server."""


def _ran_out(e: BaseException, deadline: float) -> bool:
    """Whether PyMySQL's error ``e`` is the socket giving up at the deadline
    (not an answer of the server, which carries its SQLSTATE)."""
    if getattr(e, "sqlstate", None) is not None:
        return False
    return isinstance(e.__context__, TimeoutError) or time.monotonic() >= deadline - 0.01


class Session:
    """One server connection: whether it may go back to the pool, and the
    deadline its socket reads and writes are bounded by."""

    def __init__(self, conn: "pymysql.Connection"):
        self.conn = conn
        self.thread_id = conn.thread_id()
        #: Set when a call stopped half-way or the server went: never reused.
        self.broken = False
        self.returned_at: Optional[float] = None
        self._armed = 0.0

    def arm(self, deadline: float) -> None:
        """Bound every socket read and write from now on by ``deadline``."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        self._armed = remaining
        self.conn._read_timeout = remaining
        self.conn._write_timeout = remaining

    def rearm(self, deadline: float) -> None:
        """As :meth:`arm`, only if what is left shrank noticeably."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        if self._armed - remaining > 0.05:
            self.arm(deadline)

    def in_transaction(self) -> bool:
        return bool(self.conn.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS)

    def usable(self) -> bool:
        """Whether an idle connection can be handed out: open, outside a
        transaction, not idle too long, and nothing from the server waiting
        on its socket (a server that closed it, or killed it)."""
        if self.broken or not self.conn.open or self.in_transaction():
            return False
        if self.returned_at is not None and time.monotonic() - self.returned_at > IDLE_TTL:
            return False
        sock = self.conn._sock
        try:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return False
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            return not poller.poll(0)
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        self.broken = True
        try:
            if self.conn.open:
                self.conn._write_timeout = 1.0
                self.conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            try:
                self.conn._force_close()
            except Exception:  # noqa: BLE001
                pass

    def drop(self) -> None:
        """Close the socket without a word to the server (it timed out)."""
        self.broken = True
        try:
            self.conn._force_close()
        except Exception:  # noqa: BLE001
            pass


_ROLE_UNCHECKED, _ROLE_OK, _ROLE_REFUSED = 0, 1, 2


class MysqlBackend:
    """A MySQL or MariaDB database a driver may open by ``name``. Nothing is
    connected until a driver opens it."""

    dialect = "mysql"

    def __init__(self, name: str, settings) -> None:
        self.name = name
        try:
            target = Target.parse(settings.url)
        except ValueError as e:
            raise ValueError(f"the connection URL of database {quoted(name)}: {e}") from None
        if target.database is None:
            raise ValueError(
                f"the connection URL of database {quoted(name)} names no database "
                "(mysql+pymysql://user:password@host/glance)"
            )
        self.target = target
        self.secrets = target.secrets
        self.pool_size = max(1, int(settings.pool_size))
        self.connect_timeout = float(
            target.connect_timeout if target.connect_timeout is not None else settings.connect_timeout
        )
        self.statement_timeout: Optional[float] = settings.statement_timeout
        self.max_result_bytes = int(settings.max_result_bytes)
        self.allow_privileged_role = bool(settings.allow_privileged_role)
        self._pool = Pool(self.pool_size, self._connect)
        self._role = _ROLE_UNCHECKED
        self._refusal = ""
        self._role_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MysqlBackend({quoted(self.name)}, pool_size={self.pool_size})"

    # -- messages ------------------------------------------------------------------

    def scrub(self, message: str) -> str:
        """``message`` without any secret (URL, password, host, socket)."""
        for s in self.secrets:
            if s in message:
                message = message.replace(s, "(hidden)")
        return message

    def error(self, code: str, message: str) -> DbError:
        return DbError(code, f"database {quoted(self.name)}: {self.scrub(message)}")

    def client_error(self, e: BaseException, connecting: bool = False) -> DbError:
        """A PyMySQL error in the driver's terms, scrubbed. Server errors
        carry their number and SQLSTATE (``ERROR 1146 (42S02): ...``); the
        rest (refused, reset, closed, TLS) is ``unavailable``. While a
        connection is being opened, any server error that is not more
        precise is ``unavailable`` too (the database cannot be used)."""
        args = getattr(e, "args", ())
        code = args[0] if args and isinstance(args[0], int) else None
        message = str(args[1]) if len(args) > 1 else (str(e) or type(e).__name__)
        state = getattr(e, "sqlstate", None)
        if isinstance(e, pymysql.err.MySQLError) and code is not None and (state is not None or not 2000 <= code < 3000):
            if code == 0 and not message:
                return self.error("unavailable", "the connection is closed")
            kind = error_code(code)
            if connecting and kind == "other":
                kind = "unavailable"
            return self.error(kind, f"ERROR {code} ({state or 'HY000'}): {message}")
        return self.error("unavailable", message)

    # -- connections ---------------------------------------------------------------------

    def _timeout(self) -> float:
        return self.statement_timeout if self.statement_timeout is not None else 30.0

    def _open(self, limit: float) -> "pymysql.Connection":
        """A PyMySQL connection by ``limit`` (monotonic seconds), logged in,
        without the session setup. Raises PyMySQL's errors, OSError
        (TLS files) or :class:`_Deadline`."""
        remaining = limit - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        t = self.target
        kwargs = dict(
            host=t.host,
            port=t.port,
            user=t.user,
            password=(t.password or "").encode("utf-8"),
            database=t.database,
            unix_socket=t.socket,
            charset="utf8mb4",
            connect_timeout=remaining,
            read_timeout=remaining,
            write_timeout=remaining,
            client_flag=CLIENT.FOUND_ROWS,
            autocommit=True,
            conv=_ENCODERS,
            use_unicode=False,
            program_name="image-cache",
        )
        ctx = t.ssl_context()
        if ctx is None:
            kwargs["ssl_disabled"] = True
        else:
            kwargs["ssl"] = ctx
        return pymysql.connect(**kwargs)

    def _connect(self, deadline: float) -> Session:
        limit = min(deadline, time.monotonic() + self.connect_timeout)
        try:
            conn = self._open(limit)
        except _Deadline:
            raise timed_out() from None
        except Exception as e:  # noqa: BLE001 - PyMySQL's, ssl's, the files'
            raise self._connect_failed(e, deadline, limit) from None
        s = Session(conn)
        try:
            s.arm(limit)
            timeout = self._timeout()
            cur = conn.cursor(pymysql.cursors.Cursor)
            for statement in session_setup(timeout):
                cur.execute(statement)
            cur.execute("SELECT VERSION()")
            row = cur.fetchone()
            version = row[0].decode("utf-8", "replace") if row and row[0] else ""
            cur.execute(server_limits(version, timeout))
            cur.close()
        except _Deadline:
            s.drop()
            raise timed_out() from None
        except Exception as e:  # noqa: BLE001
            s.drop()
            raise self._connect_failed(e, deadline, limit) from None
        if not conn.server_status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES:
            s.close()
            raise self.error(
                "unavailable",
                "the server did not take the session's sql_mode (NO_BACKSLASH_ESCAPES): strings "
                "would not be read as the statement check reads them",
            )
        return s

    def _connect_failed(self, e: BaseException, deadline: float, limit: float) -> DbError:
        now = time.monotonic()
        if now >= deadline - 0.01:
            return timed_out()
        if now >= limit - 0.01:
            return self.error("unavailable", "no connection within the connect timeout")
        if isinstance(e, pymysql.err.MySQLError):
            return self.client_error(e, connecting=True)
        if isinstance(e, OSError):
            return self.error("unavailable", f"cannot use the TLS files: {e}")
        return self.error("unavailable", str(e) or type(e).__name__)

    def pool_status(self) -> Tuple[int, int]:
        """Connections the pool holds now, and at most."""
        return self._pool.status()

    def checkout(self, deadline: float) -> Session:
        """A connection by ``deadline``, the account checked once per
        backend."""
        s = self._pool.get(deadline)
        if self._role == _ROLE_OK:
            return s
        if self._role == _ROLE_REFUSED:
            self.release(s, True)
            raise self.error("access-denied", self._refusal)
        try:
            self._check_role(s, deadline)
        except BaseException:
            self.release(s, not s.broken)
            raise
        return s

    def release(self, s: Session, healthy: bool) -> None:
        s.returned_at = time.monotonic()
        self._pool.put(s, healthy)

    def close(self) -> None:
        self._pool.close()

    def connect(self, deadline: float) -> "MysqlConnection":
        return MysqlConnection(self, self.checkout(deadline))

    def kill_query_in_background(self, thread_id: int) -> None:
        """End what the connection ``thread_id`` is running on the server
        (``KILL QUERY`` from a connection of its own), without waiting."""

        def kill() -> None:
            try:
                conn = self._open(time.monotonic() + KILL_TIMEOUT)
                try:
                    conn.query(f"KILL QUERY {int(thread_id)}")
                finally:
                    conn.close()
            except Exception as e:  # noqa: BLE001 - best effort
                log.debug("database %s: KILL QUERY failed: %s", quoted(self.name), self.scrub(str(e)))

        threading.Thread(target=kill, name="image-cache-db-kill", daemon=True).start()

    # -- the account ----------------------------------------------------------------------

    def _host_query(self, s: Session, sql: str, deadline: float) -> List[Tuple[Any, ...]]:
        """A query of the host's own (not checked by the policy): its rows
        as the server sent them."""
        try:
            s.arm(deadline)
            cur = s.conn.cursor(pymysql.cursors.Cursor)
            cur.execute(sql)
            rows = list(cur.fetchall())
            cur.close()
            return rows
        except _Deadline:
            s.drop()
            raise timed_out() from None
        except Exception as e:  # noqa: BLE001
            if _ran_out(e, deadline):
                s.drop()
                raise timed_out() from None
            err = self.client_error(e)
            if err.code == "unavailable" or not s.conn.open:
                s.drop()
            raise err from None

    def _check_role(self, s: Session, deadline: float) -> None:
        rows = self._host_query(s, "SELECT DATABASE()", deadline)
        database = rows[0][0].decode("utf-8", "replace") if rows and rows[0][0] else ""
        grants = [
            r[0].decode("utf-8", "replace")
            for r in self._host_query(s, "SHOW GRANTS", deadline)
            if r and isinstance(r[0], (bytes, bytearray))
        ]
        problems, missing = grant_problems(grants, database)
        with self._role_lock:
            if not problems:
                if missing:
                    log.warning("database %s: the account lacks %s", quoted(self.name), ", ".join(missing))
                self._role = _ROLE_OK
                return
            if self.allow_privileged_role:
                log.warning(
                    "database %s: its role %s; allowed by configuration "
                    "(image_cache_database_allow_privileged_role)",
                    quoted(self.name),
                    "; ".join(problems),
                )
                self._role = _ROLE_OK
                return
            shown = problems[:3]
            self._refusal = (
                f"refused: the configured role {'; '.join(shown)}{'; ...' if len(problems) > 3 else ''} "
                f"(a cache driver needs only SELECT, INSERT, UPDATE, DELETE on {' and '.join(CACHE_TABLES)}; "
                "give the cache a dedicated account, as `image-cache db grants --mysql` prints it: "
                f"{' '.join(grant_statements('image_cache', database))})"
            )
            self._role = _ROLE_REFUSED
        raise self.error("access-denied", self._refusal)


class MysqlConnection:
    """One connection a driver opened (a guest resource): back to the pool
    when dropped healthy, out of it otherwise (a call stopped half-way, a
    lost server, a transaction still open)."""

    dialect = "mysql"

    def __init__(self, backend: MysqlBackend, session: Session):
        self.backend = backend
        self.session: Optional[Session] = session
        #: A transaction the server says is open: the connection is not
        #: given back to the pool like this.
        self.in_transaction = False

    def _call(self, sql: str, params: Sequence[Any], deadline: float, want_rows: bool):
        backend = self.backend
        try:
            policy.check(sql, "mysql")
        except policy.PolicyError as e:
            raise backend.error("access-denied", str(e)) from None
        s = self.session
        if s is None:
            raise backend.error("unavailable", "this connection was lost; open a new one")
        try:
            return self._statement(s, sql, params, deadline, want_rows)
        except DbError:
            raise
        except BaseException:
            # Stopped half-way for another reason (a host bug): the
            # connection's state is unknown, so it is not reused.
            s.drop()
            raise
        finally:
            if s.broken:
                self.session = None
                self.in_transaction = False
                backend.release(s, False)
            else:
                self.in_transaction = s.in_transaction()

    def _statement(self, s: Session, sql: str, params: Sequence[Any], deadline: float, want_rows: bool):
        backend = self.backend
        conn = s.conn
        if time.monotonic() >= deadline:
            raise timed_out()
        try:
            statement = bind(conn, sql, params)
        except _Count as e:
            raise backend.error("other", str(e)) from None
        except ValueError as e:
            raise backend.error("other", str(e)) from None
        except _NoBackslashEscapes:
            s.drop()
            raise backend.error(
                "unavailable", "the session lost NO_BACKSLASH_ESCAPES; the connection is dropped"
            ) from None
        cur = conn.cursor(pymysql.cursors.SSCursor)
        try:
            s.arm(deadline)
            cur.execute(statement)
            if cur.description is None:
                # No result set: rows changed (matched, with FOUND_ROWS).
                return [] if want_rows else max(0, cur.rowcount)
            fields = [(f.type_code, f.charsetnr) for f in cur._result.fields]
            rows: List[List[Any]] = []
            counted = 0
            nbytes = 0
            cap = backend.max_result_bytes
            error: Optional[DbError] = None
            while True:
                s.rearm(deadline)
                row = cur.fetchone()
                if row is None:
                    break
                counted += 1
                if error is not None or not want_rows:
                    # Read to the end, so the connection stays usable.
                    continue
                values = []
                for c, (raw, (field_type, charset)) in enumerate(zip(row, fields)):
                    try:
                        value = column_value(raw, field_type, charset)
                    except ValueError as why:
                        error = backend.error("other", f"column {c + 1}: {why}")
                        break
                    nbytes += value_size(value)
                    values.append(value)
                if error is not None:
                    rows.clear()
                    continue
                if nbytes > cap:
                    error = backend.error("limit-exceeded", f"query result exceeds {cap} bytes")
                    rows.clear()
                    continue
                rows.append(values)
            # The end of the result says whether a transaction is open.
            status = getattr(cur._result, "server_status", None)
            if status is not None:
                conn.server_status = status
            if error is not None:
                raise error
            return rows if want_rows else counted
        except _Deadline:
            self._stopped(s)
            raise timed_out() from None
        except pymysql.err.MySQLError as e:
            if _ran_out(e, deadline):
                self._stopped(s)
                raise timed_out() from None
            err = backend.client_error(e)
            if err.code == "unavailable" or not conn.open:
                s.drop()
            raise err from None
        except (OSError, RuntimeError, AssertionError, IndexError, ValueError) as e:
            # PyMySQL reading what it did not expect: the connection's
            # state is unknown.
            s.drop()
            raise backend.error("unavailable", str(e) or type(e).__name__) from None
        finally:
            if s.broken:
                # Never read the rest of a result from a dropped connection.
                cur.connection = None
            else:
                try:
                    cur.close()
                except Exception:  # noqa: BLE001
                    s.drop()

    def _stopped(self, s: Session) -> None:
        """Stopped at the deadline: the server stops too, and the connection
        goes."""
        s.drop()
        self.backend.kill_query_in_background(s.thread_id)

    # -- the interface ---------------------------------------------------------------

    def execute(self, sql: str, params: Sequence[Any], deadline: float) -> int:
        return self._call(sql, params, deadline, False)

    def query(self, sql: str, params: Sequence[Any], deadline: float) -> List[List[Any]]:
        return self._call(sql, params, deadline, True)

    def end_of_call(self, deadline: float) -> None:
        """The export call ended inside a transaction: roll it back (its
        locks go with it); if that fails, the connection is closed, which
        rolls back on the server."""
        s = self.session
        if not self.in_transaction or s is None:
            self.in_transaction = False
            return
        ok = False
        try:
            s.arm(deadline)
            s.conn.rollback()
            ok = not s.in_transaction()
        except Exception:  # noqa: BLE001 - _Deadline, PyMySQL's
            ok = False
        if not ok:
            s.drop()
            self.session = None
            self.backend.release(s, False)
        self.in_transaction = False

    def close(self) -> None:
        """Give the connection back (a transaction still open: closed
        instead, which rolls it back on the server)."""
        s, self.session = self.session, None
        if s is not None:
            self.backend.release(s, not self.in_transaction and not s.broken and not s.in_transaction())
        self.in_transaction = False
