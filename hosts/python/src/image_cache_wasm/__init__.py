"""image_cache_wasm: the image-cache driver components (WebAssembly,
contract ``image-cache:driver@0.3.0``) embedded in Python with wasmtime.

    from image_cache_wasm import ImageCache

    cache = ImageCache("/var/lib/glance/image-cache", driver="sqlite")
    with open("disk.img", "rb") as f:
        cache.cache("0f9c...", f)
    with cache.open_for_read("0f9c...") as image:
        data = image.read()

Results are plain dicts typed as :mod:`image_cache_wasm.results`
TypedDicts; errors are :mod:`image_cache_wasm.errors` classes, most of
them also the matching built-in (``NotFound`` is a ``FileNotFoundError``,
``IoError`` an ``OSError`` with ``errno``, ``InvalidImageId`` a
``ValueError``). Ids are ``str``, ``int`` or ``uuid.UUID``, taken as
``str(id)``.
"""

from .cache import Checksum, ImageCache, ImageId, ImageReader, ImageWriter, Tee, components_dir
from .database import CENTRALIZED_DATABASE, DatabaseRoot, DatabaseSettings, DbError, dialect_of_url
from .errors import (
    AlreadyCached,
    BadConfiguration,
    BeingCached,
    CacheError,
    ChecksumMismatch,
    DatabaseError,
    DriverFault,
    InvalidImageId,
    IoError,
    LoadError,
    NotConfigured,
    NotFound,
    Overloaded,
    SourceError,
    Unsupported,
    to_image_id,
)
from .results import CachedImage, CleanReport, DriverInfo, LruEntry, PruneReport, RemovedFile
from .runtime import CONTRACT, SUPPORTED, Limits, Runtime

__all__ = [
    "AlreadyCached",
    "BadConfiguration",
    "BeingCached",
    "CachedImage",
    "CacheError",
    "CENTRALIZED_DATABASE",
    "Checksum",
    "ChecksumMismatch",
    "CleanReport",
    "CONTRACT",
    "DatabaseError",
    "DatabaseRoot",
    "DatabaseSettings",
    "DbError",
    "DriverFault",
    "DriverInfo",
    "ImageCache",
    "ImageId",
    "ImageReader",
    "ImageWriter",
    "InvalidImageId",
    "IoError",
    "Limits",
    "LoadError",
    "LruEntry",
    "NotConfigured",
    "NotFound",
    "Overloaded",
    "PruneReport",
    "RemovedFile",
    "Runtime",
    "SourceError",
    "SUPPORTED",
    "Tee",
    "Unsupported",
    "components_dir",
    "dialect_of_url",
    "to_image_id",
]
