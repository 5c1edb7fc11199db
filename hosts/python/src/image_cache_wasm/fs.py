"""``image-cache:driver/fs``: files of one cache root, and nothing else.

Mirrors ``host/src/fs.rs``. Every guest path is checked before any system
call (relative, no ``..``, no NUL or backslash), then resolved beneath the
root **one component at a time**: each directory is opened with
``os.open(name, O_DIRECTORY | O_NOFOLLOW, dir_fd=parent)``, so a symlink
anywhere in the path is refused rather than followed (stricter than the Rust
host, which follows a symlink that stays inside the root), and the final
component is used through ``dir_fd`` calls that never follow it. Messages
name root-relative paths, never where the root is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat as stat_mod
import time
from json import dumps as _dumps
from typing import Callable, List, Optional, Tuple

#: Most entries one listing returns (``fs.rs`` DEFAULT_MAX_LISTING).
DEFAULT_MAX_LISTING = 4_000_000
#: Most paths one ``remove-files`` takes.
MAX_BATCH = 1_000_000
#: Latest time a guest may set (the year 33658), as in the Rust host.
MAX_TIME = 1e12

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


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


class OpenFile:
    """A file the guest opened (a ``file`` resource). The host takes it out
    of the guest's table to move image bytes natively."""

    __slots__ = ("fd", "path", "size_at_open", "writable", "_closed")

    def __init__(self, fd: int, path: str, size_at_open: int, writable: bool):
        self.fd = fd
        self.path = path
        self.size_at_open = size_at_open
        self.writable = writable
        self._closed = False

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

    def create_new(self, path: str) -> OpenFile:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._at(path, lambda d, n: os.open(n, flags, 0o644, dir_fd=d))
        return OpenFile(fd, path, 0, True)

    def open(self, path: str) -> OpenFile:
        # O_NONBLOCK: opening a FIFO planted in the root must not hang the
        # host; it is cleared once the file is known to be a regular file.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = self._at(path, lambda d, n: os.open(n, flags, dir_fd=d))
        try:
            st = os.fstat(fd)
            if not stat_mod.S_ISREG(st.st_mode):
                raise FsError("is-a-directory", f"{path}: not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return OpenFile(fd, path, st.st_size, False)

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
        sparts, dparts = check_name(src), check_name(dst)
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
