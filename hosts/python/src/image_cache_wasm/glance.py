"""A Glance image-cache driver backed by the sandboxed driver component.

:class:`Driver` implements ``glance.image_cache.drivers.base.Driver`` on
:class:`image_cache_wasm.ImageCache`, so a Glance deployment's own
``glance.image_cache.ImageCache`` (API cache middleware, prefetcher,
pruner, cleaner) runs our component instead of Glance's in-process drivers.
It reads Glance's options (``image_cache_dir``, ``image_cache_sqlite_db``,
``image_cache_stall_time``) and one of its own:

``image_cache_wasm_driver``
    ``sqlite`` (default), ``xattr``, or the path of a driver component.

Glance picks its driver class by module name from a fixed list, so the
class is installed on an ``ImageCache`` with :func:`use_in` (or by setting
``driver_class`` and calling ``configure_driver()``, which is what it does).

Needs Glance (``pip install 'image_cache_wasm[glance]'``).
"""

from __future__ import annotations

import errno
from contextlib import contextmanager

from glance.common import exception
from glance.image_cache.drivers import base
from oslo_config import cfg
from oslo_log import log as logging

from . import errors
from .cache import ImageCache

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

_opts = [
    cfg.StrOpt(
        "image_cache_wasm_driver",
        default="sqlite",
        help="Driver component for the image_cache_wasm Glance driver: sqlite, xattr, or a component file.",
    ),
]
try:
    CONF.register_opts(_opts)
except cfg.DuplicateOptError:  # registered twice by a reload
    pass


def use_in(glance_cache) -> None:
    """Make a ``glance.image_cache.ImageCache`` use :class:`Driver`, through
    its own ``configure_driver`` (which falls back to Glance's sqlite driver
    if ours cannot be configured)."""
    glance_cache.driver_class = Driver
    glance_cache.configure_driver()


def _not_found(e: errors.NotFound) -> FileNotFoundError:
    # What Glance's drivers raise for a missing cache file.
    return FileNotFoundError(errno.ENOENT, e.message)


class _CacheFile:
    """The file object Glance writes into (``write``/``flush``/``fileno``)."""

    def __init__(self, writer):
        self._writer = writer

    def write(self, data) -> int:
        return self._writer.write(data)

    def flush(self) -> None:
        pass  # written straight to the file descriptor; commit syncs

    def fileno(self) -> int:
        return self._writer.fileno()


class Driver(base.Driver):
    """Glance's driver interface on the image_cache_wasm component."""

    cache: ImageCache

    def configure(self):
        # Glance's paths (base_dir, incomplete_dir, ...) for callers that use
        # get_image_filepath; the component creates the directories itself.
        self.set_paths()
        try:
            self.cache = ImageCache(
                CONF.image_cache_dir,
                driver=CONF.image_cache_wasm_driver,
                sqlite_db=CONF.image_cache_sqlite_db,
                fallback_to_sqlite=False,
            )
        except errors.CacheError as e:
            raise exception.BadDriverConfiguration(driver_name=__name__, reason=str(e))

    def get_cache_size(self):
        return self.cache.get_cache_size()

    def get_hit_count(self, image_id):
        return self.cache.get_hit_count(image_id)

    def get_cached_images(self):
        return [
            {
                "image_id": i["image_id"],
                "hits": i["hits"],
                "last_accessed": i["last_accessed"],
                "last_modified": i["last_modified"],
                "size": i["size"],
            }
            for i in self.cache.get_cached_images()
        ]

    def get_cached_nodes(self, image_id):
        try:
            return self.cache.get_cached_nodes(image_id)
        except errors.Unsupported as e:
            raise NotImplementedError(e.message) from None

    def is_cached(self, image_id):
        return self.cache.is_cached(image_id)

    def is_cacheable(self, image_id):
        return self.cache.is_cacheable(image_id)

    def is_being_cached(self, image_id):
        return self.cache.is_being_cached(image_id)

    def is_queued(self, image_id):
        return self.cache.is_queued(image_id)

    def delete_all_cached_images(self):
        return self.cache.delete_all_cached_images()

    def delete_cached_image(self, image_id):
        self.cache.delete_cached_image(image_id)

    def delete_all_queued_images(self):
        return self.cache.delete_all_queued_images()

    def delete_queued_image(self, image_id):
        self.cache.delete_queued_image(image_id)

    def queue_image(self, image_id):
        return self.cache.queue(image_id)

    def clean(self, stall_time=None):
        if stall_time is None:
            stall_time = CONF.image_cache_stall_time
        report = self.cache.clean(int(stall_time))
        for failure in report["failures"]:
            LOG.warning("image cache clean: %s", failure)
        return report

    def get_least_recently_accessed(self):
        return self.cache.get_least_recently_accessed()

    @contextmanager
    def open_for_write(self, image_id):
        """Glance's semantics: commit when the block ends normally, roll
        back (into ``invalid/``) when it raises, and when it neither raises
        nor completes (the consumer went away) roll back as "incomplete
        fetch"."""
        writer = self.cache.open_for_write(image_id)
        try:
            yield _CacheFile(writer)
        except Exception as e:
            LOG.warning("Fetch of cache file %s failed (%s), rolling back", image_id, e)
            writer.abort(str(e))
            raise
        else:
            writer.commit()
        finally:
            if not writer.closed:
                writer.abort("incomplete fetch")

    @contextmanager
    def open_for_read(self, image_id):
        """Yield the cached file; the hit is counted when the block ends
        normally (as Glance's drivers do), nothing when it raises."""
        try:
            reader = self.cache.open_for_read(image_id)
        except errors.NotFound as e:
            raise _not_found(e) from None
        try:
            yield reader
        except BaseException:
            reader.close()
            raise
        reader.finish()

    def get_image_size(self, image_id):
        try:
            return self.cache.get_image_size(image_id)
        except errors.NotFound as e:
            raise _not_found(e) from None

    def get_queued_images(self):
        return self.cache.get_queued_images()
