"""``image-cache:driver/xattr``: extended attributes of files the guest
opened. Mirrors ``host/src/xattr.rs``: only ``user.`` names pass, checked
before any system call, and none under ``user.image-cache.`` (the host's
own: a driver can neither read, write, remove nor list them); attributes
are read and written through the open file descriptor, so a path is never
resolved twice.

The host's own attribute is the seal: at commit the host sets
``user.image-cache.id`` to the image id on the file it filled, and a read
session whose file is sealed as another id is refused (``driver.py``)."""

from __future__ import annotations

import errno
import itertools
import os
from typing import Optional

from .errors import quoted
from .fs import FsError, OpenFile, RootFs, io_error

#: Longest attribute name (Linux's XATTR_NAME_MAX).
MAX_NAME = 255
#: Largest value a guest may store or read back. Linux never stores more
#: than 64 KiB in one attribute, so ``os.getxattr`` cannot be made to
#: allocate more than this.
MAX_VALUE = 64 * 1024

#: Attribute names the host keeps for itself: a driver can neither read,
#: write, remove nor list them.
HOST_PREFIX = "user.image-cache."
#: The host's seal on an image file: the id it was committed as, written by
#: the host on the file it filled, before the driver publishes it.
SEAL = "user.image-cache.id"
#: The attribute the probe sets (outside the host's prefix).
PROBE = "user.image-cache-probe"

_probes = itertools.count()


def check_name(name: str) -> None:
    if (
        not name.startswith("user.")
        or len(name) == len("user.")
        or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME
        or "\0" in name
    ):
        raise FsError(
            "access-denied", f"extended attribute {name!r}: only user.* names are allowed"
        )
    if name.startswith(HOST_PREFIX):
        raise FsError(
            "access-denied", f"extended attribute {quoted(name)}: {HOST_PREFIX}* is the host's own"
        )


def seal(fd: int, image_id: str) -> None:
    """Seal the open file ``fd`` as image ``image_id`` (the host, at
    commit). A file system without user attributes cannot carry seals (nor
    can one that refuses them): that is not an error."""
    try:
        os.setxattr(fd, SEAL, image_id.encode("utf-8", "surrogatepass"))
    except OSError as e:
        if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            raise


def read_seal(fd: int) -> Optional[bytes]:
    """The seal of an open image file: the id it was committed as, or None
    (a file of release 0.2 or of Glance, or a file system without user
    attributes)."""
    try:
        return os.getxattr(fd, SEAL)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            return None
        raise


def _unsupported(what: str) -> FsError:
    return FsError("unsupported", f"{what}: user extended attributes are not supported here")


class Attributes:
    """Attribute operations on one open file."""

    def __init__(self, file: OpenFile, enabled: bool = True):
        self.file = file
        self.enabled = enabled

    def _check(self) -> None:
        if not self.enabled:
            raise _unsupported(self.file.path)

    def get(self, name: str) -> bytes:
        check_name(name)
        self._check()
        try:
            value = os.getxattr(self.file.fd, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                raise FsError("not-found", f"{self.file.path}: no attribute {name}") from None
            raise io_error(self.file.path, e) from None
        if len(value) > MAX_VALUE:
            raise FsError(
                "limit-exceeded",
                f"{self.file.path}: attribute {name} is larger than {MAX_VALUE} bytes",
            )
        return value

    def set(self, name: str, value: bytes) -> None:
        check_name(name)
        self._check()
        if len(value) > MAX_VALUE:
            raise FsError(
                "limit-exceeded",
                f"{self.file.path}: attribute values are limited to {MAX_VALUE} bytes",
            )
        try:
            os.setxattr(self.file.fd, name, value)
        except OSError as e:
            raise io_error(self.file.path, e) from None

    def remove(self, name: str) -> None:
        check_name(name)
        self._check()
        try:
            os.removexattr(self.file.fd, name)
        except OSError as e:
            if e.errno == errno.ENODATA:
                return
            raise io_error(self.file.path, e) from None

    def list(self) -> list:
        self._check()
        try:
            names = os.listxattr(self.file.fd)
        except OSError as e:
            raise io_error(self.file.path, e) from None
        return [n for n in names if n.startswith("user.") and not n.startswith(HOST_PREFIX)]


def probe(root: RootFs, enabled: bool = True) -> None:
    """Whether the root's file system stores ``user.`` attributes: set one
    on a scratch file in the root (in ``incomplete/`` if it exists, so no
    listing takes it for an image), read it back, remove the file."""
    scratch = f".image-cache-xattr-probe-{os.getpid()}-{next(_probes)}"
    name = f"incomplete/{scratch}"
    try:
        f = root.create_new(name)
    except FsError as e:
        if e.code != "not-found":
            raise
        name = scratch
        f = root.create_new(name)
    try:
        attrs = Attributes(f, enabled)
        attrs.set(PROBE, b"1")
        if attrs.get(PROBE) != b"1":
            raise _unsupported("the cache root")
    except FsError as e:
        # The guest learns that the root lacks support, never where it is.
        if e.code in ("unsupported", "not-found"):
            raise _unsupported("the cache root") from None
        raise
    finally:
        f.close()
        try:
            root.remove_file(name)
        except FsError:
            pass
