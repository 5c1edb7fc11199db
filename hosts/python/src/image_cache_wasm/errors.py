"""The package's typed errors: one class per kind, the kind named as the
Rust host and the shared scenarios name it (``error.kind``)."""

from __future__ import annotations

import errno
import numbers
import uuid
from typing import Any, Optional


class CacheError(Exception):
    """Base of every error the cache raises. Most kinds are also the
    matching built-in exception (see each class), so code written for
    Glance's in-process drivers, or for files, catches them as it is:
    :class:`NotFound` is a :class:`FileNotFoundError`, :class:`IoError` an
    :class:`OSError` with ``errno``, :class:`InvalidImageId` a
    :class:`ValueError`, and so on. ``str(e)`` is the message."""

    kind = "error"
    #: The ``errno`` of the kinds that are an :class:`OSError`.
    errno_value: Optional[int] = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        if isinstance(self, OSError):
            os_error: OSError = self
            os_error.errno = self.errno_value
            os_error.strerror = message

    def __str__(self) -> str:
        return self.message


class BadConfiguration(CacheError, ValueError):
    """The cache root or an option cannot be used (Glance's
    ``BadDriverConfiguration``). A :class:`ValueError`."""

    kind = "bad-configuration"

    def __str__(self) -> str:
        return f"bad configuration: {self.message}"


class InvalidImageId(CacheError, ValueError):
    """An image id was refused before anything was touched: not a ``str``,
    ``int`` or :class:`uuid.UUID`, or a string the id rule refuses (empty,
    over 255 bytes, ``.``/``..``, a path separator, a control character).
    A :class:`ValueError`."""

    kind = "invalid-image-id"


class NotFound(CacheError, FileNotFoundError):
    """The image is not cached. A :class:`FileNotFoundError` (``errno``
    ``ENOENT``), which is what Glance's own drivers raise for a missing
    image (``open``, ``os.path.getsize`` of its file)."""

    kind = "not-found"
    errno_value = errno.ENOENT


class AlreadyCached(CacheError, FileExistsError):
    """A write session was refused: the image is already cached. A
    :class:`FileExistsError` (``EEXIST``)."""

    kind = "already-cached"
    errno_value = errno.EEXIST


class BeingCached(CacheError, FileExistsError):
    """A write session was refused: another writer is caching the image
    (its ``incomplete/`` file exists and is held). A
    :class:`FileExistsError` (``EEXIST``), like :class:`AlreadyCached`:
    either way the caller must not write it now (Glance's
    ``is_cacheable`` is false for both)."""

    kind = "being-cached"
    errno_value = errno.EEXIST


#: The ``errno`` of an :class:`IoError`, by the ``fs`` error code.
IO_ERRNO = {
    "not-found": errno.ENOENT,
    "already-exists": errno.EEXIST,
    "access-denied": errno.EACCES,
    "invalid-path": errno.EINVAL,
    "not-a-directory": errno.ENOTDIR,
    "is-a-directory": errno.EISDIR,
    "no-space": errno.ENOSPC,
    "unsupported": errno.EOPNOTSUPP,
    "limit-exceeded": errno.ENOBUFS,
    "timed-out": errno.ETIMEDOUT,
    "invalid-argument": errno.EINVAL,
    "io": errno.EIO,
}


class IoError(CacheError, OSError):
    """A file-system operation failed. ``code`` is the ``fs`` error code the
    driver reported with it (contract 0.3.0: ``not-found``,
    ``access-denied``, ``no-space``, ...), or ``io`` for a failure the host
    found itself, so a caller can tell a full disk from a denied access. An
    :class:`OSError` whose ``errno`` follows the code (``no-space``:
    ``ENOSPC``, ``access-denied``: ``EACCES``, ``not-found``: ``ENOENT``,
    ``timed-out``: ``ETIMEDOUT``, ``limit-exceeded``: ``ENOBUFS``,
    ``io``: ``EIO``, ...); always the class ``IoError`` itself, never
    :class:`FileNotFoundError` and the like, which are kept for the image
    itself (:class:`NotFound`)."""

    kind = "io"

    def __init__(self, message: str, code: str = "io"):
        super().__init__(message)
        self.code = code
        os_error: OSError = self
        os_error.errno = IO_ERRNO.get(code, errno.EIO)

    def __str__(self) -> str:
        return f"I/O error: {self.message}"


class DatabaseError(CacheError):
    """A metadata database operation failed (the centralized driver's
    shared database unreachable, timed out, refused a statement). Not a
    built-in: it is not a file-system error, and code that catches
    :class:`OSError` around cache calls must not take a shared database's
    outage for one (Python's own database errors, ``sqlite3.Error``, are
    not built-ins either)."""

    kind = "database"

    def __str__(self) -> str:
        return f"database error: {self.message}"


class NotConfigured(CacheError, RuntimeError):
    """The driver was called before ``configure`` succeeded. A
    :class:`RuntimeError`."""

    kind = "not-configured"


class Unsupported(CacheError, NotImplementedError):
    """The driver does not offer the operation (``get_cached_nodes`` on a
    driver whose metadata is local to one node). A
    :class:`NotImplementedError`, as Glance's drivers raise for it."""

    kind = "unsupported"


class ChecksumMismatch(CacheError, ValueError):
    """The bytes did not match the expected checksum; nothing was cached.
    A :class:`ValueError`."""

    kind = "checksum-mismatch"

    def __init__(self, image_id: str, expected: str, actual: str):
        super().__init__(
            f"checksum mismatch for image {image_id!r}: expected {expected}, got {actual}"
        )
        self.image_id = image_id
        self.expected = expected
        self.actual = actual


class SourceError(CacheError, OSError):
    """The image source failed; nothing was cached. An :class:`OSError`
    (``EIO``): reading the source was the I/O that failed; the source's own
    exception is chained when there is one."""

    kind = "source"
    errno_value = errno.EIO

    def __str__(self) -> str:
        return f"reading the image source failed: {self.message}"


class DriverFault(CacheError, RuntimeError):
    """The driver trapped, ran past its deadline or broke the contract. Its
    instance was discarded; the next call gets a fresh one. A
    :class:`RuntimeError`."""

    kind = "driver-fault"

    def __init__(self, driver: str, message: str):
        super().__init__(message)
        self.driver = driver

    def __str__(self) -> str:
        return f"driver {self.driver} failed: {self.message}"


class LoadError(CacheError):
    """A driver component could not be loaded (missing, not a component,
    wrong contract version, asks for an interface it was not granted).
    Not a built-in: none means "this plug-in cannot be used"
    (:class:`ImportError` is the import statement's)."""

    kind = "load"


class Overloaded(CacheError, TimeoutError):
    """Every instance of the driver stayed busy for ``instance_wait``
    seconds. A :class:`TimeoutError` (``ETIMEDOUT``)."""

    kind = "overloaded"
    errno_value = errno.ETIMEDOUT


#: The driver's WIT `error` cases, by tag.
DRIVER_ERRORS = {
    "bad-configuration": BadConfiguration,
    "invalid-image-id": InvalidImageId,
    "not-found": NotFound,
    "already-cached": AlreadyCached,
    "being-cached": BeingCached,
    "io": IoError,
    "database": DatabaseError,
    "not-configured": NotConfigured,
    "unsupported": Unsupported,
}

MAX_ID_LEN = 255


def quoted(s: str) -> str:
    """A string in double quotes with escapes, as the Rust host's messages
    show it (``{:?}``), so that messages read the same in every host."""
    import json

    return json.dumps(s, ensure_ascii=False)


def printable(s: str, limit: int) -> str:
    """A guest-supplied string as one printable line of at most ``limit``
    characters: control characters (terminal escapes included) become ``?``."""
    out = "".join("?" if _is_control(c) else c for c in s[:limit])
    if len(s) > limit:
        out += "..."
    return out


def _is_control(c: str) -> bool:
    o = ord(c)
    return o < 0x20 or 0x7F <= o < 0xA0


def to_image_id(value: Any) -> str:
    """An image id as the application gives it, as the string the driver
    gets, checked before any driver call. Glance's drivers take an id as
    ``str(image_id)``, and Glance's own tests pass integers, so: a ``str``
    is taken as it is, an integer (``int`` or any :class:`numbers.Integral`,
    but not ``bool``) as its decimal digits, a :class:`uuid.UUID` as its
    canonical form; anything else (``None``, ``bytes``, a float, another
    object) is an :class:`InvalidImageId`, as is a string the id rule
    refuses (:func:`validate_image_id`)."""
    if type(value) is str:
        image_id = value
    elif isinstance(value, str):
        image_id = str.__str__(value)
    elif isinstance(value, numbers.Integral) and not isinstance(value, bool):
        image_id = str(int(value))
    elif isinstance(value, uuid.UUID):
        image_id = str(value)
    else:
        raise InvalidImageId(
            f"invalid image id ({type(value).__name__}): an image id is a str, an int or a uuid.UUID"
        )
    validate_image_id(image_id)
    return image_id


def validate_image_id(image_id: str) -> None:
    """The host's own check of an id (docs/src/spec.md), before it becomes a path."""
    if not isinstance(image_id, str):
        raise InvalidImageId(f"invalid image id {image_id!r}: not a string")
    raw = image_id.encode("utf-8", "surrogatepass")
    if not image_id:
        reason = "it is empty"
    elif len(raw) > MAX_ID_LEN:
        reason = "it is longer than 255 bytes"
    elif image_id in (".", ".."):
        reason = "it is a relative directory name"
    elif "/" in image_id or "\\" in image_id:
        reason = "it contains a path separator"
    elif any(_is_control(c) for c in image_id):
        reason = "it contains a control character"
    elif any("\ud800" <= c <= "\udfff" for c in image_id):
        reason = "it is not valid Unicode (a lone surrogate)"
    else:
        return
    shown = image_id[:64] + ("..." if len(image_id) > 64 else "")
    if "surrogate" in reason:  # a message must itself be valid Unicode
        import json

        raise InvalidImageId(f"invalid image id {json.dumps(shown)}: {reason}")
    raise InvalidImageId(f"invalid image id {quoted(shown)}: {reason}")
