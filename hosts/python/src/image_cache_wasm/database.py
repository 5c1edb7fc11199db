"""``image-cache:driver/database``: shared SQL databases the operator
configured, opened by name (as the Rust host's ``host/src/database.rs``).

The guest names a database; the host maps the name to a configured
backend. A name that is not configured is ``access-denied``, and the guest
never learns a host name, a connection string or a password.

- ``postgres.py``: the PostgreSQL backend (pool, deadlines, typed
  parameters, role checks, scrubbed errors), on psycopg 3;
- ``mysql.py``: the same for MySQL and MariaDB, on PyMySQL (both in the
  ``centralized`` extra: ``pip install 'image_cache_wasm[centralized]'``);
- ``policy.py``: what a driver's SQL may say, checked before it is sent.

    from image_cache_wasm import DatabaseRoot, DatabaseSettings, ImageCache

    databases = DatabaseRoot().with_database(
        "glance", DatabaseSettings("postgresql://image_cache:PW@db.example/glance?sslmode=verify-full"))
    # or DatabaseSettings("mysql+pymysql://image_cache:PW@db.example/glance?ssl_ca=/etc/ssl/db-ca.pem")
    cache = ImageCache(root, driver="centralized", databases=databases,
                       options=[("worker_self_reference_url", "http://glance-api-1:9292")])
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .errors import quoted

#: The name the centralized driver opens its database by (Glance's central
#: database).
CENTRALIZED_DATABASE = "glance"
#: Default cap on the bytes of one query's result.
DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
#: Connections one cache holds to a database by default (the Rust CLI's
#: ``--database-pool-size`` default).
DEFAULT_POOL_SIZE = 4
#: The interface's error codes (``error-code``).
ERROR_CODES = ("access-denied", "unavailable", "constraint", "limit-exceeded", "timed-out", "other")


class DbError(Exception):
    """A ``database-error``: a code of :data:`ERROR_CODES` and a message
    without secrets, handed to the driver as it is."""

    def __init__(self, code: str, message: str):
        assert code in ERROR_CODES, code
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"DbError({self.code!r}, {self.message!r})"


def timed_out() -> DbError:
    return DbError("timed-out", "the database did not answer before the call's deadline")


@dataclasses.dataclass
class DatabaseSettings:
    """What the operator configured for one database, PostgreSQL, MySQL or
    MariaDB (the Rust host's ``DatabaseSettings``). ``url`` is never shown
    (not in ``repr``, not in any message)."""

    #: A SQLAlchemy URL as Glance's ``[database] connection`` has it
    #: (``postgresql+psycopg2://...``, ``mysql+pymysql://...``), a libpq
    #: one (``postgresql://user:password@host:port/db?sslmode=...``, or
    #: ``host=... dbname=...``) or a MySQL one (``mysql://``,
    #: ``mariadb://``). The scheme picks the backend (:func:`dialect_of_url`).
    url: str = dataclasses.field(repr=False)
    #: Most connections the pool holds (what all drivers on one cache can
    #: hold together).
    pool_size: int = DEFAULT_POOL_SIZE
    #: The server-side bound of one statement, lock wait and idle
    #: transaction (seconds); None: the driver call's deadline.
    statement_timeout: Optional[float] = None
    #: How long opening a connection may take at most (seconds; libpq
    #: counts whole seconds, at least 2).
    connect_timeout: float = 10.0
    #: Most bytes one query result may hold.
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    #: Accept a role with more than a cache driver needs (a superuser,
    #: Glance's own role, an owner of tables): for tests and migrations
    #: only; a warning is logged for every such backend.
    allow_privileged_role: bool = False


def dialect_of_url(url: str) -> str:
    """The SQL a configured URL's server speaks (``postgresql`` or
    ``mysql``), from its scheme, with or without a ``+driver`` (a libpq
    ``key=value`` string is PostgreSQL). A ``ValueError`` never contains the
    URL (the Rust host's ``dialect_of_url``)."""
    url = url.strip()
    if "://" not in url:
        if "=" in url:
            return "postgresql"
        raise ValueError(
            "the database connection is not a URL (postgresql://user:password@host/db or "
            "mysql+pymysql://user:password@host/db)"
        )
    scheme = url.split("://", 1)[0].split("+", 1)[0]
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    if scheme in ("mysql", "mariadb"):
        return "mysql"
    raise ValueError(
        f"the database connection is a {quoted(scheme)} URL; the centralized driver needs "
        "PostgreSQL (postgresql://...), MySQL or MariaDB (mysql+pymysql://...)"
    )


def grant_statements(dialect: str, role: str, database: str) -> List[str]:
    """The statements an administrator runs so the cache's role or account
    ``role`` has exactly what a driver needs in ``database``, on a server
    speaking ``dialect`` (``image-cache db grants [--mysql]``)."""
    if dialect == "mysql":
        from .mysql import grant_statements as mysql_grants

        return mysql_grants(role, database)
    from .postgres import grant_statements as pg_grants

    return pg_grants(role, database)


def value_size(v: Any) -> int:
    """What a value counts against the result cap (as the Rust host)."""
    if isinstance(v, str):
        return 8 + len(v.encode("utf-8", "surrogatepass"))
    if isinstance(v, (bytes, bytearray)):
        return 8 + len(v)
    return 8


class Pool:
    """At most ``size`` connections of a backend; idle ones are checked
    (``usable()``) before reuse. A connection is made on demand in the
    calling thread, so a refused one fails that call at once."""

    def __init__(self, size: int, connect: Callable[[float], Any]):
        self.size = max(1, size)
        self._connect = connect
        self._idle: List[Any] = []
        self._live = 0
        self._cv = threading.Condition()
        self._closed = False

    def status(self) -> Tuple[int, int]:
        with self._cv:
            return self._live, self.size

    def get(self, deadline: float):
        with self._cv:
            while True:
                while self._idle:
                    s = self._idle.pop()
                    if s.usable():
                        return s
                    s.close()
                    self._live -= 1
                if self._live < self.size:
                    self._live += 1
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise timed_out()
                self._cv.wait(remaining)
        try:
            return self._connect(deadline)
        except BaseException:
            with self._cv:
                self._live -= 1
                self._cv.notify()
            raise

    def put(self, s, healthy: bool) -> None:
        keep = healthy and not s.broken and not self._closed and s.usable()
        if not keep:
            s.close()
        with self._cv:
            if keep:
                self._idle.append(s)
            else:
                self._live -= 1
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for s in idle:
            s.close()


class DatabaseRoot:
    """The databases a driver may open, by name."""

    def __init__(self) -> None:
        self._backends: Dict[str, Any] = {}

    def __repr__(self) -> str:
        # Names only: what they map to stays out of logs.
        return f"DatabaseRoot(names={self.names()!r})"

    def with_backend(self, name: str, backend: Any) -> "DatabaseRoot":
        self._backends[name] = backend
        return self

    def with_database(self, name: str, settings: DatabaseSettings) -> "DatabaseRoot":
        """This root with the database ``settings`` describe (PostgreSQL,
        MySQL or MariaDB, by the URL's scheme: :func:`dialect_of_url`) known
        to drivers as ``name`` (the centralized driver uses ``glance``).
        Nothing is connected yet. A URL that cannot be used is a
        ``ValueError`` that never shows it."""
        if dialect_of_url(settings.url) == "mysql":
            from .mysql import MysqlBackend

            return self.with_backend(name, MysqlBackend(name, settings))
        from .postgres import PostgresBackend

        return self.with_backend(name, PostgresBackend(name, settings))

    def names(self) -> List[str]:
        return sorted(self._backends)

    def backend(self, name: str) -> Any:
        return self._backends[name]

    def default_statement_timeout(self, seconds: float) -> None:
        """Backends without a statement timeout of their own take
        ``seconds`` (the driver call's deadline)."""
        for b in self._backends.values():
            if getattr(b, "statement_timeout", 0) is None:
                b.statement_timeout = seconds

    def open(self, name: str, deadline: Optional[float] = None):
        """A connection to the database ``name`` by ``deadline``
        (``time.monotonic()`` seconds; default: 30 s from now)."""
        if deadline is None:
            deadline = time.monotonic() + 30.0
        backend = self._backends.get(name)
        if backend is None:
            raise DbError(
                "access-denied",
                f"no database named {quoted(name[:64])} is configured for this driver (the operator "
                "sets it with image_cache_database_url, IMAGE_CACHE_DATABASE_URL, --database-url "
                "or Glance's [database] connection)",
            )
        return backend.connect(deadline)

    def close(self) -> None:
        """Close every idle pooled connection."""
        for b in self._backends.values():
            close = getattr(b, "close", None)
            if close is not None:
                close()
