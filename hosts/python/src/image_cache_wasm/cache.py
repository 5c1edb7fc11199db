"""The cache above the driver: Glance's ``ImageCache`` as a Pythonic API.

Image bytes never go through guest memory: the driver opens
``incomplete/<id>`` (or ``<id>``) through the ``fs`` import and hands the
file back; this module moves the bytes with ``os.write``/``os.read``,
``os.sendfile`` or ``os.copy_file_range`` and then asks the driver to
commit, abort or finish.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Iterable, Iterator, List, Optional, Sequence, Tuple, Type, Union

from . import errors
from .driver import Driver, Session
from .fs import RootFs, io_error
from .contract import BUILTIN_ALIASES
from .database import DatabaseRoot
from .results import CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport
from .runtime import BUILTIN_GRANTS, Limits, Runtime, default_runtime

log = logging.getLogger("image_cache_wasm")

CHUNK = 1024 * 1024
FIRST_CHUNK = 64 * 1024
DEFAULT_MAX_SIZE = 10 * 1024**3
DEFAULT_STALL_TIME = 86400
# Most driver calls one prune or delete-all makes (each evicts for about
# ten seconds at most).
MAX_EVICTION_CALLS = 1000
_HEX_LEN = {"md5": 32, "sha256": 64, "sha512": 128}

PathLike = Union[str, "os.PathLike[str]"]


#: What an application may pass as an image id: converted with ``str()``
#: (see :func:`image_cache_wasm.errors.to_image_id`); anything else is an
#: :class:`~image_cache_wasm.errors.InvalidImageId`.
ImageId = Union[str, int, uuid.UUID]

#: The driver components a wheel carries (``image_cache_wasm/components``).
PACKAGED_COMPONENTS = ("sqlite", "xattr", "centralized")


def _package_components() -> Optional[Path]:
    """The components the installed package carries (a wheel copies them
    in at build time), found with :mod:`importlib.resources`."""
    try:
        res = importlib.resources.files(__package__).joinpath("components")
    except (ModuleNotFoundError, TypeError):  # pragma: no cover - not a package
        return None
    return res if isinstance(res, Path) and res.is_dir() else None


def _repo_components() -> Optional[Path]:
    """In a source checkout (an editable install of hosts/python), the
    components ``cargo build`` built at the repository root."""
    here = Path(__file__).resolve()
    if len(here.parents) < 5 or here.parents[1].name != "src":
        return None
    repo = here.parents[4]
    if not (repo / "hosts" / "python" / "pyproject.toml").is_file():
        return None
    return repo / "target" / "guest" / "components"


def components_dir(explicit: Optional[PathLike] = None) -> Path:
    """Where the built-in driver components are: the argument, then
    ``IMAGE_CACHE_COMPONENTS_DIR`` (an override), then the package's own
    ``image_cache_wasm/components`` (what the wheel carries), then, in a
    source checkout, ``<repo>/target/guest/components``."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("IMAGE_CACHE_COMPONENTS_DIR")
    if env:
        return Path(env)
    packaged = _package_components()
    if packaged is not None:
        return packaged
    repo = _repo_components()
    if repo is not None:
        return repo
    return Path(str(importlib.resources.files(__package__).joinpath("components")))


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": 1024**2, "mb": 1024**2,
          "mib": 1024**2, "g": 1024**3, "gb": 1024**3, "gib": 1024**3, "t": 1024**4, "tb": 1024**4,
          "tib": 1024**4}


def parse_size(size: Union[int, str]) -> int:
    """Bytes from an int or a size as Glance's options are written
    (``10G``, ``512MiB``, ``1048576``); units are powers of 1024."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size < 0:
            raise ValueError(f"size {size} is negative")
        return size
    text = str(size).strip()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")
    unit = text[len(digits):].strip().lower()
    if not digits.isdigit() or unit not in _UNITS:
        raise ValueError(f"size {size!r}: write bytes, or a number with K, M, G or T (KiB, MiB, ...)")
    return int(digits) * _UNITS[unit]


class Checksum:
    """An expected digest: ``md5:HEX``, ``sha256:HEX``, ``sha512:HEX``, or a
    bare hex digest whose length names the algorithm (Glance's ``checksum``
    is a bare md5)."""

    def __init__(self, text: str):
        if ":" in text:
            algorithm, hexdigest = text.split(":", 1)
            algorithm = algorithm.lower()
            if algorithm not in _HEX_LEN:
                raise ValueError(f"unknown checksum algorithm {algorithm!r} (use md5, sha256 or sha512)")
        else:
            hexdigest = text
            algorithm = {32: "md5", 64: "sha256", 128: "sha512"}.get(len(text), "")
            if not algorithm:
                raise ValueError(f"checksum {text!r}: write it as md5:HEX, sha256:HEX or sha512:HEX")
        if len(hexdigest) != _HEX_LEN[algorithm] or any(c not in "0123456789abcdefABCDEF" for c in hexdigest):
            raise ValueError(f"checksum {text!r}: not a {algorithm} hex digest")
        self.algorithm = algorithm
        self.hex = hexdigest.lower()

    def hasher(self):
        return hashlib.new(self.algorithm)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


def _checksum(c: Union[None, str, Checksum]) -> Optional[Checksum]:
    if c is None or isinstance(c, Checksum):
        return c
    return Checksum(c)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class ImageWriter:
    """A write session. Write the bytes, then :meth:`commit` or
    :meth:`abort`. As a context manager it commits on a clean exit and
    aborts on an exception; ended neither way (:meth:`drop`, or garbage
    collected) it is aborted as "incomplete fetch" and lands in
    ``invalid/``."""

    def __init__(self, session: Session):
        self._session = session
        self.image_id = session.image_id
        self.bytes_written = 0

    def fileno(self) -> int:
        if self._session.file is None:
            raise ValueError("the write session has ended")
        return self._session.file.fd

    def write(self, data) -> int:
        _write_all(self.fileno(), data)
        n = len(data)
        self.bytes_written += n
        return n

    def copy_from(self, source: BinaryIO) -> int:
        """Copy everything ``source`` yields (natively when it has a file
        descriptor)."""
        dst = self.fileno()
        total = 0
        try:
            src = source.fileno()
        except (AttributeError, OSError, ValueError):
            src = None
        if src is not None:
            try:
                while True:
                    n = os.copy_file_range(src, dst, CHUNK * 16)
                    if n == 0:
                        break
                    total += n
                self.bytes_written += total
                return total
            except OSError as e:
                if total or e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP
                    raise errors.SourceError(str(e)) from None
        while True:
            try:
                chunk = source.read(CHUNK)
            except OSError as e:
                raise errors.SourceError(str(e)) from None
            if not chunk:
                break
            self.write(chunk)
            total += len(chunk)
        return total

    def commit(self, checksum: Union[None, str, Checksum] = None) -> None:
        """Flush the bytes to stable storage and publish the image."""
        try:
            os.fdatasync(self.fileno())
        except OSError as e:
            message = f"flushing image {self.image_id!r}: {e.strerror}"
            self.abort(message)
            raise errors.IoError(message, io_error("", e).code) from None
        c = _checksum(checksum)
        self._session.commit(str(c) if c else None)

    def abort(self, reason: str) -> None:
        self._session.abort(reason)

    def drop(self) -> None:
        """End the session without commit or abort ("incomplete fetch")."""
        self._session.drop()

    @property
    def closed(self) -> bool:
        return not self._session.open

    def __enter__(self) -> "ImageWriter":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if not self._session.open:
            return
        if exc is None:
            self.commit()
        else:
            try:
                self.abort(f"{type(exc).__name__}: {exc}")
            except errors.CacheError as e:
                log.warning("aborting the write of image %r: %s", self.image_id, e)


class ImageReader:
    """A read of a cached image (a binary file-like object). Reading to the
    end, or :meth:`finish`, counts the hit; closing it earlier counts
    nothing."""

    def __init__(self, session: Session):
        self._session = session
        self.image_id = session.image_id
        assert session.file is not None, "a read session has its file"
        self.size = os.fstat(session.file.fd).st_size

    def fileno(self) -> int:
        if self._session.file is None:
            raise ValueError("the read session has ended")
        return self._session.file.fd

    def read(self, n: int = -1) -> bytes:
        if self._session.file is None:
            return b""
        fd = self._session.file.fd
        if n is None or n < 0:
            parts = []
            while True:
                b = os.read(fd, max(CHUNK, self.size + 1))
                if not b:
                    break
                parts.append(b)
            self.finish()
            return b"".join(parts)
        b = os.read(fd, n) if n else b""
        if n and not b:
            self.finish()
        return b

    def __iter__(self) -> Iterator[bytes]:
        while True:
            b = self.read(min(CHUNK, max(self.size + 1, 1)))
            if not b:
                return
            yield b

    def copy_to(self, sink: BinaryIO) -> int:
        """Copy the image into ``sink`` (natively when it has a file
        descriptor) and count the hit."""
        src = self.fileno()
        total = 0
        try:
            dst = sink.fileno()
        except (AttributeError, OSError, ValueError):
            dst = None
        if dst is not None:
            sink.flush()
            while True:
                n = os.sendfile(dst, src, None, CHUNK * 16)
                if n == 0:
                    break
                total += n
        else:
            for chunk in self:
                sink.write(chunk)
                total += len(chunk)
        self.finish()
        return total

    def checksum(self) -> Optional[str]:
        """The checksum recorded when the image was cached (what the writer
        passed to ``commit``, e.g. ``md5:HEX``, for the sqlite and xattr
        drivers), or None if there is none, or once the read has ended. One driver call; it does not end the read, so reading on and
        finishing still count the hit. A failure ends the read without a
        hit: a checksum that could not go into an HTTP header (empty, over
        128 bytes, characters other than ASCII letters, digits and
        ``+/=_:-``) is a :class:`~image_cache_wasm.errors.DriverFault`."""
        if not self._session.open:
            return None
        return self._session.checksum()

    def finish(self) -> None:
        """End the read and count the hit (once)."""
        if self._session.open:
            self._session.finish_read()

    def close(self) -> None:
        """End the read; counts nothing unless it was finished."""
        self._session.drop()

    @property
    def closed(self) -> bool:
        return not self._session.open

    def __enter__(self) -> "ImageReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TeeReport:
    def __init__(self) -> None:
        self.bytes = 0
        self.cached = False
        self.cache_error: Optional[str] = None


class Tee:
    """Glance's caching iterator: iterate it to pass every chunk of
    ``source`` on while it is cached. After iteration, :attr:`report` says
    whether the image was cached."""

    def __init__(self, cache: "ImageCache", image_id: ImageId, source: Iterable[bytes], checksum: Optional[Checksum]):
        self.cache = cache
        self.image_id = errors.to_image_id(image_id)
        self.source = source
        self.checksum = checksum
        self.report = TeeReport()

    def __iter__(self) -> Iterator[bytes]:
        image_id, report = self.image_id, self.report
        try:
            writer: Optional[ImageWriter] = self.cache.open_for_write(image_id)
        except (errors.AlreadyCached, errors.BeingCached):
            writer = None
        except errors.CacheError as e:
            log.warning("cannot cache image %r, passing it through: %s", image_id, e)
            writer, report.cache_error = None, str(e)

        def abort(reason: str) -> None:
            nonlocal writer
            if writer is not None:
                w, writer = writer, None
                try:
                    w.abort(reason)
                except errors.CacheError as e:
                    log.warning("aborting the write of image %r: %s", image_id, e)

        hasher = self.checksum.hasher() if self.checksum else None
        it = iter(self.source)
        try:
            while True:
                try:
                    chunk = next(it)
                except StopIteration:
                    break
                except Exception as e:
                    abort(f"the image source failed: {e}")
                    raise errors.SourceError(str(e)) from e
                if hasher is not None:
                    hasher.update(chunk)
                if writer is not None:
                    try:
                        writer.write(chunk)
                    except (OSError, ValueError) as e:
                        message = f"writing image {image_id!r} into the cache failed: {e}"
                        log.warning("%s; passing the rest through", message)
                        abort(message)
                        report.cache_error = message
                report.bytes += len(chunk)
                yield chunk
        except GeneratorExit:
            abort("the destination stopped reading")
            raise
        if self.checksum is not None and hasher is not None:
            actual = hasher.hexdigest()
            if actual != self.checksum.hex:
                abort("checksum mismatch")
                raise errors.ChecksumMismatch(image_id, str(self.checksum), f"{self.checksum.algorithm}:{actual}")
        if writer is not None:
            try:
                writer.commit(self.checksum)
                report.cached = True
            except errors.CacheError as e:
                log.warning("committing image %r to the cache failed: %s", image_id, e)
                report.cache_error = str(e)


class ImageCache:
    """An image cache on one root directory, its driver logic in a
    sandboxed WebAssembly component.

    ``driver`` is ``"sqlite"`` (default), ``"xattr"``, ``"centralized"``
    (Glance's ``centralized_db``: every node's metadata in Glance's tables
    in a shared PostgreSQL, MySQL or MariaDB database, the one ``databases`` maps the name
    ``glance`` to, this node named by the option
    ``worker_self_reference_url``), or the path of a component file
    implementing the driver world (contract ``image-cache:driver@0.3.0``),
    granted only ``fs`` and ``clock`` unless ``grants`` names ``xattr`` or
    ``database`` (the grant ``sqlite`` of contract 0.2 is retired: accepted
    with a warning, it grants nothing). ``databases`` (a
    :class:`~image_cache_wasm.DatabaseRoot`) are the shared databases a
    driver granted ``database`` may open by name; a database whose
    ``statement_timeout`` is not set takes the call deadline. ``sqlite_db`` is
    the metadata database's name in the root, passed to the driver as
    ``image_cache_sqlite_db``: the one file at the top of the root (with its
    ``-journal``) the driver may open read-write. If the chosen driver fails
    to configure, the cache falls back to sqlite with a warning, as Glance
    does, unless ``fallback_to_sqlite=False``; a driver whose database
    cannot be reached (a :class:`~image_cache_wasm.DatabaseError`) never
    falls back: a shared cache pruned on local bookkeeping would delete
    files whose shared rows stay.
    """

    def __init__(
        self,
        root: PathLike,
        driver: Union[str, PathLike] = "sqlite",
        *,
        components: Optional[PathLike] = None,
        grants: Optional[Iterable[str]] = None,
        sqlite_db: str = "cache.db",
        options: Optional[Sequence[Tuple[str, str]]] = None,
        fallback_to_sqlite: bool = True,
        runtime: Optional[Runtime] = None,
        limits: Optional[Limits] = None,
        xattr: bool = True,
        databases: Optional[DatabaseRoot] = None,
    ):
        self.root = Path(root)
        self.components = components_dir(components)
        if runtime is None:
            runtime = Runtime(limits) if limits is not None else default_runtime()
        self.runtime = runtime
        self.sqlite_db = sqlite_db
        self.extra_options = list(options or [])
        self.xattr = xattr
        self.databases = databases if databases is not None else DatabaseRoot()
        self.databases.default_statement_timeout(runtime.limits.call_deadline)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._rootfs = RootFs(os.fspath(self.root), runtime.limits.max_listing)
        except OSError as e:
            raise errors.BadConfiguration(f"cache root {self.root}: {e.strerror}") from None
        self._lock = threading.Lock()
        try:
            self._driver = self._start(driver, grants)
        except errors.BadConfiguration as e:
            if not fallback_to_sqlite or driver == "sqlite":
                raise
            log.warning("driver %s cannot be used (%s); falling back to sqlite", driver, e)
            self._driver = self._start("sqlite", None)
        self.driver_name = self._driver.name

    # -- drivers -----------------------------------------------------------------

    def _source(self, driver: Union[str, PathLike], grants: Optional[Iterable[str]]):
        if isinstance(driver, str):
            driver = BUILTIN_ALIASES.get(driver, driver)
        if isinstance(driver, str) and driver in BUILTIN_GRANTS:
            path = self.components / f"{driver}_driver.wasm"
            if not path.is_file():
                raise errors.LoadError(
                    f"cannot load driver {driver}: no component at {path} (a wheel of "
                    "image_cache_wasm carries them in image_cache_wasm/components; in a source "
                    "checkout build them with `cargo build`; or set IMAGE_CACHE_COMPONENTS_DIR)"
                )
            return path, BUILTIN_GRANTS[driver], driver
        path = Path(driver)
        return path, frozenset(grants or ()), str(path)

    def _start(self, driver, grants) -> Driver:
        path, granted, name = self._source(driver, grants)
        loaded = self.runtime.load(path, granted, name=name)
        options = [("image_cache_sqlite_db", self.sqlite_db)] + self.extra_options
        return Driver(
            self.runtime, loaded, self._rootfs, options, xattr_enabled=self.xattr, databases=self.databases
        )

    @property
    def driver(self) -> Driver:
        with self._lock:
            return self._driver

    def swap_driver(self, driver: Union[str, PathLike], grants: Optional[Iterable[str]] = None) -> None:
        """Load and configure another driver off the hot path, then swap it
        in atomically. Sessions already open finish on the old driver."""
        new = self._start(driver, grants)
        with self._lock:
            old, self._driver = self._driver, new
            self.driver_name = new.name
        old.close()

    def close(self) -> None:
        self._driver.close()

    def __enter__(self) -> "ImageCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def info(self) -> DriverInfo:
        return self.driver.info.copy()

    # -- the SPEC operations ---------------------------------------------------------

    def get_cache_size(self) -> int:
        return self.driver.get_cache_size()

    def get_hit_count(self, image_id: ImageId) -> int:
        return self.driver.get_hit_count(image_id)

    def get_cached_images(self) -> List[CachedImage]:
        return self.driver.get_cached_images()

    def list_cached(self) -> List[CachedImage]:
        """Every cached image (``image_id``, ``hits``, ``size``,
        ``last_accessed``, ``last_modified``), ordered by id."""
        return self.get_cached_images()

    def is_cached(self, image_id: ImageId) -> bool:
        return self.driver.is_cached(image_id)

    def is_being_cached(self, image_id: ImageId) -> bool:
        return self.driver.is_being_cached(image_id)

    def is_cacheable(self, image_id: ImageId) -> bool:
        return self.driver.is_cacheable(image_id)

    def is_queued(self, image_id: ImageId) -> bool:
        return self.driver.is_queued(image_id)

    def queue(self, image_id: ImageId) -> bool:
        """Queue an image for prefetching; False if it is already cached,
        being cached or queued."""
        return self.driver.queue_image(image_id)

    queue_image = queue

    def get_queued_images(self) -> List[str]:
        return self.driver.get_queued_images()

    def delete_cached_image(self, image_id: ImageId) -> None:
        self.driver.delete_cached_image(image_id)

    def delete_all_cached_images(self) -> int:
        """Every cached image evicted; how many. A driver call stops
        evicting after about ten seconds: called again until one removes
        nothing."""
        total = 0
        for _ in range(MAX_EVICTION_CALLS):
            removed = self.driver.delete_all_cached_images()
            total += removed
            if removed == 0:
                break
        return total

    def delete_queued_image(self, image_id: ImageId) -> None:
        self.driver.delete_queued_image(image_id)

    def delete_all_queued_images(self) -> int:
        return self.driver.delete_all_queued_images()

    def get_least_recently_accessed(self) -> Optional[Tuple[str, int]]:
        return self.driver.get_least_recently_accessed()

    def get_least_recently_accessed_batch(self, count: int) -> List[LruEntry]:
        return self.driver.get_least_recently_accessed_batch(count)

    def get_image_size(self, image_id: ImageId) -> int:
        return self.driver.get_image_size(image_id)

    def get_cached_nodes(self, image_id: ImageId) -> List[str]:
        return self.driver.get_cached_nodes(image_id)

    def prune(self, max_size: Union[int, str] = DEFAULT_MAX_SIZE) -> PruneReport:
        """Evict least recently accessed images until the cache is at or
        under ``max_size`` (bytes, or ``"10G"``, ``"512MiB"``):
        ``{removed: [{image_id, size}], bytes_removed, size_after,
        failures}``. A driver call stops evicting after about ten seconds
        and reports what it removed; while one removed something, failed
        nothing and left the cache over ``max_size``, it is called again and
        the reports add up (as the Rust host does)."""
        limit = parse_size(max_size)
        report = self.driver.prune(limit)
        for _ in range(1, MAX_EVICTION_CALLS):
            if report["size_after"] <= limit or not report["removed"] or report["failures"]:
                break
            more = self.driver.prune(limit)
            report["removed"].extend(more["removed"])
            report["bytes_removed"] += more["bytes_removed"]
            report["size_after"] = more["size_after"]
            report["failures"].extend(more["failures"])
            if not more["removed"]:
                break
        return report

    def clean(self, stall_time: int = DEFAULT_STALL_TIME) -> CleanReport:
        """Delete invalid files and incomplete files older than
        ``stall_time`` seconds: ``{invalid, incomplete, failures}``."""
        seconds = int(stall_time)
        if seconds < 0:
            raise ValueError(f"stall time {stall_time} is negative")
        return self.driver.clean(seconds)

    # -- sessions and bytes ---------------------------------------------------------

    def open_for_write(self, image_id: ImageId) -> ImageWriter:
        return ImageWriter(self.driver.open_session("write", image_id))

    def open_for_read(self, image_id: ImageId) -> ImageReader:
        """A reader of a cached image, for a ``with`` block; reading it to
        the end counts the hit. ``NotFound`` if it is not cached."""
        return ImageReader(self.driver.open_session("read", image_id))

    def read(self, image_id: ImageId) -> bytes:
        """The whole image, counting the hit."""
        with self.open_for_read(image_id) as r:
            return r.read()

    def read_into(self, image_id: ImageId, sink: BinaryIO) -> int:
        with self.open_for_read(image_id) as r:
            return r.copy_to(sink)

    def cache(self, image_id: ImageId, fileobj: BinaryIO, checksum: Union[None, str, Checksum] = None) -> int:
        """Cache everything ``fileobj`` yields as ``image_id``, verifying
        ``checksum`` if given; the number of bytes. Strict: an image that
        cannot be cached (already cached, being cached) is an error. Bytes
        are copied natively when ``fileobj`` has a file descriptor and no
        checksum is asked for."""
        c = _checksum(checksum)
        image_id = errors.to_image_id(image_id)
        with self.open_for_write(image_id) as w:
            if c is None:
                n = w.copy_from(fileobj)
                w.commit()
                return n
            hasher = c.hasher()
            n = 0
            while True:
                try:
                    chunk = fileobj.read(CHUNK)
                except OSError as e:
                    raise errors.SourceError(str(e)) from None
                if not chunk:
                    break
                hasher.update(chunk)
                w.write(chunk)
                n += len(chunk)
            actual = hasher.hexdigest()
            if actual != c.hex:
                w.abort("checksum mismatch")
                raise errors.ChecksumMismatch(image_id, str(c), f"{c.algorithm}:{actual}")
            w.commit(c)
            return n

    def cache_file(self, image_id: ImageId, path: PathLike, checksum: Union[None, str, Checksum] = None) -> int:
        try:
            f = open(path, "rb")
        except OSError as e:
            raise errors.SourceError(f"{path}: {e.strerror}") from None
        with f:
            return self.cache(image_id, f, checksum)

    def cache_stream(self, image_id: ImageId, source: Iterable[bytes], checksum: Union[None, str, Checksum] = None) -> Tee:
        """Glance's caching iterator: iterate the result to pass every chunk
        of ``source`` on while it is cached (see :class:`Tee`)."""
        return Tee(self, image_id, source, _checksum(checksum))
