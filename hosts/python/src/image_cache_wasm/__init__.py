"""image_cache_wasm: the image-cache driver components (WebAssembly,
contract ``image-cache:driver@0.3.0``) embedded in Python with wasmtime.

    from image_cache_wasm import ImageCache

    cache = ImageCache("/var/lib/glance/image-cache", driver="sqlite")
    with open("disk.img", "rb") as f:
        cache.cache("0f9c...", f)
    with cache.open_for_read("0f9c...") as image:
        data = image.read()
"""

from .cache import Checksum, ImageCache, ImageReader, ImageWriter, Tee, components_dir
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
)
from .runtime import CONTRACT, SUPPORTED, Limits, Runtime

__all__ = [
    "AlreadyCached",
    "BadConfiguration",
    "BeingCached",
    "CacheError",
    "CENTRALIZED_DATABASE",
    "Checksum",
    "ChecksumMismatch",
    "CONTRACT",
    "DatabaseError",
    "DatabaseRoot",
    "DatabaseSettings",
    "DbError",
    "DriverFault",
    "ImageCache",
    "ImageReader",
    "ImageWriter",
    "InvalidImageId",
    "IoError",
    "Limits",
    "LoadError",
    "NotConfigured",
    "NotFound",
    "Overloaded",
    "Runtime",
    "SourceError",
    "SUPPORTED",
    "Tee",
    "Unsupported",
    "components_dir",
    "dialect_of_url",
]
