"""The engine, the epoch ticker, loading driver components, and the linker
that supplies ``clock``, ``fs``, ``xattr`` and ``sqlite`` to them.

One :class:`Runtime` holds one wasmtime ``Engine`` (component model and
epoch interruption on) and a daemon thread that advances the epoch every
``EPOCH_TICK``; a store's epoch deadline is set before every call, so wasm
code that runs past the call's deadline traps. Host imports check the same
deadline themselves (lock waits, listings, SQLite's progress handler), so
time spent inside the host is bounded too.

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
from .fs import FsError, OpenFile, RootFs
from .sqlite import Connection, SqliteError, SqliteRoot
from .xattr import Attributes, probe as xattr_probe

CONTRACT = "0.2.0"
PACKAGE = "image-cache:driver"
EPOCH_TICK = 0.010

#: Host resource types (``ResourceType.host``) of this package.
FILE_TYPE = 0x1C_F11E
CONNECTION_TYPE = 0x1C_DB

#: Interfaces every driver is linked with.
ALWAYS_LINKED = ("clock", "fs", "types")
#: Interfaces that must be granted.
CAPABILITIES = ("xattr", "sqlite")
#: What the built-in drivers are granted.
BUILTIN_GRANTS = {"sqlite": frozenset({"sqlite"}), "xattr": frozenset({"xattr"})}


def iface(name: str) -> str:
    return f"{PACKAGE}/{name}@{CONTRACT}"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one driver may make the host do (the Rust host's defaults)."""

    #: Longest one driver call may run, host imports included (seconds).
    call_deadline: float = 30.0
    #: Most linear memory one instance may hold (bytes). The Rust host caps
    #: all instances of a driver together; this host caps each instance.
    memory_bytes: int = 1 << 30
    #: Most host resources (open files and connections) one instance holds.
    resources: int = 256
    #: Most database connections one instance holds.
    connections: int = 4
    #: Most live instances of one driver.
    instances: int = 16
    #: How long a call waits for a free instance (seconds).
    instance_wait: float = 10.0
    #: Most entries one directory listing returns.
    max_listing: int = 4_000_000
    #: Most bytes one SQL query result holds.
    max_query_bytes: int = 64 * 1024 * 1024


class InstanceState:
    """What the host imports of one instance use: its root, its open files
    and connections, the current call's deadline."""

    def __init__(self, root: RootFs, sqlite: SqliteRoot, limits: Limits, xattr_enabled: bool):
        self.root = root
        self.sqlite = sqlite
        self.limits = limits
        self.xattr_enabled = xattr_enabled
        self.deadline = time.monotonic() + limits.call_deadline
        self.files: Dict[int, OpenFile] = {}
        self.connections: Dict[int, Connection] = {}
        self._next_rep = 1

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
        for f in self.files.values():
            f.close()
        for c in self.connections.values():
            c.close()
        self.files.clear()
        self.connections.clear()


_current = threading.local()


def current() -> InstanceState:
    state = getattr(_current, "state", None)
    if state is None:
        raise WasmtimeError("host import called outside a driver call")
    return state


class enter:
    """Make ``state`` the instance the host imports serve on this thread."""

    def __init__(self, state: InstanceState):
        self.state = state

    def __enter__(self):
        self.previous = getattr(_current, "state", None)
        _current.state = self.state
        return self.state

    def __exit__(self, *exc):
        _current.state = self.previous
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


# -- fs --------------------------------------------------------------------------


@_fs_result
def _create_new(store, path):
    return _own_file(store, current().root.create_new(path))


@_fs_result
def _open(store, path):
    return _own_file(store, current().root.open(path))


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


# -- sqlite ----------------------------------------------------------------------


def _sql_error(e: SqliteError) -> Record:
    return _record(code=e.code, message=e.message)


def _conn(store, handle) -> Connection:
    c = current().connections.get(handle.to_host(store).rep)
    if c is None:
        raise WasmtimeError("unknown connection handle")
    return c


def _sql_open(store, name):
    st = current()
    if len(st.connections) >= st.limits.connections:
        return _sql_error(
            SqliteError(
                "limit-exceeded",
                f"an instance may hold at most {st.limits.connections} database connections",
            )
        )
    try:
        rep = st._rep()
        conn = st.sqlite.open(name)
    except SqliteError as e:
        return _sql_error(e)
    st.connections[rep] = conn
    return ResourceHost.own(rep, CONNECTION_TYPE)


def _sql_params(params) -> list:
    # The guest's `value` variant arrives as None, int, float, str or bytes.
    return [bytes(p) if isinstance(p, (bytearray, list)) else p for p in params]


def _sql_execute(store, handle, sql, params):
    try:
        return _conn(store, handle).execute(sql, _sql_params(params), current().deadline)
    except SqliteError as e:
        return _sql_error(e)


def _sql_execute_batch(store, handle, sql):
    try:
        _conn(store, handle).execute_batch(sql, current().deadline)
    except SqliteError as e:
        return _sql_error(e)


def _sql_query(store, handle, sql, params):
    try:
        return _conn(store, handle).query(sql, _sql_params(params), current().deadline)
    except SqliteError as e:
        return _sql_error(e)


def _sql_drop(store, rep):
    state = getattr(_current, "state", None)
    if state is not None:
        c = state.connections.pop(rep, None)
        if c is not None:
            c.close()


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
        with root.add_instance(iface("fs")) as i:
            i.add_resource("file", ResourceType.host(FILE_TYPE), _file_drop)
            for name, fn in [
                ("create-new", _create_new),
                ("open", _open),
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
        if "sqlite" in grants:
            with root.add_instance(iface("sqlite")) as i:
                i.add_resource("connection", ResourceType.host(CONNECTION_TYPE), _sql_drop)
                for name, fn in [
                    ("[static]connection.open", _sql_open),
                    ("[method]connection.execute", _sql_execute),
                    ("[method]connection.execute-batch", _sql_execute_batch),
                    ("[method]connection.query", _sql_query),
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
        return max(1, int(self.limits.call_deadline / EPOCH_TICK))

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
        """Compile (or load precompiled) the component at ``path``; refuse one
        that does not export the driver interface of this contract version or
        that imports anything beyond ``fs``, ``clock``, ``types`` and
        ``grants``, before anything is instantiated."""
        path = Path(path)
        name = name or path.name
        grants = frozenset(grants)
        unknown = grants - set(CAPABILITIES)
        if unknown:
            raise errors.LoadError(
                f"cannot load driver {name}: unknown capability {sorted(unknown)[0]!r}: grant any of xattr, sqlite"
            )
        try:
            wasm = path.read_bytes()
        except OSError as e:
            raise errors.LoadError(f"cannot load driver {name}: {e.strerror}") from None
        sha256 = hashlib.sha256(wasm).hexdigest()
        key = (sha256, grants)
        with self._lock:
            loaded = self._components.get(key)
        if loaded is not None:
            return loaded
        component = self._compile(name, wasm, sha256)
        ctype = component.type
        imports = tuple(sorted(ctype.imports(self.engine).keys()))
        exports = tuple(sorted(ctype.exports(self.engine).keys()))
        want = iface("cache-driver")
        if want not in exports:
            found = [e for e in exports if e.startswith(f"{PACKAGE}/cache-driver@")]
            have = found[0].rsplit("@", 1)[1] if found else "none"
            raise errors.LoadError(
                f"cannot load driver {name}: it implements contract {have}, this host speaks {CONTRACT}"
            )
        allowed = {iface(i) for i in ALWAYS_LINKED} | {iface(g) for g in grants}
        for imp in imports:
            if imp not in allowed:
                which = imp.split("/", 1)[-1].split("@", 1)[0] if imp.startswith(PACKAGE + "/") else None
                if which in CAPABILITIES:
                    why = f"it imports {imp}, which it was not granted (granted: {', '.join(['fs', 'clock'] + sorted(grants))})"
                else:
                    why = f"it imports {imp}, which this host does not offer"
                raise errors.LoadError(f"cannot load driver {name}: {why}")
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
