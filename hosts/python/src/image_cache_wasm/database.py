"""``image-cache:driver/database``: shared SQL databases the operator
configured, opened by name (as the Rust host's ``host/src/database.rs``).

The guest names a database; the host maps the name to a configured
backend. A name that is not configured is ``access-denied``, and the guest
never learns a host name, a connection string or a password.

- ``postgres.py``: the PostgreSQL backend (pool, deadlines, typed
  parameters, role checks, scrubbed errors), on psycopg 3 (the
  ``centralized`` extra: ``pip install 'image_cache_wasm[centralized]'``);
- ``policy.py``: what a driver's SQL may say, checked before it is sent.

    from image_cache_wasm import DatabaseRoot, ImageCache, PostgresSettings

    databases = DatabaseRoot().with_postgres(
        "glance", PostgresSettings("postgresql://image_cache:PW@db.example/glance?sslmode=verify-full"))
    cache = ImageCache(root, driver="centralized", databases=databases,
                       options=[("worker_self_reference_url", "http://glance-api-1:9292")])
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional

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
class PostgresSettings:
    """What the operator configured for one PostgreSQL database (the Rust
    host's ``PostgresSettings``). ``url`` is never shown (not in ``repr``,
    not in any message)."""

    #: A libpq URL (``postgresql://user:password@host:port/db?sslmode=...``),
    #: libpq's key=value form, or a SQLAlchemy one
    #: (``postgresql+psycopg2://...``, Glance's ``[database] connection``).
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

    def with_postgres(self, name: str, settings: PostgresSettings) -> "DatabaseRoot":
        """This root with the PostgreSQL database ``settings`` known to
        drivers as ``name`` (the centralized driver uses ``glance``).
        A URL that cannot be used is a ``ValueError`` that never shows it."""
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
