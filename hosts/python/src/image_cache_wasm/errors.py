"""The package's typed errors: one class per kind, the kind named as the
Rust host and the shared scenarios name it (``error.kind``)."""

from __future__ import annotations


class CacheError(Exception):
    """Base of every error the cache raises."""

    kind = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadConfiguration(CacheError):
    kind = "bad-configuration"

    def __str__(self) -> str:
        return f"bad configuration: {self.message}"


class InvalidImageId(CacheError):
    kind = "invalid-image-id"


class NotFound(CacheError):
    kind = "not-found"


class AlreadyCached(CacheError):
    kind = "already-cached"


class BeingCached(CacheError):
    kind = "being-cached"


class IoError(CacheError):
    """A file-system operation failed. ``code`` is the ``fs`` error code the
    driver reported with it (contract 0.3.0: ``not-found``,
    ``access-denied``, ``no-space``, ...), or ``io`` for a failure the host
    found itself, so a caller can tell a full disk from a denied access."""

    kind = "io"

    def __init__(self, message: str, code: str = "io"):
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"I/O error: {self.message}"


class DatabaseError(CacheError):
    kind = "database"

    def __str__(self) -> str:
        return f"database error: {self.message}"


class NotConfigured(CacheError):
    kind = "not-configured"


class Unsupported(CacheError):
    kind = "unsupported"


class ChecksumMismatch(CacheError):
    """The bytes did not match the expected checksum; nothing was cached."""

    kind = "checksum-mismatch"

    def __init__(self, image_id: str, expected: str, actual: str):
        super().__init__(
            f"checksum mismatch for image {image_id!r}: expected {expected}, got {actual}"
        )
        self.image_id = image_id
        self.expected = expected
        self.actual = actual


class SourceError(CacheError):
    """The image source failed; nothing was cached."""

    kind = "source"

    def __str__(self) -> str:
        return f"reading the image source failed: {self.message}"


class DriverFault(CacheError):
    """The driver trapped, ran past its deadline or broke the contract. Its
    instance was discarded; the next call gets a fresh one."""

    kind = "driver-fault"

    def __init__(self, driver: str, message: str):
        super().__init__(message)
        self.driver = driver

    def __str__(self) -> str:
        return f"driver {self.driver} failed: {self.message}"


class LoadError(CacheError):
    """A driver component could not be loaded (missing, not a component,
    wrong contract version, asks for an interface it was not granted)."""

    kind = "load"


class Overloaded(CacheError):
    kind = "overloaded"


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


def validate_image_id(image_id: str) -> None:
    """The host's own check of an id (SPEC.md), before it becomes a path."""
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
    else:
        return
    shown = image_id[:64] + ("..." if len(image_id) > 64 else "")
    raise InvalidImageId(f"invalid image id {quoted(shown)}: {reason}")
