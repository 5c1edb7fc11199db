"""A loaded driver on one cache root: a bounded pool of configured
instances, the typed calls and sessions on top of them, and the checks on
everything a driver hands back (as ``host/src/driver.rs``).

An instance is checked out of the pool for one call (or for a whole
session) and checked back in afterwards. A trap, a missed deadline (in wasm
or in a host import), a host failure or a broken contract poisons only that
instance: it is dropped and the next call makes a fresh one; the caller
gets :class:`~image_cache_wasm.errors.DriverFault`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple

import wasmtime
from wasmtime import WasmtimeError
from wasmtime.component import ResourceHost, Variant

from . import errors
from . import xattr as host_xattr
from ._fastcall import Export
from .errors import DriverFault, printable, quoted, to_image_id, validate_image_id
from .results import CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport, RemovedFile
from .fs import DEFAULT_DB, OpenFile, RootFs, io_error
from .runtime import FILE_TYPE, InstanceState, LoadedComponent, Runtime, enter, iface

log = logging.getLogger("image_cache_wasm")

MAX_IDLE = 32
MAX_DRIVER_MESSAGE = 1024
MAX_REPORTED_FAILURES = 1000
#: A checksum a driver reports goes into HTTP headers (``ETag``,
#: ``Content-MD5``) as it is: at most this many bytes of these characters.
MAX_CHECKSUM = 128
_CHECKSUM_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=_:-")

_EXPORTS = [
    "info",
    "configure",
    "get-cache-size",
    "get-hit-count",
    "get-cached-images",
    "is-cached",
    "is-being-cached",
    "is-cacheable",
    "is-queued",
    "queue-image",
    "get-queued-images",
    "delete-cached-image",
    "delete-all-cached-images",
    "delete-queued-image",
    "delete-all-queued-images",
    "get-least-recently-accessed",
    "get-least-recently-accessed-batch",
    "get-image-size",
    "get-cached-nodes",
    "clean",
    "prune",
    "open-for-write",
    "open-for-read",
    "[method]write-session.commit",
    "[method]write-session.abort",
    "[method]read-session.checksum",
    "[method]read-session.finish",
]


class Instance:
    """One instance of the driver: its store, its exports, its state."""

    def __init__(self, store: wasmtime.Store, funcs: dict, state: InstanceState):
        self.store = store
        self.funcs = funcs
        self.state = state

    def close(self) -> None:
        self.state.close()


def _field(record: Any, name: str) -> Any:
    return getattr(record, name)


def usable_checksum(c: Any) -> bool:
    """A checksum that can go into a header value and an ``ETag`` as it is
    (as the Rust host's ``usable_checksum``): not empty, at most 128 bytes,
    ASCII letters, digits and ``+/=_:-`` only."""
    return isinstance(c, str) and 0 < len(c) <= MAX_CHECKSUM and all(ch in _CHECKSUM_CHARS for ch in c)


class Driver:
    """A driver component bound to one cache root."""

    def __init__(
        self,
        runtime: Runtime,
        loaded: LoadedComponent,
        root: RootFs,
        options: Sequence[Tuple[str, str]],
        xattr_enabled: bool = True,
        databases=None,
    ):
        self.runtime = runtime
        #: The shared databases the driver may open by name (``database``).
        self.databases = databases
        self.loaded = loaded
        self.root = root
        self.options = [(str(k), str(v)) for k, v in options]
        self.xattr_enabled = xattr_enabled
        # The metadata database's name, as the driver reads it (the last
        # `image_cache_sqlite_db` given): the one file at the top of the
        # root, with its journal, the driver may open read-write.
        self.db_name = next(
            (v for k, v in reversed(self.options) if k == "image_cache_sqlite_db"), DEFAULT_DB
        )
        self._idle: List[Instance] = []
        self._live = 1
        self._cv = threading.Condition()
        self.discarded = 0
        first = self._instantiate()
        info = self._guarded(first, "info")
        self.info: DriverInfo = {
            "name": printable(_field(info, "name"), 64),
            "version": printable(_field(info, "version"), 64),
            "description": printable(_field(info, "description"), 512),
        }
        self._idle.append(first)

    @property
    def name(self) -> str:
        return self.loaded.name

    # -- instances ---------------------------------------------------------------

    def _instantiate(self) -> Instance:
        limits = self.runtime.limits
        store = wasmtime.Store(self.runtime.engine)
        store.set_limits(memory_size=limits.memory_bytes)
        store.set_epoch_deadline(self.runtime.deadline_ticks())
        state = InstanceState(self.root, limits, self.xattr_enabled, self.db_name, self.databases)
        try:
            with enter(state):
                instance = self.loaded.linker.instantiate(store, self.loaded.component)
            top = instance.get_export_index(store, iface("cache-driver"))
            funcs = {}
            for name in _EXPORTS:
                idx = instance.get_export_index(store, name, top)
                func = instance.get_func(store, idx) if idx is not None else None
                if func is None:
                    raise WasmtimeError(f"it does not export {name}")
                funcs[name] = Export(func, store)
        except WasmtimeError as e:
            state.close()
            raise self._fault(e) from None
        self.runtime.stats["instances"] += 1
        inst = Instance(store, funcs, state)
        try:
            self._guarded(inst, "configure", self.options)
        except errors.BadConfiguration as e:
            inst.close()
            raise errors.BadConfiguration(
                f"driver {self.name} cannot use cache root {self.root.path}: {e.message}"
            ) from None
        except BaseException:
            inst.close()
            raise
        return inst

    def _fault(self, e: BaseException) -> DriverFault:
        text = str(e) if not isinstance(e, wasmtime.Trap) else e.message
        lines = [l.strip() for l in text.splitlines() if l.strip()]
        if "wasm trap: interrupt" in text:
            message = (
                f"it ran past its deadline of {self.runtime.limits.call_deadline:g}s and was stopped"
            )
        else:
            # wasmtime puts a backtrace between the context and the cause:
            # keep the cause (the trap, or the host's own message).
            trap = [l for l in lines if "wasm trap:" in l]
            if trap:
                cause = trap[-1][trap[-1].index("wasm trap:"):]
            elif "Caused by:" in lines and lines[-1] != "Caused by:":
                cause = lines[-1]
            else:
                cause = lines[0] if lines else type(e).__name__
            message = f"it trapped: {printable(cause, 512)}"
        return self._broke(message)

    def _broke(self, message: str) -> DriverFault:
        return DriverFault(self.name, message)

    def _guarded(self, inst: Instance, export: str, *args: Any) -> Any:
        """Run one export with a fresh deadline (for wasm code and the host
        imports it calls). A trap, a host failure, or a host import that ran
        into the deadline is a fault; an error value raises its kind."""
        deadline = self.runtime.limits.call_deadline
        inst.state.deadline = time.monotonic() + deadline
        inst.store.set_epoch_deadline(self.runtime.deadline_ticks())
        func = inst.funcs[export]
        try:
            with enter(inst.state):
                result = func(inst.store, *args)
                # Before the end of the call rolls back what it left open.
                overran = time.monotonic() >= inst.state.deadline
        except (WasmtimeError, wasmtime.Trap) as e:
            raise self._fault(e) from None
        except Exception as e:  # a host bug surfaced by wasmtime-py
            log.error("host bug: a call of driver %s failed: %r", self.name, e)
            raise self._broke(f"the host failed while serving it ({type(e).__name__})") from None
        if overran:
            extra = ""
            if isinstance(result, Variant):
                extra = f" ({printable(str(result.payload), 256)})"
            raise self._broke(
                f"it ran past its deadline of {deadline:g}s inside a host call and was stopped{extra}"
            )
        if isinstance(result, Variant):
            cls = errors.DRIVER_ERRORS.get(result.tag)
            if cls is None:
                raise self._broke(f"it returned an unknown error {printable(result.tag, 64)}")
            if cls is errors.IoError:
                # io carries a record: the fs error code and the message.
                payload = result.payload
                code = getattr(payload, "code", "io")
                raise errors.IoError(
                    printable(str(getattr(payload, "message", payload)), MAX_DRIVER_MESSAGE),
                    code if isinstance(code, str) else "io",
                )
            raise cls(printable(str(result.payload), MAX_DRIVER_MESSAGE))
        return result

    def checkout(self) -> Instance:
        limits = self.runtime.limits
        give_up = time.monotonic() + limits.instance_wait
        with self._cv:
            while True:
                if self._idle:
                    return self._idle.pop()
                if self._live < max(1, limits.instances):
                    self._live += 1
                    break
                now = time.monotonic()
                if now >= give_up:
                    raise errors.Overloaded(
                        f"driver {self.name}: all {limits.instances} instances stayed busy for {limits.instance_wait:g}s"
                    )
                self._cv.wait(give_up - now)
        try:
            return self._instantiate()
        except BaseException:
            self._forget()
            raise

    def _forget(self) -> None:
        with self._cv:
            self._live -= 1
            self._cv.notify()

    def settle(self, inst: Instance, failed: Optional[BaseException]) -> None:
        """After a call: back to the pool, unless it faulted (then dropped)."""
        if isinstance(failed, DriverFault) or (failed is not None and not isinstance(failed, errors.CacheError)):
            self.discarded += 1
            self.runtime.stats["instances_discarded"] += 1
            inst.close()
            self._forget()
            return
        with self._cv:
            if len(self._idle) >= MAX_IDLE:
                self._live -= 1
                inst.close()
            else:
                self._idle.append(inst)
            self._cv.notify()

    def call(self, export: str, *args: Any, check: Optional[Callable[[Any], Optional[str]]] = None) -> Any:
        inst = self.checkout()
        failed: Optional[BaseException] = None
        try:
            result = self._guarded(inst, export, *args)
            if check is not None:
                broken = check(result)
                if broken:
                    raise self._broke(f"it broke the driver contract: {broken}")
            return result
        except BaseException as e:
            failed = e
            raise
        finally:
            self.settle(inst, failed)

    def close(self) -> None:
        with self._cv:
            idle, self._idle = self._idle, []
            self._live -= len(idle)
        for inst in idle:
            inst.close()

    # -- checks ------------------------------------------------------------------

    @staticmethod
    def _valid_ids(what: str, ids) -> Optional[str]:
        for i in ids:
            try:
                validate_image_id(i)
            except errors.InvalidImageId as e:
                return f"{what} returned {e}"
        return None

    # -- operations ----------------------------------------------------------------

    def get_cache_size(self) -> int:
        return self.call("get-cache-size")

    def get_hit_count(self, image_id: object) -> int:
        return self.call("get-hit-count", to_image_id(image_id))

    def get_cached_images(self) -> List[CachedImage]:
        def check(images) -> Optional[str]:
            ids = [_field(i, "image-id") for i in images]
            broken = self._valid_ids("get-cached-images", ids)
            if broken:
                return broken
            for a, b in zip(ids, ids[1:]):
                if a.encode() >= b.encode():
                    return f"get-cached-images is not ordered by id ({quoted(a)} before {quoted(b)})"
            return None

        return [
            {
                "image_id": _field(i, "image-id"),
                "hits": _field(i, "hits"),
                "last_modified": _field(i, "last-modified"),
                "last_accessed": _field(i, "last-accessed"),
                "size": _field(i, "size"),
            }
            for i in self.call("get-cached-images", check=check)
        ]

    def is_cached(self, image_id: object) -> bool:
        return self.call("is-cached", to_image_id(image_id))

    def is_being_cached(self, image_id: object) -> bool:
        return self.call("is-being-cached", to_image_id(image_id))

    def is_cacheable(self, image_id: object) -> bool:
        return self.call("is-cacheable", to_image_id(image_id))

    def is_queued(self, image_id: object) -> bool:
        return self.call("is-queued", to_image_id(image_id))

    def queue_image(self, image_id: object) -> bool:
        return self.call("queue-image", to_image_id(image_id))

    def get_queued_images(self) -> List[str]:
        return list(
            self.call("get-queued-images", check=lambda ids: self._valid_ids("get-queued-images", ids))
        )

    def delete_cached_image(self, image_id: object) -> None:
        self.call("delete-cached-image", to_image_id(image_id))

    def delete_all_cached_images(self) -> int:
        return self.call("delete-all-cached-images")

    def delete_queued_image(self, image_id: object) -> None:
        self.call("delete-queued-image", to_image_id(image_id))

    def delete_all_queued_images(self) -> int:
        return self.call("delete-all-queued-images")

    def get_least_recently_accessed(self) -> Optional[Tuple[str, int]]:
        r = self.call(
            "get-least-recently-accessed",
            check=lambda r: None if r is None else self._valid_ids("get-least-recently-accessed", [r[0]]),
        )
        return None if r is None else (r[0], r[1])

    def get_least_recently_accessed_batch(self, count: int) -> List[LruEntry]:
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an int, not {type(count).__name__}")
        if not 0 <= count <= 0xFFFFFFFF:
            raise ValueError(f"count {count} is out of range (0 to 4294967295)")

        def check(batch) -> Optional[str]:
            if len(batch) > count:
                return f"asked for {count} LRU entries, got {len(batch)}"
            return self._valid_ids("the LRU batch", [_field(e, "image-id") for e in batch])

        return [
            {
                "image_id": _field(e, "image-id"),
                "size": _field(e, "size"),
                "last_accessed": _field(e, "last-accessed"),
            }
            for e in self.call("get-least-recently-accessed-batch", count, check=check)
        ]

    def get_image_size(self, image_id: object) -> int:
        return self.call("get-image-size", to_image_id(image_id))

    def get_cached_nodes(self, image_id: object) -> List[str]:
        image_id = to_image_id(image_id)

        def check(nodes) -> Optional[str]:
            for n in nodes:
                if len(n) > 2048 or any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in n):
                    return f"get-cached-nodes returned an unusable node name {printable(n, 64)!r}"
            return None

        return list(self.call("get-cached-nodes", image_id, check=check))

    @staticmethod
    def _removed(files) -> List[RemovedFile]:
        return [{"image_id": _field(r, "image-id"), "size": _field(r, "size")} for r in files]

    @staticmethod
    def _failures(failures) -> List[str]:
        return [printable(f, 512) for f in list(failures)[:MAX_REPORTED_FAILURES]]

    def clean(self, stall_time: Optional[int] = None) -> CleanReport:
        def check(report) -> Optional[str]:
            ids = [_field(r, "image-id") for r in list(_field(report, "invalid")) + list(_field(report, "incomplete"))]
            return self._valid_ids("clean", ids)

        report = self.call("clean", stall_time, check=check)
        return {
            "invalid": self._removed(_field(report, "invalid")),
            "incomplete": self._removed(_field(report, "incomplete")),
            "failures": self._failures(_field(report, "failures")),
        }

    def prune(self, max_size: int) -> PruneReport:
        def check(report) -> Optional[str]:
            removed = list(_field(report, "removed"))
            broken = self._valid_ids("prune", [_field(r, "image-id") for r in removed])
            if broken:
                return broken
            total = sum(_field(r, "size") for r in removed)
            if total != _field(report, "bytes-removed"):
                return f"prune reported {_field(report, 'bytes-removed')} bytes removed, but its files add up to {total}"
            return None

        report = self.call("prune", max_size, check=check)
        return {
            "removed": self._removed(_field(report, "removed")),
            "bytes_removed": _field(report, "bytes-removed"),
            "size_after": _field(report, "size-after"),
            "failures": self._failures(_field(report, "failures")),
        }

    # -- sessions --------------------------------------------------------------------

    def open_session(self, kind: str, image_id: object) -> "Session":
        image_id = to_image_id(image_id)
        inst = self.checkout()
        resource = None
        try:
            resource, handle = self._guarded(inst, f"open-for-{kind}", image_id)
            # The file moves to the host: image bytes never enter the guest.
            rep = handle.to_host(inst.store).rep
            f = inst.state.files.pop(rep, None)
            if f is None:
                raise self._broke("it handed back a file the host does not know")
            identity = self._check_session_file(kind, image_id, f)
            if kind == "read":
                self._check_seal(image_id, f)
        except BaseException as e:
            if resource is not None:
                try:
                    inst.state.deadline = time.monotonic() + self.runtime.limits.call_deadline
                    inst.store.set_epoch_deadline(self.runtime.deadline_ticks())
                    with enter(inst.state):
                        resource.drop(inst.store)
                except (WasmtimeError, wasmtime.Trap):
                    pass
            self.settle(inst, e)
            raise
        return Session(self, kind, image_id, inst, resource, f, identity)

    def _check_session_file(self, kind: str, image_id: str, f: OpenFile) -> Tuple[int, int]:
        path = f"incomplete/{image_id}" if kind == "write" else image_id

        def broke(why: str) -> DriverFault:
            f.close()
            return self._broke(
                f"it broke the driver contract: the {kind} session of {quoted(image_id)} handed back {why}"
            )

        if kind == "write" and not f.writable:
            raise broke(f"{quoted(f.path)}, not a file it created")
        try:
            handed = f.identity()
        except OSError as e:
            raise broke(f"a file the host cannot stat ({e.strerror})") from None
        try:
            expected = self.root.identity(path)
        except Exception as e:  # FsError
            raise broke(f"{quoted(f.path)}, which is not {path} ({getattr(e, 'message', e)})") from None
        if expected != handed:
            raise broke(f"{quoted(f.path)}, which is not {path}")
        return handed

    def _check_seal(self, image_id: str, f: OpenFile) -> None:
        """A cached image's file carries the id the host sealed it with at
        commit (an attribute the driver cannot reach): a driver that renamed
        another image's file over this one is caught here, before a byte is
        served. Unsealed files (release 0.2's, Glance's, or on a file system
        without user attributes) pass."""
        try:
            sealed = host_xattr.read_seal(f.fd)
        except OSError as e:
            f.close()
            raise _io(f"reading the seal of {quoted(image_id)}", e) from None
        if sealed is not None and sealed != image_id.encode("utf-8", "surrogatepass"):
            f.close()
            shown = printable(sealed.decode("utf-8", "replace"), 80)
            raise self._broke(
                f"it broke the driver contract: the read session of {quoted(image_id)} "
                f"handed back the file committed as {quoted(shown)}"
            )


def _io(context: str, e: OSError) -> errors.IoError:
    """A host-side I/O failure as the Rust host's ``Error::io``: the
    context, the OS's reason, the ``fs`` error code."""
    reason = os.strerror(e.errno) if e.errno else "I/O error"
    return errors.IoError(f"{context}: {reason} (os error {e.errno})", io_error("", e).code)


class Session:
    """A write or read session: the instance it began on, the guest's
    session resource, and the file the host moves bytes through. Ending it
    without commit/abort/finish drops the guest's resource (a write session
    then aborts as "incomplete fetch"; a read counts nothing)."""

    def __init__(self, driver: Driver, kind: str, image_id: str, inst: Instance, resource, f: OpenFile, identity):
        self.driver = driver
        self.kind = kind
        self.image_id = image_id
        self._inst: Optional[Instance] = inst
        self._resource = resource
        self.file: Optional[OpenFile] = f
        self.identity = identity

    @property
    def open(self) -> bool:
        return self._inst is not None

    def _end(self, export: Optional[str], *args: Any) -> None:
        inst, resource = self._inst, self._resource
        if inst is None:
            raise errors.IoError(f"the session of image {quoted(self.image_id)} has already ended")
        self._inst = self._resource = None
        failed: Optional[BaseException] = None
        try:
            if export is not None:
                self.driver._guarded(inst, export, resource, *args)
        except BaseException as e:
            failed = e
        self._release(inst, resource, failed)

    def _release(self, inst: Instance, resource, failed: Optional[BaseException]) -> None:
        """The session is over: drop the guest's resource (running its
        destructor) whatever happened, unless the instance is already
        poisoned; the instance back to the pool (or discarded after a
        fault); the file closed; then raise ``failed`` if set."""
        if not isinstance(failed, DriverFault):
            try:
                inst.state.deadline = time.monotonic() + self.driver.runtime.limits.call_deadline
                inst.store.set_epoch_deadline(self.driver.runtime.deadline_ticks())
                with enter(inst.state):
                    resource.drop(inst.store)
            except (WasmtimeError, wasmtime.Trap) as e:
                failed = failed or self.driver._fault(e)
        self.driver.settle(inst, failed)
        if self.file is not None:
            self.file.close()
            self.file = None
        if failed is not None:
            raise failed

    def commit(self, checksum: Optional[str] = None) -> None:
        """Seal the file as this image (``user.image-cache.id``, see
        ``Driver._check_seal``), publish it; afterwards ``<id>`` must be
        the very file that was written. A seal that cannot be written (for
        another reason than a file system without user attributes) ends
        the session uncommitted, as an ``IoError``."""
        if self._inst is not None and self.file is not None:
            try:
                host_xattr.seal(self.file.fd, self.image_id)
            except OSError as e:
                self.drop()
                raise _io(f"sealing image {quoted(self.image_id)}", e) from None
        self._end("[method]write-session.commit", checksum)
        try:
            published = self.driver.root.identity(self.image_id)
        except Exception:  # FsError
            published = None
        if published != self.identity:
            raise self.driver._broke(
                f"it broke the driver contract: after the commit of {quoted(self.image_id)}, "
                f"{quoted(self.image_id)} is not the file that was written"
            )

    def abort(self, reason: str) -> None:
        self._end("[method]write-session.abort", reason)

    def checksum(self) -> Optional[str]:
        """The checksum the driver recorded for the image being read, or
        None. The file is lent to the guest for the call, as for
        ``finish``; the session stays open. A checksum that could not be
        sent as a header value (empty, longer than 128 bytes, or not ASCII
        letters, digits and ``+/=_:-``) breaks the contract; any failure
        ends the session uncounted."""
        inst, f = self._inst, self.file
        if inst is None or f is None:
            raise errors.IoError(f"the session of image {quoted(self.image_id)} has already ended")
        failed: Optional[BaseException] = None
        result = None
        try:
            rep = inst.state.add_file(f)
        except WasmtimeError as e:
            # add_file closed the file: the session cannot go on.
            self.file = None
            failed = self.driver._fault(e)
        else:
            try:
                result = self.driver._guarded(
                    inst, "[method]read-session.checksum", self._resource, ResourceHost.borrow(rep, FILE_TYPE)
                )
            except BaseException as e:
                failed = e
            finally:
                # The file comes back to the host; the session keeps it.
                inst.state.files.pop(rep, None)
        if failed is None and result is not None and not usable_checksum(result):
            failed = self.driver._broke(
                f"it broke the driver contract: the checksum of {quoted(self.image_id)} "
                "is not a short token of letters, digits and +/=_:-"
            )
        if failed is None:
            return result
        resource, self._inst, self._resource = self._resource, None, None
        self._release(inst, resource, failed)
        raise failed  # not reached: _release raises it

    def finish_read(self) -> None:
        """End a read: the file goes back into the guest's table for the
        duration of ``finish``, so the driver records the access on the very
        file that was read."""
        inst, f = self._inst, self.file
        if inst is None or f is None:
            return
        self.file = None
        rep = inst.state.add_file(f)
        try:
            self._end("[method]read-session.finish", ResourceHost.borrow(rep, FILE_TYPE))
        finally:
            lent = inst.state.files.pop(rep, None)
            if lent is not None:
                lent.close()

    def drop(self) -> None:
        """End without commit/abort/finish."""
        if self._inst is None:
            return
        try:
            self._end(None)
        except errors.CacheError as e:
            log.warning("ending a session of driver %s: %s", self.driver.name, e)

    def __del__(self) -> None:
        try:
            self.drop()
        except Exception:
            pass
