"""A Glance image-cache driver backed by the sandboxed driver component.

:class:`Driver` implements ``glance.image_cache.drivers.base.Driver`` on
:class:`image_cache_wasm.ImageCache`, so a Glance deployment's own
``glance.image_cache.ImageCache`` (API cache middleware, prefetcher,
pruner, cleaner) runs our component instead of Glance's in-process drivers.
It reads Glance's options (``image_cache_dir``, ``image_cache_sqlite_db``,
``image_cache_stall_time``) and one of its own:

``image_cache_wasm_driver``
    ``sqlite`` (default), ``xattr``, ``centralized`` (or Glance's
    ``centralized_db``), or the path of a driver component.

The centralized driver keeps every node's hits in Glance's own
``cached_images`` and ``node_reference`` tables, in the database
``image_cache_database_url`` names, else Glance's ``[database] connection``
(as the Rust CLI's ``--database-url``): PostgreSQL
(``postgresql+psycopg2://...``) or MySQL and MariaDB
(``mysql+pymysql://...``), by the URL's scheme; this node is Glance's
``worker_self_reference_url``. The pool holds
``image_cache_database_pool_size`` connections, else Glance's ``[database]
max_pool_size`` if it is set, else 4; ``image_cache_database_statement_timeout``
(default: the driver call's deadline), ``image_cache_database_connect_timeout``
(default 10s) and ``image_cache_database_allow_privileged_role`` (default
false: Glance's own role, the owner of its tables, is refused; give the cache
a role with only what ``image-cache db grants [--mysql]`` prints) are the Rust host's
options. A database that cannot be reached is a
:class:`~image_cache_wasm.DatabaseError`, never a ``BadDriverConfiguration``:
Glance would fall back to its sqlite driver and prune a shared cache on local
bookkeeping.

Glance picks its driver class by module name from a fixed list, so the
class is installed on an ``ImageCache`` with :func:`use_in` (or by setting
``driver_class`` and calling ``configure_driver()``, which is what it does).

Needs Glance (``pip install 'image_cache_wasm[glance]'``).
"""

from __future__ import annotations

import errno
import re
from contextlib import contextmanager

from glance.common import exception
from glance.image_cache.drivers import base
from oslo_config import cfg
from oslo_log import log as logging

from . import errors
from .cache import ImageCache
from .contract import BUILTIN_ALIASES
from .database import CENTRALIZED_DATABASE, DEFAULT_POOL_SIZE, DatabaseRoot, DatabaseSettings

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

_opts = [
    cfg.StrOpt(
        "image_cache_wasm_driver",
        default="sqlite",
        help="Driver component for the image_cache_wasm Glance driver: sqlite, xattr, centralized "
        "(centralized_db), or a component file.",
    ),
    cfg.StrOpt(
        "image_cache_database_url",
        secret=True,
        help="The centralized driver's database: PostgreSQL (postgresql://..., "
        "postgresql+psycopg2://...), MySQL or MariaDB (mysql+pymysql://...); default: "
        "[database] connection.",
    ),
    cfg.IntOpt(
        "image_cache_database_pool_size",
        min=1,
        max=1000,
        help="Most connections the cache holds to its database; default: [database] "
        "max_pool_size if set, else 4.",
    ),
    cfg.StrOpt(
        "image_cache_database_statement_timeout",
        help="The server's bound on one statement, lock wait and idle transaction (seconds, "
        "or 30s, 5m, ...); default: the driver call's deadline.",
    ),
    cfg.StrOpt(
        "image_cache_database_connect_timeout",
        default="10",
        help="How long opening a database connection may take (seconds, or 10s, 1m, ...).",
    ),
    cfg.BoolOpt(
        "image_cache_database_allow_privileged_role",
        default=False,
        help="Accept a database role with more than DML on the two cache tables (tests and "
        "migrations only).",
    ),
]
try:
    CONF.register_opts(_opts)
except cfg.DuplicateOptError:  # registered twice by a reload
    pass


def register_database_opts() -> None:
    """Glance's ``[database]`` options (oslo.db's), where this process has
    not registered them yet (glance-api has; a bare ``ImageCache`` may not)."""
    try:
        CONF.database.connection
        return
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError, AttributeError):
        pass
    try:
        from oslo_db import options as db_options
    except ImportError:  # no oslo.db: only our own option names a database
        return
    db_options.set_defaults(CONF)


def parse_duration(text) -> float:
    """Seconds from ``30``, ``2.5``, ``30s``, ``5m``, ``1h``, ``1d`` or
    ``1m30s`` (as the Rust host's options are written)."""
    t = str(text).strip()
    try:
        seconds = float(t)
    except ValueError:
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", t)
        if not parts or "".join(n + u for n, u in parts) != t.replace(" ", ""):
            raise ValueError(f"{t!r} is not a duration (write seconds, or 30s, 5m, 1h)") from None
        seconds = sum(float(n) * units[u] for n, u in parts)
    if seconds < 0:
        raise ValueError(f"{t!r} is negative")
    return seconds


def _glance_option(name: str, group: str = None):
    try:
        return getattr(CONF[group], name) if group else getattr(CONF, name)
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError, KeyError, AttributeError):
        return None


def _set_in_files(name: str, group: str) -> bool:
    """Whether an option was given (not just its default)."""
    try:
        return CONF.get_location(name, group).location not in (
            cfg.Locations.opt_default,
            cfg.Locations.set_default,
        )
    except Exception:  # noqa: BLE001 - an older oslo.config: take it as given
        return True


def database_settings():
    """The centralized driver's database, from Glance's configuration: our
    ``image_cache_database_*`` options, else Glance's ``[database]`` ones
    (the Rust CLI's mapping). None when no URL is configured."""
    register_database_opts()
    url = CONF.image_cache_database_url or _glance_option("connection", "database")
    if not url:
        return None
    pool = CONF.image_cache_database_pool_size
    if pool is None and _set_in_files("max_pool_size", "database"):
        pool = _glance_option("max_pool_size", "database")
    statement_timeout = CONF.image_cache_database_statement_timeout
    return DatabaseSettings(
        url,
        pool_size=int(pool) if pool else DEFAULT_POOL_SIZE,
        statement_timeout=parse_duration(statement_timeout) if statement_timeout else None,
        connect_timeout=parse_duration(CONF.image_cache_database_connect_timeout or "10"),
        allow_privileged_role=bool(CONF.image_cache_database_allow_privileged_role),
    )


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
        driver = CONF.image_cache_wasm_driver
        options = []
        databases = None
        if BUILTIN_ALIASES.get(driver, driver) == "centralized":
            node = _glance_option("worker_self_reference_url")
            if node:
                options.append(("worker_self_reference_url", node))
            try:
                settings = database_settings()
                if settings is not None:
                    databases = DatabaseRoot().with_database(CENTRALIZED_DATABASE, settings)
            except ValueError as e:  # the URL cannot be used (it is never shown)
                raise exception.BadDriverConfiguration(driver_name=__name__, reason=str(e))
        try:
            self.cache = ImageCache(
                CONF.image_cache_dir,
                driver=driver,
                sqlite_db=CONF.image_cache_sqlite_db,
                fallback_to_sqlite=False,
                options=options,
                databases=databases,
            )
        except errors.DatabaseError:
            # An outage, not a configuration: Glance must not fall back to
            # its sqlite driver for a shared cache.
            if databases is not None:
                databases.close()
            raise
        except errors.CacheError as e:
            if databases is not None:
                databases.close()
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
