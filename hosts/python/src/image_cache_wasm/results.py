"""The shapes of what the cache returns, as :class:`typing.TypedDict`\\ s.

At run time every result is a plain ``dict`` (Glance's callers index them,
``json.dumps`` serializes them, ``==`` compares them with dict literals);
the types only tell a type checker (and the reader) which keys there are
and what they hold. Times are Unix seconds (``float``), sizes bytes.
"""

from __future__ import annotations

from typing import List, TypedDict


class CachedImage(TypedDict):
    """One cached image (``get_cached_images``), the keys of Glance's
    ``Driver.get_cached_images``."""

    image_id: str
    hits: int
    size: int
    last_accessed: float
    last_modified: float


class RemovedFile(TypedDict):
    """A file removed by ``prune`` or ``clean``."""

    image_id: str
    size: int


class LruEntry(TypedDict):
    """One entry of ``get_least_recently_accessed_batch``, least recently
    accessed first."""

    image_id: str
    size: int
    last_accessed: float


class PruneReport(TypedDict):
    """What ``prune`` did: the images it evicted, the bytes they held, the
    cache's size afterwards, and what it could not remove (messages)."""

    removed: List[RemovedFile]
    bytes_removed: int
    size_after: int
    failures: List[str]


class CleanReport(TypedDict):
    """What ``clean`` removed: invalid files, stalled incomplete files, and
    the failures (messages)."""

    invalid: List[RemovedFile]
    incomplete: List[RemovedFile]
    failures: List[str]


class DriverInfo(TypedDict):
    """The driver's ``info`` (printable, bounded strings)."""

    name: str
    version: str
    description: str


__all__ = [
    "CachedImage",
    "CleanReport",
    "DriverInfo",
    "LruEntry",
    "PruneReport",
    "RemovedFile",
]
