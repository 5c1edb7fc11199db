"""The engine, the epoch ticker, loading driver components, and the linker
that supplies ``clock``, ``fs``, ``xattr`` and ``database`` to them.

One :class:`Runtime` holds one wasmtime ``Engine`` (component model and
epoch interruption on) and a daemon thread that advances the epoch every
``EPOCH_TICK``; a store's epoch deadline is set before every call, so wasm
code that runs past the call's deadline traps. Host imports check the same
deadline themselves (lock waits, listings, ``clock.sleep``), so time spent
inside the host is bounded too. A driver that keeps SQL metadata links
SQLite itself, over ``fs`` (contract 0.2's host-side ``sqlite`` import is
gone): no SQL text reaches the host.

No byte-range lock outlives the driver call that took it: when a call into
an instance ends (success, error or trap), every file that took one during
the instance's life has all its range locks released. Nor does a database
transaction: a connection left inside one when the call ends is rolled back
then (closed if the rollback does not answer within 2 s).

Host imports find their instance's state through a thread-local set for the
duration of each call (a call runs on one thread from start to end), so one
linker per grant set serves every instance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, Optional, Tuple

import wasmtime
from wasmtime import WasmtimeError
from wasmtime.component import Component, Linker, Record, ResourceHost, ResourceType, Variant

from . import errors
from ._fastcall import add_func
from .database import DatabaseRoot, DbError
from .contract import (  # noqa: F401 - re-exported
    ALWAYS_LINKED,
    BUILTIN_GRANTS,
    CAPABILITIES,
    CONTRACT,
    PACKAGE,
    RETIRED,
    SUPPORTED,
    check_names,
    iface,
    normalize_grants,
    top_level_names,
)
from .fs import DEFAULT_DB, FsError, OpenFile, RootFs
from .xattr import Attributes, probe as xattr_probe

EPOCH_TICK = 0.010
#: Longest single pause ``clock.sleep`` grants (seconds).
MAX_SLEEP = 0.1
#: How long after its deadline a call is stopped (seconds): ``clock.sleep``
#: says False at the deadline so a driver waiting for a lock can fail the
#: operation itself ("the host stops the call soon after anyway"); this is
#: its time to do so. With one tick only, a loaded machine (the GIL, the
#: ticker thread) stopped the call before the driver could answer
#: "locked".
UNWIND_GRACE = 0.1

#: Host resource types (``ResourceType.host``) of this package.
FILE_TYPE = 0x1C_F11E
DB_CONNECTION_TYPE = 0x1C_DB0C
#: How long the rollback of a transaction left open at the end of a call
#: may take before its connection is closed instead (seconds).
ROLLBACK_GRACE = 2.0


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one driver may make the host do (the Rust host's defaults)."""

    #: Longest one driver call may run, host imports included (seconds).
    call_deadline: float = 30.0
    #: Most linear memory one instance may hold (bytes). The Rust host caps
    #: all instances of a driver together; this host caps each instance.
    memory_bytes: int = 1 << 30
    #: Most host resources (open files and database connections) one
    #: instance holds.
    resources: int = 256
    #: Most database connections (``database`` interface) one instance
    #: holds.
    connections: int = 4
    #: Most live instances of one driver.
    instances: int = 16
    #: How long a call waits for a free instance (seconds).
    instance_wait: float = 10.0
    #: Most entries one directory listing returns.
    max_listing: int = 4_000_000


class InstanceState:
    """What the host imports of one instance use: its root, the metadata
    database's name, its open files, the files that took byte-range locks,
    the databases it may open and its connections to them, the current
    call's deadline."""

    def __init__(
        self,
        root: RootFs,
        limits: Limits,
        xattr_enabled: bool,
        db_name: str = DEFAULT_DB,
        databases: Optional[DatabaseRoot] = None,
    ):
        self.root = root
        #: The shared databases the driver may open by name (``database``).
        self.databases = databases if databases is not None else DatabaseRoot()
        #: Its open database connections, by resource rep.
        self.connections: Dict[int, object] = {}
        #: Connections that were inside a transaction after a statement of
        #: the current call: rolled back if still open when it ends.
        self.transactions: set = set()
        self.limits = limits
        self.xattr_enabled = xattr_enabled
        #: The one file at the top of the root (with its journal) the
        #: driver may open read-write (``image_cache_sqlite_db``).
        self.db_name = db_name
        self.deadline = time.monotonic() + limits.call_deadline
        self.files: Dict[int, OpenFile] = {}
        #: Open files that took a byte-range lock during the instance's
        #: life, by ``id``: their locks are released when each call ends.
        self.range_locked: Dict[int, OpenFile] = {}
        self._next_rep = 1

    def note_range_lock(self, f: OpenFile) -> None:
        self.range_locked[id(f)] = f

    def release_range_locks(self) -> None:
        """The driver call ended: no byte-range lock outlives it."""
        if not self.range_locked:
            return
        for key, f in list(self.range_locked.items()):
            if f.closed:
                del self.range_locked[key]  # its locks went with it
            else:
                f.release_range_locks()

    def end_database_call(self) -> None:
        """The driver call ended: no transaction it began outlives it."""
        if not self.transactions:
            return
        reps, self.transactions = self.transactions, set()
        for rep in reps:
            conn = self.connections.get(rep)
            if conn is None:
                continue
            try:
                conn.end_of_call(time.monotonic() + ROLLBACK_GRACE)
            except Exception:  # noqa: BLE001 - a host bug: the connection goes
                self.connections.pop(rep, None)
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass

    def add_connection(self, conn) -> int:
        try:
            rep = self._rep()
        except BaseException:
            conn.close()
            raise
        self.connections[rep] = conn
        return rep

    def drop_connection(self, rep: int) -> None:
        conn = self.connections.pop(rep, None)
        self.transactions.discard(rep)
        if conn is not None:
            conn.close()

    def _rep(self) -> int:
        held = len(self.files) + len(self.connections)
        if held >= self.limits.resources:
            # As the Rust host's capped resource table: a trap, not an error.
            raise WasmtimeError(
                f"resource table has no free keys (an instance may hold {self.limits.resources} host resources)"
            )
        rep = self._next_rep
        self._next_rep = (self._next_rep % 0xFFFF_FFF0) + 1
        return rep

    def add_file(self, f: OpenFile) -> int:
        try:
            rep = self._rep()
        except BaseException:
            f.close()
            raise
        self.files[rep] = f
        return rep

    def close(self) -> None:
        self.release_range_locks()
        for f in self.files.values():
            f.close()
        self.files.clear()
        self.range_locked.clear()
        connections, self.connections = self.connections, {}
        self.transactions.clear()
        for conn in connections.values():
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a lost connection is dropped anyway
                pass


_current = threading.local()


def current() -> InstanceState:
    state = getattr(_current, "state", None)
    if state is None:
        raise WasmtimeError("host import called outside a driver call")
    return state


class enter:
    """Make ``state`` the instance the host imports serve on this thread for
    one call into it; when the call ends (however it ends), release every
    byte-range lock its files hold and roll back every database transaction
    it left open."""

    def __init__(self, state: InstanceState):
        self.state = state

    def __enter__(self):
        self.previous = getattr(_current, "state", None)
        _current.state = self.state
        return self.state

    def __exit__(self, *exc):
        _current.state = self.previous
        try:
            self.state.release_range_locks()
        finally:
            self.state.end_database_call()
        return False


def _record(**fields) -> Record:
    r = Record()
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def _fs_error(e: FsError) -> Record:
    return _record(code=e.code, message=e.message)


def _metadata(m: dict) -> Record:
    return _record(**m)


def _file(store, handle) -> OpenFile:
    rep = handle.to_host(store).rep
    f = current().files.get(rep)
    if f is None:
        raise WasmtimeError("unknown file handle")
    return f


def _fs_result(fn):
    """A host function whose expected failures (FsError) are WIT errors."""

    def wrapped(store, *args):
        try:
            return fn(store, *args)
        except FsError as e:
            return _fs_error(e)

    return wrapped


def _fs_record_result(fn):
    """Like ``_fs_result`` for ``result<record, fs-error>``: both cases are
    records, so wasmtime-py wants them tagged."""

    def wrapped(store, *args):
        try:
            return Variant("ok", fn(store, *args))
        except FsError as e:
            return Variant("err", _fs_error(e))

    return wrapped


def _own_file(store, f: OpenFile) -> ResourceHost:
    return ResourceHost.own(current().add_file(f), FILE_TYPE)


# -- clock ---------------------------------------------------------------------


def _now(store) -> float:
    return time.time()


def _sleep(store, microseconds: int) -> bool:
    """Pause for a driver waiting on another process's lock: at most 100 ms
    and never past the call's deadline; False once the deadline has passed
    (checked after the pause)."""
    deadline = current().deadline
    pause = min(microseconds / 1e6, MAX_SLEEP, deadline - time.monotonic())
    if pause > 0:
        time.sleep(pause)
    return time.monotonic() < deadline


# -- fs --------------------------------------------------------------------------


@_fs_result
def _create_new(store, path):
    return _own_file(store, current().root.create_new(path))


@_fs_result
def _open(store, path):
    return _own_file(store, current().root.open(path))


@_fs_result
def _open_read_write(store, path, create):
    st = current()
    return _own_file(store, st.root.open_read_write(path, create, st.db_name))


@_fs_record_result
def _stat(store, path):
    return _metadata(current().root.stat(path))


@_fs_result
def _create_dir(store, path):
    current().root.create_dir(path)


@_fs_result
def _list_dir(store, path):
    st = current()
    return [
        _record(name=e["name"], metadata=_metadata(e["metadata"]))
        for e in st.root.list_dir(path, st.deadline)
    ]


@_fs_result
def _list_names(store, path):
    st = current()
    return [_record(name=e["name"], kind=e["kind"]) for e in st.root.list_names(path, st.deadline)]


@_fs_result
def _rename(store, src, dst):
    current().root.rename(src, dst)


@_fs_result
def _remove_file(store, path):
    current().root.remove_file(path)


def _remove_files(store, paths):
    st = current()
    if len(paths) > 1_000_000:
        e = _fs_error(FsError("limit-exceeded", "more than 1000000 paths in one call"))
        return [e] * len(paths)
    out = []
    stopped = False
    for i, p in enumerate(paths):
        stopped = stopped or (i % 256 == 255 and time.monotonic() >= st.deadline)
        if stopped:
            out.append(_fs_error(FsError("timed-out", f"{p}: stopped at the call's deadline")))
            continue
        try:
            st.root.remove_file(p)
            out.append(None)
        except FsError as e:
            out.append(_fs_error(e))
    return out


@_fs_result
def _set_times(store, path, accessed, modified):
    current().root.set_times(path, accessed, modified)


@_fs_record_result
def _file_metadata(store, handle):
    return _metadata(_file(store, handle).metadata())


@_fs_result
def _file_sync(store, handle):
    _file(store, handle).sync()


@_fs_result
def _file_set_times(store, handle, accessed, modified):
    _file(store, handle).set_times(accessed, modified)


@_fs_result
def _file_lock(store, handle):
    _file(store, handle).lock(current().deadline)


@_fs_result
def _file_try_lock(store, handle):
    return _file(store, handle).try_lock()


@_fs_result
def _file_unlock(store, handle):
    _file(store, handle).unlock()


@_fs_result
def _file_size(store, handle):
    return _file(store, handle).size()


@_fs_result
def _file_read_at(store, handle, offset, length):
    return _file(store, handle).read_at(offset, length)


@_fs_result
def _file_write_at(store, handle, offset, data):
    _file(store, handle).write_at(offset, data if isinstance(data, (bytes, bytearray)) else bytes(data))


@_fs_result
def _file_set_len(store, handle, size):
    _file(store, handle).set_len(size)


@_fs_result
def _file_sync_data(store, handle):
    _file(store, handle).sync_data()


@_fs_result
def _file_set_range_lock(store, handle, start, length, lock):
    f = _file(store, handle)
    if lock != "unlocked":
        current().note_range_lock(f)
    return f.set_range_lock(start, length, lock)


@_fs_result
def _file_range_locked_elsewhere(store, handle, start, length):
    return _file(store, handle).range_locked_elsewhere(start, length)


def _file_drop(store, rep):
    state = getattr(_current, "state", None)
    if state is not None:
        f = state.files.pop(rep, None)
        if f is not None:
            f.close()


# -- xattr -----------------------------------------------------------------------


def _attrs(store, handle) -> Attributes:
    return Attributes(_file(store, handle), current().xattr_enabled)


@_fs_result
def _xattr_get(store, handle, name):
    return _attrs(store, handle).get(name)


@_fs_result
def _xattr_set(store, handle, name, value):
    _attrs(store, handle).set(name, bytes(value))


@_fs_result
def _xattr_remove(store, handle, name):
    _attrs(store, handle).remove(name)


@_fs_result
def _xattr_list(store, handle):
    return _attrs(store, handle).list()


@_fs_result
def _xattr_probe(store):
    st = current()
    xattr_probe(st.root, st.xattr_enabled)


# -- database --------------------------------------------------------------------


def _db_error(e: DbError) -> Record:
    return _record(code=e.code, message=e.message)


def _connection(store, handle):
    rep = handle.to_host(store).rep
    conn = current().connections.get(rep)
    if conn is None:
        raise WasmtimeError("unknown database connection handle")
    return rep, conn


def _db_open(store, name):
    st = current()
    if len(st.connections) >= st.limits.connections:
        return _db_error(
            DbError("limit-exceeded", f"an instance may hold at most {st.limits.connections} database connections")
        )
    try:
        conn = st.databases.open(name, st.deadline)
    except DbError as e:
        return _db_error(e)
    return ResourceHost.own(st.add_connection(conn), DB_CONNECTION_TYPE)


def _db_dialect(store, handle):
    return _connection(store, handle)[1].dialect


def _db_statement(method: str):
    def call(store, handle, sql, params):
        st = current()
        rep, conn = _connection(store, handle)
        try:
            return getattr(conn, method)(sql, params, st.deadline)
        except DbError as e:
            return _db_error(e)
        finally:
            if conn.in_transaction:
                st.transactions.add(rep)

    return call


def _db_drop(store, rep):
    state = getattr(_current, "state", None)
    if state is not None:
        state.drop_connection(rep)


def _guard_host(fn):
    """A host bug is a trap for that call, never a crash of the process,
    and the message names no host path."""

    def wrapped(store, *args):
        try:
            return fn(store, *args)
        except WasmtimeError:
            raise
        except Exception as e:  # noqa: BLE001 - any host failure traps the call
            raise WasmtimeError(f"the host failed while serving it ({type(e).__name__})") from None

    return wrapped


def link(engine: wasmtime.Engine, grants: FrozenSet[str]) -> Linker:
    """A linker with ``fs``, ``clock``, ``types`` and exactly ``grants``."""
    linker = Linker(engine)
    with linker.root() as root:
        with root.add_instance(iface("types")):
            pass
        with root.add_instance(iface("clock")) as i:
            add_func(i, "now", _guard_host(_now))
            add_func(i, "sleep", _guard_host(_sleep))
        with root.add_instance(iface("fs")) as i:
            i.add_resource("file", ResourceType.host(FILE_TYPE), _file_drop)
            for name, fn in [
                ("create-new", _create_new),
                ("open", _open),
                ("open-read-write", _open_read_write),
                ("stat", _stat),
                ("create-dir", _create_dir),
                ("list-dir", _list_dir),
                ("list-names", _list_names),
                ("rename", _rename),
                ("remove-file", _remove_file),
                ("remove-files", _remove_files),
                ("set-times", _set_times),
                ("[method]file.metadata", _file_metadata),
                ("[method]file.sync", _file_sync),
                ("[method]file.set-times", _file_set_times),
                ("[method]file.lock", _file_lock),
                ("[method]file.try-lock", _file_try_lock),
                ("[method]file.unlock", _file_unlock),
                ("[method]file.size", _file_size),
                ("[method]file.read-at", _file_read_at),
                ("[method]file.write-at", _file_write_at),
                ("[method]file.set-len", _file_set_len),
                ("[method]file.sync-data", _file_sync_data),
                ("[method]file.set-range-lock", _file_set_range_lock),
                ("[method]file.range-locked-elsewhere", _file_range_locked_elsewhere),
            ]:
                add_func(i, name, _guard_host(fn))
        if "database" in grants:
            with root.add_instance(iface("database")) as i:
                i.add_resource("connection", ResourceType.host(DB_CONNECTION_TYPE), _db_drop)
                for name, fn in [
                    ("[static]connection.open", _db_open),
                    ("[method]connection.dialect", _db_dialect),
                    ("[method]connection.execute", _db_statement("execute")),
                    ("[method]connection.query", _db_statement("query")),
                ]:
                    add_func(i, name, _guard_host(fn))
        if "xattr" in grants:
            with root.add_instance(iface("xattr")) as i:
                for name, fn in [
                    ("get", _xattr_get),
                    ("set", _xattr_set),
                    ("remove", _xattr_remove),
                    ("list-names", _xattr_list),
                    ("probe", _xattr_probe),
                ]:
                    add_func(i, name, _guard_host(fn))
    return linker


def _ticker(engine_ref: "weakref.ReferenceType[wasmtime.Engine]", stop: threading.Event) -> None:
    while not stop.wait(EPOCH_TICK):
        engine = engine_ref()
        if engine is None:
            return
        engine.increment_epoch()
        del engine


try:
    from importlib.metadata import version as _version

    _WASMTIME_VERSION = _version("wasmtime")
except Exception:  # noqa: BLE001 - an unknown version only names the artifact
    _WASMTIME_VERSION = "unknown"


def default_artifact_dir() -> Optional[Path]:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "image-cache-wasm"


@dataclasses.dataclass
class LoadedComponent:
    name: str
    component: Component
    imports: Tuple[str, ...]
    grants: FrozenSet[str]
    linker: Linker
    sha256: str


class Runtime:
    """One engine, its epoch ticker, compiled components and linkers. Share
    one across caches in a process; it is safe to use from many threads."""

    def __init__(self, limits: Optional[Limits] = None, artifacts: Optional[Path] = ...):  # type: ignore[assignment]
        self.limits = limits or Limits()
        config = wasmtime.Config()
        config.wasm_component_model = True
        config.epoch_interruption = True
        self.engine = wasmtime.Engine(config)
        self.artifacts = default_artifact_dir() if artifacts is ... else artifacts
        self._components: Dict[Tuple[str, FrozenSet[str]], LoadedComponent] = {}
        self._linkers: Dict[FrozenSet[str], Linker] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_ticker,
            args=(weakref.ref(self.engine), self._stop),
            name="image-cache-epoch",
            daemon=True,
        )
        self._thread.start()
        weakref.finalize(self, self._stop.set)
        self.stats = {"compiled": 0, "loaded_precompiled": 0, "instances": 0, "instances_discarded": 0}

    def close(self) -> None:
        self._stop.set()

    def deadline_ticks(self) -> int:
        return max(1, int((self.limits.call_deadline + UNWIND_GRACE) / EPOCH_TICK))

    def linker(self, grants: FrozenSet[str]) -> Linker:
        with self._lock:
            linker = self._linkers.get(grants)
            if linker is None:
                linker = self._linkers[grants] = link(self.engine, grants)
            return linker

    def _compile(self, name: str, wasm: bytes, sha256: str) -> Component:
        path = None
        if self.artifacts is not None:
            path = Path(self.artifacts) / f"{sha256}-wasmtime-py-{_WASMTIME_VERSION}.cwasm"
            if path.is_file():
                try:
                    c = Component.deserialize(self.engine, path.read_bytes())
                    self.stats["loaded_precompiled"] += 1
                    return c
                except (WasmtimeError, OSError):
                    pass
        try:
            component = Component(self.engine, wasm)
        except WasmtimeError as e:
            raise errors.LoadError(f"cannot load driver {name}: {str(e).splitlines()[0]}") from None
        self.stats["compiled"] += 1
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
                tmp.write_bytes(component.serialize())
                os.replace(tmp, path)
            except (OSError, WasmtimeError):
                pass
        return component

    def load(self, path: os.PathLike, grants: Iterable[str] = (), name: Optional[str] = None) -> LoadedComponent:
        """Compile (or load precompiled) the component at ``path``. One that
        does not export the driver interface of a supported contract version
        (``>=0.3.0, <0.4.0``), or imports anything beyond ``fs``, ``clock``,
        ``types`` and ``grants``, is refused: from the names in its binary
        before it is compiled, and again from the compiled component's type,
        before anything is instantiated."""
        path = Path(path)
        name = name or path.name
        grants = normalize_grants(grants, name)
        try:
            wasm = path.read_bytes()
        except OSError as e:
            raise errors.LoadError(f"cannot load driver {name}: {e.strerror}") from None
        sha256 = hashlib.sha256(wasm).hexdigest()
        key = (sha256, grants)
        with self._lock:
            loaded = self._components.get(key)
        if loaded is not None:
            # The same component under the name this caller knows it by.
            return loaded if loaded.name == name else dataclasses.replace(loaded, name=name)
        names = top_level_names(name, wasm)
        if names is not None:
            check_names(name, names[0], names[1], grants)
        component = self._compile(name, wasm, sha256)
        ctype = component.type
        imports = tuple(sorted(ctype.imports(self.engine).keys()))
        exports = tuple(sorted(ctype.exports(self.engine).keys()))
        check_names(name, imports, exports, grants)
        loaded = LoadedComponent(name, component, imports, grants, self.linker(grants), sha256)
        with self._lock:
            self._components.setdefault(key, loaded)
        return loaded


_default_runtime: Optional[Runtime] = None
_default_lock = threading.Lock()


def default_runtime() -> Runtime:
    """The process's shared runtime (default limits)."""
    global _default_runtime
    with _default_lock:
        if _default_runtime is None:
            _default_runtime = Runtime()
        return _default_runtime
