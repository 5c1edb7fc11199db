"""``image-cache:driver/sqlite``: SQLite databases inside the cache root,
confined so that no statement reaches beyond the one database file.

Mirrors ``host/src/sqlite.rs`` on Python's ``sqlite3``:

- **Open**: a plain file name in the root (no ``/``, ``..``, ``:memory:``,
  ``file:`` URI; ``uri=False``); an existing entry that is not a regular
  file (a symlink, a directory) is refused. Errors name the database, never
  the root's location.
- **Deny by default**: ``set_authorizer`` with the Rust host's allow-lists
  (reads and writes of tables of ``main``, creating/dropping tables and
  indexes, transactions, the same functions and ``PRAGMA``s with the same
  allowed values); no ``ATTACH``, temp objects, triggers, views, virtual
  tables, ``pragma_*`` table functions, extensions.
- **Limits**: ``setlimit`` with the same values (``SQLITE_LIMIT_ATTACHED``
  0, so ``VACUUM INTO`` fails too; bounded value and SQL lengths),
  ``temp_store = MEMORY``, ``mmap_size = 0``, bounded page cache, a cap on
  one query's result bytes.
- **Time and memory per call**: ``set_progress_handler`` stops a statement
  when the driver call's deadline passes, or when SQLite's heap grows by
  more than ``MAX_STATEMENT_MEMORY`` during it (where ``sqlite3_memory_used``
  of the library ``sqlite3`` uses can be read); lock waits end at the
  deadline (``busy_timeout`` set to what is left of it before each call).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sqlite3
import stat as stat_mod
import time
from typing import List, Optional

DEFAULT_MAX_RESULT_BYTES = 64 * 1024 * 1024
MAX_VALUE_BYTES = 16 * 1024 * 1024
MAX_SQL_BYTES = 1024 * 1024
MAX_STATEMENT_MEMORY = 256 * 1024 * 1024
CACHE_KIB = 8 * 1024
PROGRESS_STEPS = 1000

FUNCTIONS = frozenset(
    """abs avg changes char coalesce concat concat_ws count date datetime format
    glob group_concat hex ifnull iif instr julianday last_insert_rowid length like
    likelihood likely lower ltrim max min nullif octet_length printf quote random
    randomblob replace round rtrim sign strftime string_agg substr substring sum
    time timediff total total_changes trim typeof unhex unicode unixepoch unlikely
    upper zeroblob""".split()
)

#: PRAGMAs a driver may run, with the values it may set (None: any value;
#: empty: read-only).
PRAGMAS = {
    "journal_mode": ("wal", "delete", "truncate", "persist"),
    "synchronous": ("0", "1", "2", "3", "off", "normal", "full", "extra"),
    "foreign_keys": ("0", "1", "on", "off", "true", "false"),
    "user_version": None,
    "application_id": None,
    "auto_vacuum": ("0", "1", "2", "none", "full", "incremental"),
    "incremental_vacuum": None,
    "wal_checkpoint": ("passive", "full", "restart", "truncate"),
    "optimize": None,
    "integrity_check": None,
    "quick_check": None,
    "foreign_key_check": None,
    "table_info": None,
    "table_xinfo": None,
    "table_list": None,
    "index_list": None,
    "index_info": None,
    "index_xinfo": None,
    "foreign_key_list": None,
    "data_version": (),
    "freelist_count": (),
    "page_count": (),
}

LIMITS = [
    (sqlite3.SQLITE_LIMIT_ATTACHED, 0),
    (sqlite3.SQLITE_LIMIT_LENGTH, MAX_VALUE_BYTES),
    (sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_BYTES),
    (sqlite3.SQLITE_LIMIT_COLUMN, 100),
    (sqlite3.SQLITE_LIMIT_EXPR_DEPTH, 100),
    (sqlite3.SQLITE_LIMIT_COMPOUND_SELECT, 20),
    (sqlite3.SQLITE_LIMIT_VDBE_OP, 100_000),
    (sqlite3.SQLITE_LIMIT_FUNCTION_ARG, 16),
    (sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, 1000),
    (sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 1000),
    (sqlite3.SQLITE_LIMIT_TRIGGER_DEPTH, 1),
    (sqlite3.SQLITE_LIMIT_WORKER_THREADS, 0),
]

# Authorizer action codes (sqlite3.h).
_SELECT, _RECURSIVE, _TRANSACTION, _SAVEPOINT = 21, 33, 22, 32
_READ, _FUNCTION, _PRAGMA = 20, 31, 19
_MAIN_ONLY = {
    18,  # INSERT
    23,  # UPDATE
    9,  # DELETE
    2,  # CREATE_TABLE
    1,  # CREATE_INDEX
    11,  # DROP_TABLE
    10,  # DROP_INDEX
    26,  # ALTER_TABLE
    27,  # REINDEX
    28,  # ANALYZE
}


class SqliteError(Exception):
    """An expected failure, returned to the guest as a ``sqlite-error``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _memory_used_fn():
    """``sqlite3_memory_used`` of the very library ``_sqlite3`` is linked
    with, or None when it cannot be reached (a statically linked build)."""
    try:
        import _sqlite3

        lib = ctypes.CDLL(_sqlite3.__file__)
        fn = lib.sqlite3_memory_used
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int64
    fn.argtypes = []
    return fn


_memory_used = _memory_used_fn()
#: Whether the per-statement memory cap is enforced in this process.
MEMORY_CAP_ENFORCED = _memory_used is not None


def readable_table(table: Optional[str]) -> bool:
    t = (table or "").lower()
    return not (
        t.startswith("pragma_") or t in ("sqlite_dbpage", "dbstat", "sqlite_stmt")
    )


def pragma_allowed(name: Optional[str], value: Optional[str]) -> bool:
    name = (name or "").lower()
    if name not in PRAGMAS:
        return False
    allowed = PRAGMAS[name]
    if value is None or allowed is None:
        return True
    v = value.strip().strip("'\"").lower()
    return v in allowed


def authorize(action: int, arg1, arg2, dbname, _source) -> int:
    """The authorizer: what a guest statement may do."""
    in_main = dbname is None or dbname == "main"
    if action in (_SELECT, _RECURSIVE, _TRANSACTION, _SAVEPOINT):
        ok = True
    elif action == _READ:
        ok = in_main and readable_table(arg1)
    elif action in _MAIN_ONLY:
        ok = in_main
    elif action == _FUNCTION:
        ok = (arg2 or "").lower() in FUNCTIONS
    elif action == _PRAGMA:
        ok = in_main and pragma_allowed(arg1, arg2)
    else:
        # ATTACH/DETACH, temp objects, triggers, views, virtual tables and
        # anything newer than this list.
        ok = False
    return sqlite3.SQLITE_OK if ok else sqlite3.SQLITE_DENY


def plain_name(name: str) -> bool:
    return (
        bool(name)
        and len(name.encode("utf-8", "surrogatepass")) <= 255
        and name not in (".", "..")
        and not any(c in name for c in "/\\\0")
        and not name.startswith(":")
        and not name.startswith("file:")
    )


class _Guard:
    """Per-call state the progress handler reads."""

    __slots__ = ("deadline", "memory_at_start", "stopped")

    def __init__(self) -> None:
        self.deadline = 0.0
        self.memory_at_start = 0
        self.stopped = ""

    def begin(self, deadline: float) -> None:
        self.deadline = deadline
        self.memory_at_start = _memory_used() if _memory_used else 0
        self.stopped = ""

    def should_stop(self) -> int:
        if time.monotonic() >= self.deadline:
            self.stopped = "deadline"
            return 1
        if _memory_used and _memory_used() - self.memory_at_start > MAX_STATEMENT_MEMORY:
            self.stopped = "memory"
            return 1
        return 0


def _lossy(b: bytes) -> str:
    return b.decode("utf-8", "replace")


class Connection:
    """One open database, confined."""

    def __init__(self, conn: sqlite3.Connection, max_result_bytes: int):
        self.conn = conn
        self.guard = _Guard()
        self.max_result_bytes = max_result_bytes
        self._busy_ms = -1

    def close(self) -> None:
        try:
            self.conn.close()
        except sqlite3.Error:
            pass

    def _begin(self, sql: str, deadline: float) -> None:
        if len(sql.encode("utf-8", "surrogatepass")) > MAX_SQL_BYTES:
            raise SqliteError("limit-exceeded", f"SQL text is longer than {MAX_SQL_BYTES} bytes")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SqliteError("timed-out", "the call's deadline has passed")
        self.guard.begin(deadline)
        # Lock waits end at the deadline (rounded to 10 ms so that the host
        # does not set it before every statement of a call).
        busy = max(1, int(remaining * 100)) * 10
        if abs(busy - self._busy_ms) >= 10:
            self.conn.set_authorizer(None)
            try:
                self.conn.execute(f"PRAGMA busy_timeout = {busy}")
            finally:
                self.conn.set_authorizer(authorize)
            self._busy_ms = busy

    def _error(self, e: Exception) -> SqliteError:
        code = getattr(e, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(e)
        if primary == sqlite3.SQLITE_INTERRUPT or text == "interrupted":
            if self.guard.stopped == "memory":
                return SqliteError(
                    "limit-exceeded",
                    f"the statement was stopped: it used more than {MAX_STATEMENT_MEMORY} bytes of memory",
                )
            return SqliteError(
                "timed-out", "the statement ran until the call's deadline and was stopped"
            )
        if primary in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            c = "busy"
        elif primary == sqlite3.SQLITE_CONSTRAINT:
            c = "constraint"
        elif primary == sqlite3.SQLITE_AUTH or text.startswith("not authorized"):
            return SqliteError("access-denied", f"{text} (a driver's SQL may not do this)")
        elif primary == sqlite3.SQLITE_TOOBIG:
            c = "limit-exceeded"
        elif primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_PERM):
            c = "cannot-open"
        else:
            c = "other"
        return SqliteError(c, text)

    def execute(self, sql: str, params: list, deadline: float) -> int:
        self._begin(sql, deadline)
        try:
            before = self.conn.total_changes
            cur = self.conn.execute(sql, params)
            for _ in cur:
                pass
            changed = self.conn.total_changes - before
            cur.close()
            return max(changed, 0)
        except (sqlite3.Error, ValueError, OverflowError) as e:
            raise self._error(e) from None

    def execute_batch(self, sql: str, deadline: float) -> None:
        self._begin(sql, deadline)
        try:
            self.conn.executescript(sql)
        except (sqlite3.Error, ValueError) as e:
            raise self._error(e) from None

    def query(self, sql: str, params: list, deadline: float) -> List[list]:
        self._begin(sql, deadline)
        result = []
        size = 0
        try:
            cur = self.conn.execute(sql, params)
            for row in cur:
                # Each value is at most SQLITE_LIMIT_LENGTH bytes; the total
                # is checked before anything is handed to the guest.
                for v in row:
                    size += 8 + (len(v) if isinstance(v, (str, bytes)) else 0)
                if size > self.max_result_bytes:
                    cur.close()
                    raise SqliteError(
                        "limit-exceeded", f"query result exceeds {self.max_result_bytes} bytes"
                    )
                result.append(list(row))
            return result
        except (sqlite3.Error, ValueError, OverflowError) as e:
            raise self._error(e) from None


class SqliteRoot:
    """Where databases may be opened: the cache root."""

    def __init__(self, root, max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES):
        self.root = root
        self.max_result_bytes = max_result_bytes

    def open(self, name: str) -> Connection:
        if not isinstance(name, str) or not plain_name(name):
            shown = name[:64] if isinstance(name, str) else name
            raise SqliteError(
                "access-denied",
                f"database name {shown!r} is not a plain file name in the cache root",
            )
        try:
            st = os.stat(name, dir_fd=self.root.fd, follow_symlinks=False)
            if not stat_mod.S_ISREG(st.st_mode):
                raise SqliteError(
                    "access-denied",
                    f"database {name!r} in the cache root is not a regular file",
                )
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SqliteError("cannot-open", f"database {name!r}: {os.strerror(e.errno)}") from None
        path = os.path.join(self.root.path, name)
        try:
            conn = sqlite3.connect(
                path,
                timeout=0,
                isolation_level=None,
                check_same_thread=False,
                uri=False,
                cached_statements=64,
            )
        except sqlite3.Error as e:
            raise SqliteError("cannot-open", f"database {name!r}: {e}") from None
        try:
            confine(conn)
        except sqlite3.Error as e:
            conn.close()
            raise SqliteError("cannot-open", f"database {name!r}: {e}") from None
        c = Connection(conn, self.max_result_bytes)
        conn.set_progress_handler(c.guard.should_stop, PROGRESS_STEPS)
        return c


def confine(conn: sqlite3.Connection) -> None:
    """The host's settings and rules on a fresh connection, before the guest
    runs anything on it."""
    setconfig = getattr(conn, "setconfig", None)  # Python 3.12+
    if setconfig is not None:
        for name, on in [
            ("SQLITE_DBCONFIG_DEFENSIVE", True),
            ("SQLITE_DBCONFIG_TRUSTED_SCHEMA", False),
            ("SQLITE_DBCONFIG_ENABLE_FTS3_TOKENIZER", False),
            ("SQLITE_DBCONFIG_ENABLE_TRIGGER", False),
            ("SQLITE_DBCONFIG_ENABLE_VIEW", False),
            ("SQLITE_DBCONFIG_DQS_DML", False),
            ("SQLITE_DBCONFIG_DQS_DDL", False),
            ("SQLITE_DBCONFIG_WRITABLE_SCHEMA", False),
        ]:
            op = getattr(sqlite3, name, None)
            if op is not None:
                setconfig(op, on)
    for limit, value in LIMITS:
        conn.setlimit(limit, value)
    # Temp tables and sort spills stay in memory: a temp file would be
    # created outside the root.
    conn.executescript(
        f"PRAGMA temp_store = MEMORY; PRAGMA cache_size = -{CACHE_KIB}; PRAGMA mmap_size = 0;"
    )
    conn.text_factory = _lossy
    conn.set_authorizer(authorize)
