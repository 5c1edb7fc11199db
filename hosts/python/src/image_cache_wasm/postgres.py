"""The ``database`` interface on PostgreSQL, with psycopg 3 (libpq).

A port of the Rust host's ``host/src/database/postgres.rs``. What the host
enforces, whatever the driver's SQL says:

- the driver names a database; the URL, host, port, user and password stay
  here and are scrubbed from every message the driver (or a user) sees;
- the database fences the driver by its own privileges: a role with
  anything beyond ``SELECT, INSERT, UPDATE, DELETE`` on Glance's two cache
  tables (and ``USAGE`` on their sequences) is refused at its first
  connection, with the SQL that makes a dedicated role
  (:func:`grant_statements`); the statement check (``policy.py``) stays as
  a second layer;
- parameters are converted to the types the server inferred for their
  ``$n`` (the statement is prepared and described first, then cached per
  connection), and a value that does not fit is refused before anything
  is sent;
- results are capped in bytes (rows arrive in chunks, the cap is checked
  as they come); the pool's size caps the connections;
- every call ends by the driver call's deadline: the host drives libpq
  non-blocking and waits on the socket itself, so checkout, prepare,
  execute and rows all stop there (``timed-out``); a statement still
  running then is cancelled on the server and its connection is dropped;
- every session has ``statement_timeout``, ``lock_timeout`` and
  ``idle_in_transaction_session_timeout`` set at connect (``options=-c
  ...``), so the server ends what the host stopped waiting for.

TLS is libpq's own: ``sslmode``, ``sslrootcert``, ``sslcert``, ``sslkey``
in the URL mean exactly what they mean to libpq and psycopg2 (Glance's
driver). ``client_encoding=utf8`` is accepted; another encoding is refused
(the host speaks UTF-8).

The pool is the host's own (a bounded list of idle connections, connected
on demand in the calling thread): psycopg_pool connects in background
threads and retries a refused connection until the checkout times out, so
a database that is down would cost every call its whole deadline and hide
why; here a refused connection is ``unavailable`` at once, with the
server's reason, as in the Rust host.
"""

from __future__ import annotations

import logging
import math
import re
import select
import struct
import threading
import time
import urllib.parse
from decimal import Decimal
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

try:
    import psycopg
    from psycopg import pq
    from psycopg.conninfo import conninfo_to_dict
except ImportError as _e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "the PostgreSQL backend needs psycopg 3: pip install 'image_cache_wasm[centralized]'"
    ) from _e

from .database import DbError, Pool as _Pool, timed_out, value_size  # noqa: F401 - value_size is ours too
from .errors import quoted
from . import policy

log = logging.getLogger("image_cache_wasm")

#: Prepared statements one connection keeps before its cache is emptied (a
#: driver sending endless distinct SQL must not grow it forever).
MAX_CACHED_STATEMENTS = 256
#: Rows per chunk of a result (libpq's chunked rows mode).
CHUNK_ROWS = 256
#: How long a cancel request may take (it runs in the background).
CANCEL_TIMEOUT = 5.0

#: Glance's two cache tables as its migrations create them on PostgreSQL
#: (the 2024.1 ``cache`` migration, as SQLAlchemy emits it). Drivers never
#: create them: Glance's ``glance-manage db sync`` does.
GLANCE_CACHE_SCHEMA = """\
CREATE TABLE IF NOT EXISTS node_reference (
    node_reference_id BIGSERIAL NOT NULL,
    node_reference_url VARCHAR(255) NOT NULL,
    PRIMARY KEY (node_reference_id),
    CONSTRAINT uq_node_reference_node_reference_url UNIQUE (node_reference_url)
);
CREATE TABLE IF NOT EXISTS cached_images (
    id BIGSERIAL NOT NULL,
    image_id VARCHAR(36) NOT NULL,
    last_accessed TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    last_modified TIMESTAMP WITHOUT TIME ZONE NOT NULL,
    size BIGINT NOT NULL,
    hits INTEGER NOT NULL,
    checksum VARCHAR(32),
    node_reference_id BIGINT NOT NULL,
    PRIMARY KEY (id),
    FOREIGN KEY(node_reference_id) REFERENCES node_reference (node_reference_id),
    CONSTRAINT ix_cached_images_image_id_node_reference_id UNIQUE (image_id, node_reference_id)
);
"""

#: The tables a cache driver's role may read and write, and nothing else.
CACHE_TABLES = ("cached_images", "node_reference")
#: Their sequences (``BIGSERIAL``), which inserts need ``USAGE`` on.
CACHE_SEQUENCES = ("cached_images_id_seq", "node_reference_node_reference_id_seq")
#: The DML a cache driver's role needs on :data:`CACHE_TABLES`.
TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")
#: Predefined roles that reach beyond the cache tables.
POWERFUL_ROLES = (
    "pg_read_server_files",
    "pg_write_server_files",
    "pg_execute_server_program",
    "pg_signal_backend",
    "pg_read_all_data",
    "pg_write_all_data",
    "pg_read_all_settings",
    "pg_read_all_stats",
    "pg_monitor",
    "pg_checkpoint",
    "pg_create_subscription",
    "pg_maintain",
    "pg_use_reserved_connections",
    "pg_signal_autovacuum_worker",
)


def ident(name: str) -> str:
    """An SQL identifier, quoted unless it is a plain lowercase name."""
    plain = (
        name != ""
        and all(c.isascii() and (c.islower() or c.isdigit() or c == "_") for c in name)
        and not name[0].isdigit()
    )
    return name if plain else '"' + name.replace('"', '""') + '"'


def grant_statements(role: str, database: str) -> List[str]:
    """The SQL an administrator runs (in ``database``, as the owner of
    Glance's tables) to give the cache's role exactly the privileges a
    driver needs: DML on the two cache tables, ``USAGE`` on their
    sequences. The last statement closes what PostgreSQL before 15 grants
    everyone. (The Rust host's ``grant_statements``, ``image-cache db
    grants``.)"""
    role, database = ident(role), ident(database)
    return [
        f"GRANT CONNECT ON DATABASE {database} TO {role};",
        f"GRANT USAGE ON SCHEMA public TO {role};",
        f"GRANT {', '.join(TABLE_PRIVILEGES)} ON {', '.join(CACHE_TABLES)} TO {role};",
        f"GRANT USAGE ON SEQUENCE {', '.join(CACHE_SEQUENCES)} TO {role};",
        "REVOKE CREATE ON SCHEMA public FROM PUBLIC;",
    ]


def libpq_url(url: str) -> str:
    """A SQLAlchemy database URL (``postgresql+psycopg2://...``) as a libpq
    one; a libpq URL or key=value string as it is. Errors never contain the
    URL."""
    url = url.strip()
    if "://" not in url:
        # libpq's key=value form (`host=/run/postgresql dbname=glance`).
        if "=" in url:
            return url
        raise ValueError("the database connection is not a URL (postgresql://user:password@host/db)")
    scheme, rest = url.split("://", 1)
    dialect = scheme.split("+", 1)[0]
    if dialect in ("postgresql", "postgres"):
        return f"postgresql://{rest}"
    raise ValueError(
        f"the database connection is a {quoted(dialect)} URL; the centralized driver needs "
        "PostgreSQL (postgresql://...)"
    )


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# -- type OIDs -------------------------------------------------------------------

BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
FLOAT4, FLOAT8, UNKNOWN, BPCHAR, VARCHAR = 700, 701, 705, 1042, 1043
TIMESTAMP, TIMESTAMPTZ, NUMERIC = 1114, 1184, 1700

_TYPE_NAMES = {
    16: "bool", 17: "bytea", 18: "char", 19: "name", 20: "int8", 21: "int2", 23: "int4",
    25: "text", 26: "oid", 114: "json", 142: "xml", 600: "point", 650: "cidr", 700: "float4",
    701: "float8", 705: "unknown", 790: "money", 829: "macaddr", 869: "inet", 1042: "bpchar",
    1043: "varchar", 1082: "date", 1083: "time", 1114: "timestamp", 1184: "timestamptz",
    1186: "interval", 1266: "timetz", 1560: "bit", 1562: "varbit", 1700: "numeric",
    2950: "uuid", 3802: "jsonb", 1000: "_bool", 1001: "_bytea", 1005: "_int2", 1007: "_int4",
    1009: "_text", 1015: "_varchar", 1016: "_int8", 1021: "_float4", 1022: "_float8",
    1115: "_timestamp", 1185: "_timestamptz", 1231: "_numeric", 2951: "_uuid",
}


def type_name(oid: int) -> str:
    return _TYPE_NAMES.get(oid, f"type {oid}")


#: Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
_PG_EPOCH_US = 946_684_800 * 1_000_000
#: Integers a `real` carries exactly.
EXACT_FLOAT_INT = 1 << 53
_I64_MAX = (1 << 63) - 1
_I64_MIN = -(1 << 63)
_F32_MAX = 3.4028234663852886e38


def _rust_float(x: float) -> str:
    """A float as Rust's ``{}`` prints it (for the same messages)."""
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == int(x):
        return str(int(x))
    return repr(x)


def _given(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int):
        return "an integer"
    if isinstance(v, float):
        return "a real"
    if isinstance(v, str):
        return "text"
    return "a blob"


def convert_param(v: Any, oid: int) -> Optional[bytes]:
    """A guest value (None, bool, int, float, str, bytes) in PostgreSQL's
    binary format for the type the server inferred for its ``$n``; a value
    that does not fit raises ValueError saying why (as the Rust host's
    ``Param::convert``)."""
    if v is None:
        return None

    def mismatch() -> ValueError:
        return ValueError(f"the server expects {type_name(oid)}, not {_given(v)}")

    def out_of_range(i: int) -> ValueError:
        return ValueError(f"{i} does not fit in {type_name(oid)}")

    if isinstance(v, bool):
        if oid == BOOL:
            return b"\x01" if v else b"\x00"
        raise mismatch()
    if isinstance(v, int):
        if oid == INT2:
            if not -(1 << 15) <= v < (1 << 15):
                raise out_of_range(v)
            return struct.pack(">h", v)
        if oid == INT4:
            if not -(1 << 31) <= v < (1 << 31):
                raise out_of_range(v)
            return struct.pack(">i", v)
        if oid == INT8:
            return struct.pack(">q", v)
        if oid in (FLOAT4, FLOAT8) and abs(v) <= EXACT_FLOAT_INT:
            return struct.pack(">f" if oid == FLOAT4 else ">d", float(v))
        if oid in (TIMESTAMP, TIMESTAMPTZ):
            return _timestamp(float(v))
        raise mismatch()
    if isinstance(v, float):
        if oid == FLOAT8:
            return struct.pack(">d", v)
        if oid == FLOAT4:
            # As Rust's `as f32`: out of range saturates to infinity.
            if math.isfinite(v) and abs(v) > _F32_MAX:
                v = math.copysign(math.inf, v)
            return struct.pack(">f", v)
        if oid in (TIMESTAMP, TIMESTAMPTZ):
            return _timestamp(v)
        raise mismatch()
    if isinstance(v, str):
        if oid in (TEXT, VARCHAR, BPCHAR, NAME):
            return v.encode("utf-8", "surrogatepass")
        raise mismatch()
    if isinstance(v, (bytes, bytearray, memoryview)):
        if oid == BYTEA:
            return bytes(v)
        raise mismatch()
    raise mismatch()


def _timestamp(seconds: float) -> bytes:
    """Unix seconds (naive UTC for ``TIMESTAMP``) within years 1 to 9999,
    as PostgreSQL's binary timestamp (microseconds since 2000-01-01)."""
    if not math.isfinite(seconds) or not -62_135_596_800.0 <= seconds <= 253_402_300_799.0:
        raise ValueError(f"{_rust_float(seconds)} is not a time (Unix seconds) the server can store")
    return struct.pack(">q", round(seconds * 1_000_000) - _PG_EPOCH_US)


def _numeric(raw: bytes) -> float:
    """A binary ``numeric`` as the nearest float."""
    if len(raw) < 8:
        raise ValueError("short numeric")
    ndigits, weight, sign, _dscale = struct.unpack_from(">HhHH", raw)
    if sign == 0xC000:
        return math.nan
    if sign == 0xD000:
        return math.inf
    if sign == 0xF000:
        return -math.inf
    if len(raw) < 8 + 2 * ndigits:
        raise ValueError("short numeric")
    digits = struct.unpack_from(f">{ndigits}H", raw, 8)
    value = 0
    for d in digits:
        value = value * 10_000 + d
    exponent = 4 * (weight - ndigits + 1)
    result = float(Decimal(value).scaleb(exponent))
    return -result if sign == 0x4000 else result


def _unix_seconds(raw: bytes) -> float:
    (us,) = struct.unpack(">q", raw)
    if us == _I64_MAX:
        return math.inf
    if us == _I64_MIN:
        return -math.inf
    return (us + _PG_EPOCH_US) / 1_000_000


def _column_reader(oid: int) -> Optional[Callable[[bytes], Any]]:
    """How a binary column value of type ``oid`` becomes a guest value, or
    None for a type the interface does not carry."""
    if oid == BOOL:
        return lambda b: b != b"\x00"
    if oid == INT2:
        return lambda b: struct.unpack(">h", b)[0]
    if oid == INT4:
        return lambda b: struct.unpack(">i", b)[0]
    if oid == INT8:
        return lambda b: struct.unpack(">q", b)[0]
    if oid == OID:
        return lambda b: struct.unpack(">I", b)[0]
    if oid == FLOAT4:
        return lambda b: struct.unpack(">f", b)[0]
    if oid == FLOAT8:
        return lambda b: struct.unpack(">d", b)[0]
    if oid == NUMERIC:
        return _numeric
    if oid in (TEXT, VARCHAR, BPCHAR, NAME, UNKNOWN):
        return lambda b: b.decode("utf-8")
    if oid == BYTEA:
        return bytes
    if oid in (TIMESTAMP, TIMESTAMPTZ):
        return _unix_seconds
    return None


class _Deadline(Exception):
    """The call's deadline passed while waiting on the server."""


_OK = pq.ExecStatus
_TX = pq.TransactionStatus
#: libpq 17's chunked rows and non-blocking cancel (psycopg[binary] ships it).
_CHUNKED = psycopg.capabilities.has_stream_chunked()
_CANCEL_CONN = psycopg.capabilities.has_cancel_safe()


class Session:
    """One server connection (psycopg's, driven at libpq level): its
    socket, its prepared statements, whether it may go back to the pool."""

    def __init__(self, conn: "psycopg.Connection"):
        self.conn = conn
        self.pgconn = conn.pgconn
        self.pgconn.nonblocking = 1
        self.fd = self.pgconn.socket
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)
        #: sql -> (statement name, parameter types, column types)
        self.statements: Dict[str, Tuple[bytes, Tuple[int, ...], Tuple[int, ...]]] = {}
        self.next_statement = 0
        #: Set when a call stopped half-way or the server went: never reused.
        self.broken = False

    # -- liveness ------------------------------------------------------------------

    def usable(self) -> bool:
        """Whether an idle connection can be handed out: open, outside a
        transaction, and its socket not closed by the server meanwhile."""
        if self.broken or self.conn.closed or self.pgconn.status != pq.ConnStatus.OK:
            return False
        if self.pgconn.transaction_status != _TX.IDLE:
            return False
        try:
            if self.poller.poll(0):
                self.pgconn.consume_input()
                while self.pgconn.notifies() is not None:
                    pass
        except psycopg.Error:
            return False
        return self.pgconn.status == pq.ConnStatus.OK

    def in_transaction(self) -> bool:
        return self.pgconn.transaction_status in (_TX.INTRANS, _TX.INERROR)

    def close(self) -> None:
        self.broken = True
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass

    # -- waiting -----------------------------------------------------------------------

    def _wait(self, deadline: float, write: bool) -> int:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline()
        mask = select.POLLIN | (select.POLLOUT if write else 0)
        self.poller.modify(self.fd, mask)
        events = self.poller.poll(max(1, math.ceil(remaining * 1000)))
        if not events:
            if time.monotonic() >= deadline:
                raise _Deadline()
            return 0
        return events[0][1]

    def results(self, deadline: float, send: Callable[[], None], chunked: bool = False):
        """Send one command (``send`` calls a ``pgconn.send_*``) and yield
        every result it produces, waiting on the socket no longer than
        ``deadline``. Raises :class:`_Deadline` or ``psycopg.Error``."""
        pg = self.pgconn
        send()
        if chunked:
            if _CHUNKED:
                pg.set_chunked_rows_mode(CHUNK_ROWS)
            else:  # libpq before 17: one row at a time, still bounded
                pg.set_single_row_mode()
        while pg.flush() != 0:
            if self._wait(deadline, True) & (select.POLLIN | select.POLLHUP | select.POLLERR):
                pg.consume_input()
        while True:
            while pg.is_busy():
                self._wait(deadline, False)
                pg.consume_input()
            res = pg.get_result()
            if res is None:
                return
            if res.status in (_OK.COPY_IN, _OK.COPY_OUT, _OK.COPY_BOTH):
                # Never sent by a checked statement; nothing to do with it.
                self.broken = True
                raise psycopg.OperationalError("the server started a COPY")
            yield res

    def cancel_in_background(self) -> None:
        """Ask the server to stop this connection's statement (a cancel
        request on a connection of its own, over the same TLS settings),
        without waiting for it."""
        try:
            if _CANCEL_CONN:
                cancel, send = self.pgconn.cancel_conn(), _send_cancel
            else:  # libpq before 17: the classic blocking cancel request
                cancel, send = self.pgconn.get_cancel(), _send_legacy_cancel
        except Exception:  # noqa: BLE001 - nothing to cancel with
            return
        threading.Thread(target=send, args=(cancel,), name="image-cache-db-cancel", daemon=True).start()


def _send_legacy_cancel(cancel) -> None:
    try:
        cancel.cancel()
    except Exception as e:  # noqa: BLE001 - best effort
        log.debug("database cancel request failed: %s", e)


def _send_cancel(cancel) -> None:
    deadline = time.monotonic() + CANCEL_TIMEOUT
    try:
        cancel.start()
        poller = select.poll()
        while True:
            status = cancel.poll()
            if status in (pq.PollingStatus.OK, pq.PollingStatus.FAILED):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            fd = cancel.socket
            mask = select.POLLOUT if status == pq.PollingStatus.WRITING else select.POLLIN
            try:
                poller.unregister(fd)
            except KeyError:
                pass
            poller.register(fd, mask)
            poller.poll(max(1, math.ceil(remaining * 1000)))
    except Exception as e:  # noqa: BLE001 - best effort
        log.debug("database cancel request failed: %s", e)
    finally:
        try:
            cancel.finish()
        except Exception:  # noqa: BLE001
            pass


_ROLE_UNCHECKED, _ROLE_OK, _ROLE_REFUSED = 0, 1, 2

_PORT = re.compile(r"\bport \d+")
_SOCKET = re.compile(r"\.s\.PGSQL\.\d+")


class PostgresBackend:
    """A PostgreSQL database a driver may open by ``name``. Nothing is
    connected until a driver opens it."""

    dialect = "postgresql"

    def __init__(self, name: str, settings) -> None:
        self.name = name
        raw_url = settings.url.strip()
        try:
            url = libpq_url(raw_url)
        except ValueError as e:
            raise ValueError(f"the connection URL of database {quoted(name)}: {e}") from None
        try:
            params = conninfo_to_dict(url)
        except Exception:  # noqa: BLE001 - its message may show the URL
            raise ValueError(
                f"the connection URL of database {quoted(name)} is not a valid PostgreSQL URL"
            ) from None
        mode = params.get("sslmode")
        if mode is not None and mode not in _SSLMODES:
            raise ValueError(
                f"the connection URL of database {quoted(name)}: sslmode={quoted(str(mode))} is not "
                "one of disable, allow, prefer, require, verify-ca, verify-full"
            )
        encoding = params.get("client_encoding")
        if encoding is not None and str(encoding).lower().replace("-", "").replace("_", "") not in ("utf8", "unicode"):
            raise ValueError(
                f"the connection URL of database {quoted(name)}: client_encoding={quoted(str(encoding))}: "
                "the cache speaks UTF8 only"
            )
        secrets = {raw_url, url}
        if params.get("password"):
            secrets.add(str(params["password"]))
        for key in ("host", "hostaddr"):
            for h in str(params.get(key) or "").split(","):
                secrets.add(h.strip())
        try:
            encoded = urllib.parse.urlsplit(url).password if "://" in url else None
        except ValueError:
            encoded = None
        if encoded:
            secrets.add(encoded)
        # Longest first, so the URL goes before its parts.
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self._url = url
        self._url_options = str(params.get("options") or "")
        self.pool_size = max(1, int(settings.pool_size))
        self.connect_timeout = float(settings.connect_timeout)
        self.statement_timeout: Optional[float] = settings.statement_timeout
        self.max_result_bytes = int(settings.max_result_bytes)
        self.allow_privileged_role = bool(settings.allow_privileged_role)
        self._pool = _Pool(self.pool_size, self._connect)
        self._role = _ROLE_UNCHECKED
        self._refusal = ""
        self._role_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresBackend({quoted(self.name)}, pool_size={self.pool_size})"

    # -- messages ------------------------------------------------------------------

    def scrub(self, message: str) -> str:
        """``message`` without any secret (URL, password, hosts, ports)."""
        for s in self.secrets:
            if s in message:
                message = message.replace(s, "(hidden)")
        message = _PORT.sub("port (hidden)", message)
        message = _SOCKET.sub(".s.PGSQL.(hidden)", message)
        return " ".join(message.split())

    def error(self, code: str, message: str) -> DbError:
        return DbError(code, f"database {quoted(self.name)}: {self.scrub(message)}")

    def server_error(self, res) -> DbError:
        """A server's error result in the driver's terms (the Rust host's
        ``client_error``): the SQLSTATE decides the code, the message is
        ``ERROR (42P01): ...``."""
        state = _field(res, pq.DiagnosticField.SQLSTATE)
        severity = _field(res, pq.DiagnosticField.SEVERITY_NONLOCALIZED) or _field(
            res, pq.DiagnosticField.SEVERITY
        ) or "ERROR"
        message = _field(res, pq.DiagnosticField.MESSAGE_PRIMARY) or _text(res.error_message)
        return self.error(sqlstate_code(state), f"{severity} ({state}): {message}")

    def lost(self, e: BaseException) -> DbError:
        """No answer from the server: refused, reset, closed."""
        return self.error("unavailable", str(e) or type(e).__name__)

    # -- connections ---------------------------------------------------------------------

    def _options(self) -> str:
        timeout = self.statement_timeout if self.statement_timeout is not None else 30.0
        ms = max(1, int(round(timeout * 1000)))
        ours = f"-c statement_timeout={ms} -c lock_timeout={ms} -c idle_in_transaction_session_timeout={ms}"
        return f"{self._url_options} {ours}".strip()

    def _connect(self, deadline: float) -> Session:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise timed_out()
        # libpq counts whole seconds, at least 2.
        timeout = max(2, math.ceil(min(self.connect_timeout, remaining)))
        try:
            conn = psycopg.Connection.connect(
                self._url,
                autocommit=True,
                connect_timeout=timeout,
                options=self._options(),
                application_name="image-cache",
                client_encoding="UTF8",
                keepalives=1,
                keepalives_idle=30,
            )
        except psycopg.Error as e:
            if time.monotonic() >= deadline:
                raise timed_out() from None
            raise self.lost(e) from None
        return Session(conn)

    def pool_status(self) -> Tuple[int, int]:
        """Connections the pool holds now, and at most."""
        return self._pool.status()

    def checkout(self, deadline: float) -> Session:
        """A connection by ``deadline``, the role checked once per backend."""
        s = self._pool.get(deadline)
        if self._role == _ROLE_OK:
            return s
        if self._role == _ROLE_REFUSED:
            self._pool.put(s, True)
            raise self.error("access-denied", self._refusal)
        try:
            self._check_role(s, deadline)
        except BaseException:
            self._pool.put(s, not s.broken)
            raise
        return s

    def release(self, s: Session, healthy: bool) -> None:
        self._pool.put(s, healthy)

    def close(self) -> None:
        self._pool.close()

    def connect(self, deadline: float) -> "PostgresConnection":
        return PostgresConnection(self, self.checkout(deadline))

    # -- host statements -------------------------------------------------------------

    def _host_query(self, s: Session, sql: str, deadline: float) -> List[List[Any]]:
        """A catalog query of the host's own (not checked by the policy):
        its rows, binary results converted as for a driver."""
        rows: List[List[Any]] = []
        error: Optional[DbError] = None
        try:
            for res in s.results(
                deadline, lambda: s.pgconn.send_query_params(sql.encode(), None, result_format=1)
            ):
                if res.status == _OK.FATAL_ERROR:
                    error = error or self.server_error(res)
                elif res.status == _OK.TUPLES_OK:
                    readers = [_column_reader(res.ftype(i)) for i in range(res.nfields)]
                    for r in range(res.ntuples):
                        row = []
                        for c, read in enumerate(readers):
                            raw = res.get_value(r, c)
                            row.append(None if raw is None or read is None else read(raw))
                        rows.append(row)
        except _Deadline:
            s.cancel_in_background()
            s.broken = True
            raise timed_out() from None
        except psycopg.Error as e:
            s.broken = True
            raise self.lost(e) from None
        if error is not None:
            raise error
        return rows

    def privilege_problems(self, s: Session, deadline: float) -> List[str]:
        """Everything the connected role may do beyond a cache driver's
        needs, read from the catalogs; empty when it is fenced as it should
        be (the Rust host's ``privilege_problems``, the same queries)."""

        def q(sql: str) -> List[List[Any]]:
            return self._host_query(s, sql, deadline)

        def first_texts(rows) -> str:
            return ", ".join(str(r[0]) for r in rows if r and r[0] is not None)

        problems: List[str] = []
        attributes = q(
            "SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, "
            "rolbypassrls FROM pg_roles WHERE rolname = current_user"
        )
        if attributes:
            row = attributes[0]
            for i, what in enumerate([
                "is a superuser",
                "may create roles (CREATEROLE)",
                "may create databases (CREATEDB)",
                "may replicate (REPLICATION)",
                "bypasses row security (BYPASSRLS)",
            ]):
                if row[i] is not False:
                    problems.append(what)
            # A superuser may do everything; the rest would only be noise.
            if row[0] is not False:
                return problems
        listed = ", ".join(f"'{r}'" for r in POWERFUL_ROLES)
        powerful = q(
            f"SELECT rolname::text FROM pg_roles WHERE rolname = ANY(ARRAY[{listed}]::name[]) "
            "AND pg_has_role(current_user, oid, 'MEMBER') ORDER BY rolname"
        )
        if powerful:
            problems.append(f"is a member of {first_texts(powerful)}")
        # A role it may become (SET ROLE) with powers of its own.
        mighty = q(
            "SELECT r.rolname::text FROM pg_roles r "
            "WHERE pg_has_role(current_user, r.oid, 'MEMBER') AND r.rolname <> current_user "
            "AND (r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication "
            "OR r.rolbypassrls) ORDER BY 1 LIMIT 6"
        )
        if mighty:
            problems.append(f"is a member of a role with role attributes ({first_texts(mighty)})")
        owned = q(
            "SELECT kind || ' ' || name FROM ( "
            "SELECT 'database' AS kind, datname::text AS name, datdba AS owner "
            "FROM pg_database WHERE datname = current_database() "
            "UNION ALL SELECT 'schema', nspname::text, nspowner FROM pg_namespace "
            "UNION ALL SELECT 'relation', c.relname::text, c.relowner FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "UNION ALL SELECT 'function', p.proname::text, p.proowner FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
            ") o WHERE pg_has_role(current_user, owner, 'MEMBER') ORDER BY 1 LIMIT 6"
        )
        if owned:
            problems.append(f"owns {first_texts(owned)}")
        creates = q(
            "SELECT nspname::text FROM pg_namespace "
            "WHERE has_schema_privilege(current_user, oid, 'CREATE') ORDER BY 1 LIMIT 6"
        )
        if creates:
            problems.append(f"may create objects in schema {first_texts(creates)}")
        db_create = q("SELECT has_database_privilege(current_database(), 'CREATE')")
        if db_create and db_create[0][0] is not False:
            problems.append("may create schemas in the database (CREATE)")
        # Every table privilege on every relation, against what a driver
        # needs on the two cache tables.
        grants = q(
            "SELECT c.relname::text, c.relkind::text, p.priv FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN unnest(ARRAY['SELECT','INSERT','UPDATE','DELETE','TRUNCATE', "
            "'REFERENCES','TRIGGER']) AS p(priv) "
            "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg\\_%' "
            "AND (has_table_privilege(current_user, c.oid, p.priv) "
            "OR (p.priv IN ('SELECT','INSERT','UPDATE','REFERENCES') "
            "AND has_any_column_privilege(current_user, c.oid, p.priv))) "
            "AND NOT has_table_privilege('public', c.oid, p.priv) "
            "UNION ALL SELECT c.relname::text, 'S', p.priv FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "CROSS JOIN unnest(ARRAY['USAGE','SELECT','UPDATE']) AS p(priv) "
            "WHERE c.relkind = 'S' "
            "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND has_sequence_privilege(current_user, c.oid, p.priv) "
            "ORDER BY 1, 3"
        )
        extra: List[str] = []
        held: List[Tuple[str, str]] = []
        for row in grants:
            table, kind, privilege = row
            if not all(isinstance(x, str) for x in row):
                continue
            if kind == "S":
                needed = table in CACHE_SEQUENCES and privilege == "USAGE"
            else:
                needed = table in CACHE_TABLES and privilege in TABLE_PRIVILEGES
            if needed:
                held.append((table, privilege))
            else:
                extra.append(f"{privilege} on {table}")
        if extra:
            shown = extra[:8]
            problems.append(f"holds {', '.join(shown)}{', ...' if len(extra) > len(shown) else ''}")
        missing = [
            f"{p} on {t}" for t in CACHE_TABLES for p in TABLE_PRIVILEGES if (t, p) not in held
        ]
        if missing and not problems:
            # Too little is not a danger; it fails at the first statement,
            # but say so now, with the same remedy.
            log.warning("database %s: the role lacks %s", quoted(self.name), ", ".join(missing))
        return problems

    def _check_role(self, s: Session, deadline: float) -> None:
        problems = self.privilege_problems(s, deadline)
        with self._role_lock:
            if not problems:
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
        try:
            rows = self._host_query(s, "SELECT current_database()::text", deadline)
            database = rows[0][0] if rows and isinstance(rows[0][0], str) else "glance"
        except DbError:
            database = "glance"
        shown = problems[:3]
        with self._role_lock:
            self._refusal = (
                f"refused: the configured role {'; '.join(shown)}{'; ...' if len(problems) > 3 else ''} "
                f"(a cache driver needs only SELECT, INSERT, UPDATE, DELETE on {' and '.join(CACHE_TABLES)} "
                "and USAGE on their sequences; give the cache a dedicated role, as `image-cache db grants` "
                f"prints it: {' '.join(grant_statements('image_cache', database))})"
            )
            self._role = _ROLE_REFUSED
        raise self.error("access-denied", self._refusal)


def _text(b) -> str:
    if b is None:
        return ""
    if isinstance(b, bytes):
        return b.decode("utf-8", "replace")
    return str(b)


def _field(res, field) -> Optional[str]:
    value = res.error_field(field)
    return None if value is None else _text(value)


def sqlstate_code(state: Optional[str]) -> str:
    """A server's SQLSTATE as the interface's error code (the Rust host's
    ``client_error``)."""
    s = state or ""
    if s.startswith("23"):
        return "constraint"
    if s in ("57014", "55P03"):
        return "timed-out"
    if s == "42501":
        return "access-denied"
    if s.startswith(("08", "57P", "28")) or s in ("53300", "3D000"):
        return "unavailable"
    if s.startswith("54"):
        return "limit-exceeded"
    return "other"


class PostgresConnection:
    """One connection a driver opened (a guest resource): back to the pool
    when dropped healthy, out of it otherwise (a call stopped half-way, a
    lost server, a transaction still open)."""

    dialect = "postgresql"

    def __init__(self, backend: PostgresBackend, session: Session):
        self.backend = backend
        self.session: Optional[Session] = session
        #: A `BEGIN` without its end yet: the connection is not given back
        #: to the pool like this.
        self.in_transaction = False

    def _call(self, sql: str, params: Sequence[Any], deadline: float, want_rows: bool):
        backend = self.backend
        try:
            policy.check(sql)
        except policy.PolicyError as e:
            raise backend.error("access-denied", str(e)) from None
        s = self.session
        if s is None:
            raise backend.error("unavailable", "this connection was lost; open a new one")
        try:
            return self._statement(s, sql, list(params), deadline, want_rows)
        except DbError:
            raise
        except BaseException:
            # Stopped half-way for another reason (a host bug): the
            # connection's state is unknown, so it is not reused.
            s.broken = True
            raise
        finally:
            if s.broken:
                self.session = None
                self.in_transaction = False
                backend.release(s, False)
            else:
                self.in_transaction = s.in_transaction()

    def _statement(self, s: Session, sql: str, params: List[Any], deadline: float, want_rows: bool):
        backend = self.backend
        pg = s.pgconn
        try:
            prepared = s.statements.get(sql)
            if prepared is None:
                prepared = self._prepare(s, sql, deadline)
            name, types, columns = prepared
            if len(types) != len(params):
                raise backend.error(
                    "other",
                    f"the statement has {len(types)} parameters, {len(params)} values were given",
                )
            values: List[Optional[bytes]] = []
            for i, (v, oid) in enumerate(zip(params, types)):
                try:
                    values.append(convert_param(v, oid))
                except ValueError as why:
                    raise backend.error("other", f"parameter ${i + 1}: {why}") from None
            readers = [_column_reader(oid) for oid in columns]
            rows: List[List[Any]] = []
            nbytes = 0
            count: Optional[int] = None
            counted = 0
            error: Optional[DbError] = None
            for res in s.results(
                deadline,
                lambda: pg.send_query_prepared(name, values, param_formats=[1] * len(values), result_format=1),
                chunked=True,
            ):
                status = res.status
                if status in (_OK.TUPLES_CHUNK, _OK.SINGLE_TUPLE, _OK.TUPLES_OK):
                    n = res.ntuples
                    counted += n
                    if want_rows and error is None and n:
                        error, nbytes = self._rows(res, readers, columns, rows, nbytes)
                    if status == _OK.TUPLES_OK:
                        count = res.command_tuples
                elif status == _OK.COMMAND_OK:
                    count = res.command_tuples
                elif status in (_OK.FATAL_ERROR, _OK.BAD_RESPONSE):
                    error = error or backend.server_error(res)
            if error is not None:
                raise error
            if want_rows:
                return rows
            return count if count is not None else counted
        except _Deadline:
            # Stopped at the deadline: the server stops too.
            s.cancel_in_background()
            s.broken = True
            raise timed_out() from None
        except psycopg.Error as e:
            s.broken = True
            raise backend.lost(e) from None

    def _rows(self, res, readers, columns, rows, nbytes) -> Tuple[Optional[DbError], int]:
        """Convert one chunk of rows; an error (a type the interface does
        not carry, the cap) stops the conversion, and the rest of the
        result is drained unread."""
        backend = self.backend
        cap = backend.max_result_bytes
        nfields = len(readers)
        for r in range(res.ntuples):
            row = []
            for c in range(nfields):
                raw = res.get_value(r, c)
                if raw is None:
                    value = None
                else:
                    read = readers[c]
                    if read is None:
                        return backend.error(
                            "other",
                            f"column {c + 1}: its type {type_name(columns[c])} is not one this "
                            "interface carries; cast it (::text, ::float8, ...)",
                        ), nbytes
                    try:
                        value = read(raw)
                    except (ValueError, struct.error, UnicodeDecodeError) as why:
                        return backend.error("other", f"column {c + 1}: {why}"), nbytes
                nbytes += value_size(value)
                if nbytes > cap:
                    return backend.error("limit-exceeded", f"query result exceeds {cap} bytes"), nbytes
                row.append(value)
            rows.append(row)
        return None, nbytes

    def _prepare(self, s: Session, sql: str, deadline: float):
        backend = self.backend
        pg = s.pgconn
        if len(s.statements) >= MAX_CACHED_STATEMENTS:
            self._forget_statements(s, deadline)
        s.next_statement += 1
        name = f"image_cache_{s.next_statement}".encode()
        error: Optional[DbError] = None
        for res in s.results(deadline, lambda: pg.send_prepare(name, sql.encode("utf-8", "surrogatepass"))):
            if res.status == _OK.FATAL_ERROR:
                error = error or backend.server_error(res)
        if error is not None:
            raise error
        types: Tuple[int, ...] = ()
        columns: Tuple[int, ...] = ()
        for res in s.results(deadline, lambda: pg.send_describe_prepared(name)):
            if res.status == _OK.FATAL_ERROR:
                error = error or backend.server_error(res)
            else:
                types = tuple(res.param_type(i) for i in range(res.nparams))
                columns = tuple(res.ftype(i) for i in range(res.nfields))
        if error is not None:
            raise error
        prepared = (name, types, columns)
        s.statements[sql] = prepared
        return prepared

    def _forget_statements(self, s: Session, deadline: float) -> None:
        failed = False
        for res in s.results(deadline, lambda: s.pgconn.send_query(b"DEALLOCATE ALL")):
            failed = failed or res.status == _OK.FATAL_ERROR
        if not failed:
            s.statements.clear()

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
            failed = False
            for res in s.results(deadline, lambda: s.pgconn.send_query(b"ROLLBACK")):
                failed = failed or res.status == _OK.FATAL_ERROR
            ok = not failed and not s.in_transaction()
        except (_Deadline, psycopg.Error):
            ok = False
        if not ok:
            s.broken = True
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
