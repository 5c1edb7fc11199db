"""``image-cache:driver/fs``: files of one cache root, and nothing else.

Mirrors ``host/src/fs.rs``. Every guest path is checked before any system
call (relative, no ``..``, no NUL or backslash), then resolved beneath the
root **one component at a time**: each directory is opened with
``os.open(name, O_DIRECTORY | O_NOFOLLOW, dir_fd=parent)``, so a symlink
anywhere in the path is refused rather than followed (stricter than the Rust
host, which follows a symlink that stays inside the root), and the final
component is used through ``dir_fd`` calls that never follow it. Messages
name root-relative paths, never where the root is.

Whatever another process planted in the root, only regular files (and
directories, for listings) are ever opened: every open is
``O_NONBLOCK | O_NOFOLLOW`` (a FIFO cannot hold the call), then checked by
``fstat`` (a directory is ``is-a-directory``; a FIFO, socket or device is
``access-denied``) and by its link count (a file with another hard link may
be a link to a file outside the root: ``access-denied``).

A driver writes only its own files (``open-read-write``): the metadata
database at the top of the root (with its ``-journal``, or the ``-wal`` a
database of release 0.2 left) and files in its own directories, never an
image's file or anything under ``incomplete/``, ``invalid/`` or ``queue/``.
Byte-range locks (SQLite's, inside the driver) are open-file-description
locks (``F_OFD_SETLK``): two opens of one file exclude each other in one
process as in two, and they conflict with native SQLite's POSIX locks. The
runtime releases them at the end of every driver call
(:meth:`OpenFile.release_range_locks`).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat as stat_mod
import struct
import time
from json import dumps as _dumps
from typing import Callable, List, Optional, Tuple

#: Most entries one listing returns (``limits.rs`` DEFAULT_MAX_LISTING).
DEFAULT_MAX_LISTING = 4_000_000
#: Most paths one ``remove-files`` takes.
MAX_BATCH = 1_000_000
#: Latest time a guest may set (the year 33658), as in the Rust host.
MAX_TIME = 1e12
#: Most bytes one ``read-at`` or ``write-at`` moves.
MAX_IO = 1 << 20
#: Largest file a driver may make of its own (``write-at``, ``set-len``).
MAX_DRIVER_FILE = 16 << 30
#: Largest file offset (``off_t``).
MAX_OFFSET = (1 << 63) - 1
#: Directories whose files are images or fills: never a driver's to write.
IMAGE_DIRS = ("incomplete", "invalid", "queue")
#: The metadata database's name when the options name none.
DEFAULT_DB = "cache.db"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Every open of a file: never blocks on a FIFO, never follows a final
#: symlink, never leaks into a child process.
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC

#: ``struct flock`` (``<fcntl.h>``): l_type, l_whence, l_start, l_len,
#: l_pid, padded to its C size (the alignment of off_t).
_FLOCK = struct.Struct("hhqqi")
_FLOCK_PAD = b"\0" * (-_FLOCK.size % struct.calcsize("q"))
_RANGE_LOCKS = {"unlocked": fcntl.F_UNLCK, "shared": fcntl.F_RDLCK, "exclusive": fcntl.F_WRLCK}


class FsError(Exception):
    """An expected failure, returned to the guest as an ``fs-error``."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _shown(path: str) -> str:
    return path if path else "."


def io_error(path: str, e: OSError) -> FsError:
    """An OS error in the guest's terms, naming the root-relative path (and
    never the absolute one the OS may have put in the exception)."""
    code = {
        errno.ENOENT: "not-found",
        errno.EEXIST: "already-exists",
        errno.EACCES: "access-denied",
        errno.EPERM: "access-denied",
        errno.ELOOP: "access-denied",  # a symlink where none may be followed
        errno.ENOSPC: "no-space",
        errno.EDQUOT: "no-space",
        errno.ENOTDIR: "not-a-directory",
        errno.EISDIR: "is-a-directory",
        errno.EOPNOTSUPP: "unsupported",
        errno.ENOTSUP: "unsupported",
        errno.ENODATA: "unsupported",
        errno.ENOTEMPTY: "io",
    }.get(e.errno, "io")
    reason = os.strerror(e.errno) if e.errno else "I/O error"
    return FsError(code, f"{_shown(path)}: {reason} (os error {e.errno})")


def _q(path: str) -> str:
    # As the Rust host quotes a path (`{:?}`), so messages read the same.
    return _dumps(path, ensure_ascii=False)


def check_path(path: str) -> List[str]:
    """The components of a guest path, checked before any system call. The
    empty path and ``.`` name the root itself (no components)."""
    if "\0" in path or "\\" in path:
        raise FsError("invalid-path", f"{_q(path)}: NUL or backslash in a path")
    if path.startswith("/"):
        raise FsError("access-denied", f"{_q(path)}: absolute paths are not allowed")
    parts = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise FsError("access-denied", f"{_q(path)}: `..` is not allowed")
        parts.append(part)
    return parts


def check_name(path: str) -> List[str]:
    parts = check_path(path)
    if not parts:
        raise FsError("invalid-path", f"{_q(path)} names the root, not a file")
    return parts


_STAGING_DIRS = ("incomplete", "queue")


def _rename_allowed(sp: List[str], dp: List[str]) -> bool:
    """As the Rust host's ``RootFs::rename`` decides (components, ``.``
    already dropped)."""

    def from_incomplete(name: str) -> bool:
        return len(sp) == 2 and sp[0] == "incomplete" and sp[1] == name

    if len(dp) == 1:
        return from_incomplete(dp[0])
    if len(sp) == 1:
        return False
    if dp[0] in _STAGING_DIRS:
        return False
    if sp[0] in _STAGING_DIRS:
        return len(dp) == 2 and dp[0] == "invalid" and from_incomplete(dp[1])
    return True


def to_time(ns: int) -> float:
    """Seconds since the epoch; a time before it reads as 0."""
    if ns <= 0:
        return 0.0
    secs, nanos = divmod(ns, 1_000_000_000)
    return secs + nanos / 1e9


def from_time(t: float) -> int:
    """A guest's time in nanoseconds, checked: finite, 1970..MAX_TIME."""
    if not isinstance(t, float) or t != t or not (0.0 <= t <= MAX_TIME):
        raise FsError(
            "invalid-argument",
            f"{t} is not a usable time (seconds since 1970, at most {MAX_TIME:g})",
        )
    secs = int(t)
    return secs * 1_000_000_000 + int(round((t - secs) * 1e9))


def kind_of(mode: int) -> str:
    if stat_mod.S_ISLNK(mode):
        return "symlink"
    if stat_mod.S_ISREG(mode):
        return "regular-file"
    if stat_mod.S_ISDIR(mode):
        return "directory"
    return "other"


def metadata_of(st: os.stat_result) -> dict:
    return {
        "kind": kind_of(st.st_mode),
        "size": st.st_size,
        "accessed": to_time(st.st_atime_ns),
        "modified": to_time(st.st_mtime_ns),
    }


def _span(path: str, offset: int, length: int) -> int:
    """The end of ``length`` bytes from ``offset``, if it fits a file
    offset (``invalid-argument`` otherwise)."""
    end = offset + length
    if offset < 0 or length < 0 or end > MAX_OFFSET:
        raise FsError(
            "invalid-argument",
            f"{path}: {length} bytes at offset {offset} are past any file offset",
        )
    return end


def _within_driver_cap(path: str, end: int) -> None:
    if end > MAX_DRIVER_FILE:
        raise FsError(
            "limit-exceeded",
            f"{path}: a driver's own file may not grow past {MAX_DRIVER_FILE} bytes",
        )


def regular(path: str, st: os.stat_result) -> None:
    """Refuse what is not a regular file with one link: a directory, a
    FIFO, socket or device (planted to block or confuse the host), or a file
    with other hard links (one may be outside the root)."""
    if stat_mod.S_ISDIR(st.st_mode):
        raise FsError("is-a-directory", f"{path}: not a regular file")
    if not stat_mod.S_ISREG(st.st_mode):
        raise FsError("access-denied", f"{path}: not a regular file")
    if st.st_nlink > 1:
        raise FsError(
            "access-denied",
            f"{path}: has {st.st_nlink} hard links; refused (it may be a link to a file outside the root)",
        )


class OpenFile:
    """A file the guest opened (a ``file`` resource). The host takes it out
    of the guest's table to move image bytes natively."""

    __slots__ = ("fd", "path", "size_at_open", "writable", "driver_writes", "_closed")

    def __init__(self, fd: int, path: str, size_at_open: int, writable: bool, driver_writes: bool = False):
        self.fd = fd
        self.path = path
        self.size_at_open = size_at_open
        #: Created for writing (``create-new``): a write session's file.
        self.writable = writable
        #: The driver may write it itself (``open-read-write``).
        self.driver_writes = driver_writes
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                os.close(self.fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    def identity(self) -> Tuple[int, int]:
        st = os.fstat(self.fd)
        return (st.st_dev, st.st_ino)

    def metadata(self) -> dict:
        try:
            return metadata_of(os.fstat(self.fd))
        except OSError as e:
            raise io_error(self.path, e) from None

    def sync(self) -> None:
        try:
            os.fsync(self.fd)
        except OSError as e:
            raise io_error(self.path, e) from None

    def set_times(self, accessed: Optional[float], modified: Optional[float]) -> None:
        a = from_time(accessed) if accessed is not None else None
        m = from_time(modified) if modified is not None else None
        try:
            if a is None or m is None:
                st = os.fstat(self.fd)
                a = st.st_atime_ns if a is None else a
                m = st.st_mtime_ns if m is None else m
            os.utime(self.fd, ns=(a, m))
        except OSError as e:
            raise io_error(self.path, e) from None

    def try_lock(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:
            raise io_error(self.path, e) from None

    def lock(self, deadline: float) -> None:
        """Take the exclusive lock, waiting for other holders until
        ``deadline`` (a ``time.monotonic()`` value), never longer."""
        pause = 0.0002
        while True:
            if self.try_lock():
                return
            now = time.monotonic()
            if now >= deadline:
                raise FsError(
                    "timed-out",
                    f"{self.path}: another holder kept the lock until the call's deadline",
                )
            time.sleep(min(pause, deadline - now))
            pause = min(pause * 2, 0.01)

    def unlock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError as e:
            raise io_error(self.path, e) from None

    # -- a driver's own files (SQLite inside the driver) ------------------

    def size(self) -> int:
        try:
            return os.fstat(self.fd).st_size
        except OSError as e:
            raise io_error(self.path, e) from None

    def _refuse_driver_write(self) -> None:
        if not self.driver_writes:
            raise FsError(
                "access-denied",
                f"{self.path}: not opened with open-read-write (only the host writes an image's bytes)",
            )

    def read_at(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes (at most ``MAX_IO``) from ``offset``:
        fewer at the end of the file, none past it."""
        if length > MAX_IO:
            raise FsError("limit-exceeded", f"{self.path}: more than {MAX_IO} bytes in one read")
        _span(self.path, offset, length)
        parts = []
        done = 0
        try:
            while done < length:
                got = os.pread(self.fd, length - done, offset + done)
                if not got:
                    break
                parts.append(got)
                done += len(got)
        except OSError as e:
            raise io_error(self.path, e) from None
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def write_at(self, offset: int, data) -> None:
        """Write all of ``data`` (at most ``MAX_IO`` bytes) at ``offset``, in
        a file the driver may write, never past ``MAX_DRIVER_FILE``."""
        self._refuse_driver_write()
        if len(data) > MAX_IO:
            raise FsError("limit-exceeded", f"{self.path}: more than {MAX_IO} bytes in one write")
        _within_driver_cap(self.path, _span(self.path, offset, len(data)))
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise io_error(self.path, e) from None

    def set_len(self, size: int) -> None:
        self._refuse_driver_write()
        _within_driver_cap(self.path, size)
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:
            raise io_error(self.path, e) from None

    def sync_data(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise io_error(self.path, e) from None

    def _ofd_lock(self, cmd: int, kind: int, start: int, length: int) -> int:
        """One open-file-description lock call; the ``l_type`` it leaves
        (``-1``: held elsewhere, for ``F_OFD_SETLK``)."""
        _span(self.path, start, length)
        arg = _FLOCK.pack(kind, os.SEEK_SET, start, length, 0) + _FLOCK_PAD
        try:
            out = fcntl.fcntl(self.fd, cmd, arg)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):
                return -1
            raise io_error(self.path, e) from None
        return _FLOCK.unpack(out[: _FLOCK.size])[0]

    def set_range_lock(self, start: int, length: int, lock: str) -> bool:
        """Set a byte-range lock (``unlocked``, ``shared``, ``exclusive``)
        without waiting; False if another open file holds a conflicting
        one. ``length`` 0 reaches past the end of the file."""
        kind = _RANGE_LOCKS.get(lock)
        if kind is None:
            raise FsError("invalid-argument", f"{self.path}: no range lock {lock!r}")
        return self._ofd_lock(fcntl.F_OFD_SETLK, kind, start, length) != -1

    def range_locked_elsewhere(self, start: int, length: int) -> bool:
        """Whether another open file holds a lock on the range that would
        conflict with an exclusive one."""
        return self._ofd_lock(fcntl.F_OFD_GETLK, fcntl.F_WRLCK, start, length) != fcntl.F_UNLCK

    def release_range_locks(self) -> None:
        """Release every byte-range lock this open file holds (the end of a
        driver call). Never fails: a closed file holds none."""
        if self._closed:
            return
        whole_file = _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0) + _FLOCK_PAD
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, whole_file)
        except OSError:
            pass


class RootFs:
    """The cache root a driver instance may use, and nothing else."""

    def __init__(self, path: str, max_listing: int = DEFAULT_MAX_LISTING):
        self.path = os.fspath(path)
        # The operator's own path: the one open that may follow symlinks.
        self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.max_listing = max_listing

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # -- resolution ------------------------------------------------------

    def _open_dir(self, parts: List[str], path: str) -> int:
        """An fd of the directory ``parts`` beneath the root, opened one
        component at a time without following any symlink. The caller
        closes it (it is never the root's own fd)."""
        fd = os.dup(self.fd)
        try:
            for part in parts:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR) and self._is_symlink(fd, part):
                        raise FsError(
                            "access-denied",
                            f"{_shown(path)}: a symbolic link in the path is never followed",
                        ) from None
                    raise io_error(path, e) from None
                os.close(fd)
                fd = nxt
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _is_symlink(dir_fd: int, name: str) -> bool:
        try:
            return stat_mod.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
        except OSError:
            return False

    def _at(self, path: str, op: Callable[[int, str], object]):
        """Run ``op(parent_fd, final_name)`` for a path that names an entry
        (not the root)."""
        parts = check_name(path)
        parent = self._open_dir(parts[:-1], path)
        try:
            return op(parent, parts[-1])
        except OSError as e:
            raise io_error(path, e) from None
        finally:
            os.close(parent)

    # -- the interface ---------------------------------------------------

    def _open_regular(self, path: str, flags: int) -> Tuple[int, os.stat_result]:
        """Open ``path`` without blocking and without following a final
        symlink, then keep it only if it is a regular file with one link
        (and clear ``O_NONBLOCK``)."""
        fd = self._at(path, lambda d, n: os.open(n, flags | _OPEN_FLAGS, 0o644, dir_fd=d))
        try:
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise io_error(path, e) from None
            regular(path, st)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def create_new(self, path: str) -> OpenFile:
        fd, _ = self._open_regular(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        return OpenFile(fd, path, 0, True)

    def open(self, path: str) -> OpenFile:
        fd, st = self._open_regular(path, os.O_RDONLY)
        return OpenFile(fd, path, st.st_size, False)

    def open_read_write(self, path: str, create: bool, db: str = DEFAULT_DB) -> OpenFile:
        """Open a file of the driver's own for reading and writing (creating
        it if ``create``; never truncated): at the top of the root only the
        metadata database ``db`` and its ``-journal`` (or the ``-wal`` a
        database of release 0.2 left); nothing under ``incomplete/``,
        ``invalid/`` or ``queue/``; files in other directories are the
        driver's own."""
        parts = check_name(path)
        first = parts[0]
        if len(parts) == 1:
            allowed = first in (db, f"{db}-journal", f"{db}-wal")
        else:
            allowed = first not in IMAGE_DIRS
        if not allowed:
            raise FsError(
                "access-denied",
                f"{path}: not a file a driver may write (at the top of the root only the "
                f"metadata database {db} and its journal; nothing under "
                + ", ".join(d + "/" for d in IMAGE_DIRS)
                + ")",
            )
        flags = os.O_RDWR | (os.O_CREAT if create else 0)
        fd, st = self._open_regular(path, flags)
        return OpenFile(fd, path, st.st_size, False, driver_writes=True)

    def stat(self, path: str) -> dict:
        parts = check_path(path)
        if not parts:
            return metadata_of(os.fstat(self.fd))
        return metadata_of(
            self._at(path, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False))
        )

    def identity(self, path: str) -> Tuple[int, int]:
        """Device and inode of the regular file at ``path`` (never through
        a final symlink)."""
        st = self._at(path, lambda d, n: os.stat(n, dir_fd=d, follow_symlinks=False))
        if not stat_mod.S_ISREG(st.st_mode):
            raise FsError("is-a-directory", f"{path}: not a regular file")
        return (st.st_dev, st.st_ino)

    def create_dir(self, path: str) -> None:
        self._at(path, lambda d, n: os.mkdir(n, 0o755, dir_fd=d))

    def _walk(self, path: str, deadline: Optional[float], describe) -> list:
        parts = check_path(path)
        fd = self._open_dir(parts, path)
        listing = []
        try:
            try:
                it = os.scandir(fd)
            except OSError as e:
                raise io_error(path, e) from None
            with it:
                for entry in it:
                    if len(listing) >= self.max_listing:
                        raise FsError(
                            "limit-exceeded", f"{_shown(path)}: more than {self.max_listing} entries"
                        )
                    if (
                        deadline is not None
                        and len(listing) % 1024 == 1023
                        and time.monotonic() >= deadline
                    ):
                        raise FsError("timed-out", f"{_shown(path)}: stopped at the call's deadline")
                    try:
                        listing.append(describe(entry))
                    except FileNotFoundError:
                        continue
                    except OSError as e:
                        raise io_error(f"{path}/{entry.name}", e) from None
        finally:
            os.close(fd)
        return listing

    def list_dir(self, path: str, deadline: Optional[float] = None) -> list:
        return self._walk(
            path,
            deadline,
            lambda e: {"name": e.name, "metadata": metadata_of(e.stat(follow_symlinks=False))},
        )

    def list_names(self, path: str, deadline: Optional[float] = None) -> list:
        def describe(e: os.DirEntry) -> dict:
            if e.is_symlink():
                kind = "symlink"
            elif e.is_file(follow_symlinks=False):
                kind = "regular-file"
            elif e.is_dir(follow_symlinks=False):
                kind = "directory"
            else:
                kind = "other"
            return {"name": e.name, "kind": kind}

        return self._walk(path, deadline, describe)

    def rename(self, src: str, dst: str) -> None:
        """Rename within the root, where images cannot be forged by moving
        files: into the top of the root only ``incomplete/<name>`` to
        ``<name>`` (a commit), and ``incomplete/<name>`` otherwise only to
        ``invalid/<name>`` (an abort); nothing leaves the top of the root or
        moves into ``incomplete/`` or ``queue/``. So the bytes at ``<id>``
        are always a file the host filled: never one the driver wrote
        (``open-read-write``) nor another image's."""
        sparts, dparts = check_name(src), check_name(dst)
        if not _rename_allowed(sparts, dparts):
            raise FsError(
                "access-denied",
                f"{src} -> {dst}: not a rename a driver may make (into the top of the root "
                "only incomplete/<name> -> <name>, out of incomplete/ only to "
                "invalid/<name>; nothing leaves the top of the root)",
            )
        sdir = self._open_dir(sparts[:-1], src)
        try:
            ddir = self._open_dir(dparts[:-1], dst)
            try:
                os.rename(sparts[-1], dparts[-1], src_dir_fd=sdir, dst_dir_fd=ddir)
            except OSError as e:
                raise io_error(f"{src} -> {dst}", e) from None
            finally:
                os.close(ddir)
        finally:
            os.close(sdir)

    def remove_file(self, path: str) -> None:
        def unlink(d: int, n: str) -> None:
            st = os.stat(n, dir_fd=d, follow_symlinks=False)
            if stat_mod.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "Is a directory")
            os.unlink(n, dir_fd=d)

        self._at(path, unlink)

    def set_times(self, path: str, accessed: Optional[float], modified: Optional[float]) -> None:
        a = from_time(accessed) if accessed is not None else None
        m = from_time(modified) if modified is not None else None

        def utime(d: int, n: str) -> None:
            na, nm = a, m
            if na is None or nm is None:
                st = os.stat(n, dir_fd=d, follow_symlinks=False)
                na = st.st_atime_ns if na is None else na
                nm = st.st_mtime_ns if nm is None else nm
            os.utime(n, ns=(na, nm), dir_fd=d, follow_symlinks=False)

        self._at(path, utime)
