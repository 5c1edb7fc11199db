"""A Glance image-cache driver backed by the sandboxed driver components,
and the switch that makes Glance use it.

:class:`Driver` implements ``glance.image_cache.drivers.base.Driver`` on
:class:`image_cache_wasm.ImageCache`, so a Glance deployment's own
``glance.image_cache.ImageCache`` (API cache middleware, cache API,
prefetcher, pruner, cleaner) runs a component instead of Glance's
in-process drivers. It reads Glance's options (``image_cache_driver``,
``image_cache_dir``, ``image_cache_sqlite_db``, ``image_cache_stall_time``)
and one of its own:

``image_cache_wasm_driver``
    Unset (the default): the component of Glance's ``image_cache_driver``
    (``sqlite`` -> ``sqlite``, ``xattr`` -> ``xattr``, ``centralized_db`` ->
    ``centralized``). Else ``sqlite``, ``xattr``, ``centralized`` (or
    ``centralized_db``), or the path of a driver component.

**The switch.** Glance picks its driver class by module name from a fixed
list (``glance.image_cache.drivers.<image_cache_driver>``).
:func:`install` makes every ``glance.image_cache.ImageCache`` of the process
use :class:`Driver` instead, for the driver ``image_cache_driver`` names.
``image_cache_wasm.glance.wsgi:application`` is Glance's
``glance.wsgi.api:application`` with :func:`install` done first: pointing
the WSGI server at it is the one configuration change that switches a
glance-api onto the components (``python -m image_cache_wasm.glance
COMMAND`` does the same for Glance's other commands). Under the switch,
``image_cache_driver = centralized_db`` whose database is neither
PostgreSQL nor MySQL/MariaDB (Glance's tests run it on SQLite), or whose
role the component refuses (Glance's own: it owns the tables; give the
cache a role of its own in ``image_cache_database_url``), stays on Glance's
own ``centralized_db`` driver, with a warning saying why. :func:`use_in`
installs :class:`Driver` on one ``ImageCache``.

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

Ids are taken as Glance's drivers take them, ``str(image_id)`` (Glance's
own tests pass integers); anything but a ``str``, an ``int`` or a
``uuid.UUID`` is an :class:`~image_cache_wasm.InvalidImageId` (a
``ValueError``). A missing image is a :class:`~image_cache_wasm.NotFound`,
which is a ``FileNotFoundError`` as Glance's drivers raise.

Needs Glance (``pip install 'image_cache_wasm[glance]'``).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator, List, Optional, Tuple

from glance.common import exception
from glance.image_cache.drivers import base
from oslo_config import cfg
from oslo_log import log as logging

from .. import errors
from ..cache import ImageCache, ImageId, ImageReader, ImageWriter
from ..contract import BUILTIN_ALIASES
from ..database import CENTRALIZED_DATABASE, DEFAULT_POOL_SIZE, DatabaseRoot, DatabaseSettings, dialect_of_url
from ..results import CachedImage, CleanReport

LOG = logging.getLogger(__name__)
CONF = cfg.CONF

_opts = [
    cfg.StrOpt(
        "image_cache_wasm_driver",
        help="Driver component for the image_cache_wasm Glance driver: sqlite, xattr, centralized "
        "(centralized_db), or a component file; default: the component of image_cache_driver.",
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


def _glance_option(name: str, group: Optional[str] = None) -> Any:
    try:
        return getattr(CONF[group], name) if group else getattr(CONF, name)
    except (cfg.NoSuchOptError, cfg.NoSuchGroupError, KeyError, AttributeError):
        return None


def _set_in_files(name: str, group: str) -> bool:
    """Whether an option was given (not just its default)."""
    try:
        location = CONF.get_location(name, group)
        return location is None or location.location not in (
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


#: The component that serves each of Glance's ``image_cache_driver`` names.
COMPONENT_OF_GLANCE_DRIVER = {"sqlite": "sqlite", "xattr": "xattr", "centralized_db": "centralized"}


def component_name() -> Optional[str]:
    """The component :class:`Driver` runs: ``image_cache_wasm_driver`` if
    set, else the component of Glance's ``image_cache_driver`` (None for a
    name that has none)."""
    explicit = CONF.image_cache_wasm_driver
    if explicit:
        return explicit
    glance_name = _glance_option("image_cache_driver")
    return COMPONENT_OF_GLANCE_DRIVER.get(str(glance_name or "sqlite").lower())


def use_in(glance_cache) -> None:
    """Make one ``glance.image_cache.ImageCache`` use :class:`Driver`,
    through its own ``configure_driver`` (which falls back to Glance's
    sqlite driver if ours cannot be configured). :func:`install` does it
    for every ``ImageCache`` of the process."""
    glance_cache.driver_class = Driver
    glance_cache.configure_driver()


def _database_is_served() -> bool:
    """Whether the centralized component's host can serve the configured
    database (PostgreSQL, MySQL or MariaDB)."""
    register_database_opts()
    url = CONF.image_cache_database_url or _glance_option("connection", "database")
    if not url:
        return False
    try:
        dialect_of_url(url)
    except ValueError:
        return False
    return True


def installed() -> bool:
    """Whether :func:`install` is in force in this process."""
    from glance import image_cache as glance_image_cache

    return getattr(glance_image_cache.ImageCache.init_driver, "_image_cache_wasm", False)


def install() -> None:
    """The switch: from now on every ``glance.image_cache.ImageCache`` of
    this process (glance-api's cache middleware and cache API, the cache
    worker's prefetcher, glance-cache-pruner/-cleaner/-prefetcher) runs the
    driver Glance's ``image_cache_driver`` names on its component
    (``sqlite``, ``xattr``, ``centralized_db`` -> ``centralized``), or the
    one ``image_cache_wasm_driver`` names, through :class:`Driver`.

    It replaces ``ImageCache.init_driver`` (Glance's choice of a driver class
    by module name) and nothing else. A component that cannot be
    configured (``BadDriverConfiguration``) takes Glance's own fallback to
    its sqlite driver, except for ``centralized_db`` (with
    ``image_cache_wasm_driver`` unset): whose database is not PostgreSQL,
    MySQL or MariaDB, or refused (Glance's own role, which owns the tables:
    see ``image_cache_database_url``), stays on Glance's own
    ``centralized_db`` driver, with a warning saying why. A database that
    cannot be reached is a :class:`~image_cache_wasm.DatabaseError`, raised.
    Idempotent; :func:`uninstall` undoes it."""
    from glance import image_cache as glance_image_cache

    cls = glance_image_cache.ImageCache
    if getattr(cls.init_driver, "_image_cache_wasm", False):
        return
    glance_init_driver = cls.init_driver

    def init_driver(self) -> None:
        glance_name = str(_glance_option("image_cache_driver") or "").lower()
        component = component_name()
        if component is None:
            glance_init_driver(self)
            return
        # centralized_db chosen by Glance's option: where the component
        # cannot serve it, Glance's own centralized_db driver does (never
        # Glance's sqlite fallback: local bookkeeping for a shared cache).
        keep_centralized = glance_name == "centralized_db" and not CONF.image_cache_wasm_driver
        if keep_centralized and not _database_is_served():
            LOG.warning(
                "image_cache_driver = centralized_db, but the database is not PostgreSQL, MySQL "
                "or MariaDB (the hosts of the centralized component serve only those): Glance's "
                "own centralized_db driver serves it"
            )
            glance_init_driver(self)
            return
        self.driver_class = Driver
        driver = Driver()
        try:
            driver.configure()
        except exception.BadDriverConfiguration as e:
            if keep_centralized:
                LOG.warning(
                    "image_cache_driver = centralized_db cannot run on the centralized component "
                    "(%s): Glance's own centralized_db driver serves it",
                    e,
                )
                glance_init_driver(self)
                return
            # Glance's own fallback (to its sqlite driver), as it does it.
            self.configure_driver()
            return
        self.driver = driver
        LOG.info("Image cache driver %r runs on the %s component (image_cache_wasm).", glance_name, component)

    init_driver._image_cache_wasm = True  # type: ignore[attr-defined]
    init_driver.__wrapped__ = glance_init_driver  # type: ignore[attr-defined]
    init_driver.__doc__ = glance_init_driver.__doc__
    cls.init_driver = init_driver


def uninstall() -> None:
    """Undo :func:`install` (for tests): ``ImageCache`` objects made from
    now on pick Glance's own drivers again."""
    from glance import image_cache as glance_image_cache

    cls = glance_image_cache.ImageCache
    if getattr(cls.init_driver, "_image_cache_wasm", False):
        cls.init_driver = cls.init_driver.__wrapped__


class _CacheFile:
    """The file object Glance writes into (``write``/``flush``/``fileno``)."""

    def __init__(self, writer: ImageWriter):
        self._writer = writer

    def write(self, data: bytes) -> int:
        return self._writer.write(data)

    def flush(self) -> None:
        pass  # written straight to the file descriptor; commit syncs

    def fileno(self) -> int:
        return self._writer.fileno()


class Driver(base.Driver):
    """Glance's driver interface on the image_cache_wasm component."""

    cache: ImageCache

    def configure(self) -> None:
        # Glance's paths (base_dir, incomplete_dir, ...) for callers that use
        # get_image_filepath; the component creates the directories itself.
        self.set_paths()
        driver = component_name()
        if driver is None:
            raise exception.BadDriverConfiguration(
                driver_name=__name__,
                reason=f"image_cache_driver {_glance_option('image_cache_driver')!r} has no component; "
                "set image_cache_wasm_driver",
            )
        options: List[Tuple[str, str]] = []
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

    def get_cache_size(self) -> int:
        return self.cache.get_cache_size()

    def get_hit_count(self, image_id: ImageId) -> int:
        return self.cache.get_hit_count(image_id)

    def get_cached_images(self) -> List[CachedImage]:
        # Plain dicts with the keys of Glance's drivers (image_id, hits,
        # last_accessed, last_modified, size).
        return self.cache.get_cached_images()

    def get_cached_nodes(self, image_id: ImageId) -> List[str]:
        # Unsupported (a driver local to one node) is a NotImplementedError,
        # as Glance's drivers raise.
        return self.cache.get_cached_nodes(image_id)

    def is_cached(self, image_id: ImageId) -> bool:
        return self.cache.is_cached(image_id)

    def is_cacheable(self, image_id: ImageId) -> bool:
        return self.cache.is_cacheable(image_id)

    def is_being_cached(self, image_id: ImageId) -> bool:
        return self.cache.is_being_cached(image_id)

    def is_queued(self, image_id: ImageId) -> bool:
        return self.cache.is_queued(image_id)

    def delete_all_cached_images(self) -> int:
        return self.cache.delete_all_cached_images()

    def delete_cached_image(self, image_id: ImageId) -> None:
        self.cache.delete_cached_image(image_id)

    def delete_all_queued_images(self) -> int:
        return self.cache.delete_all_queued_images()

    def delete_queued_image(self, image_id: ImageId) -> None:
        self.cache.delete_queued_image(image_id)

    def queue_image(self, image_id: ImageId) -> bool:
        return self.cache.queue(image_id)

    def clean(self, stall_time: Optional[int] = None) -> CleanReport:
        if stall_time is None:
            stall_time = CONF.image_cache_stall_time
        report = self.cache.clean(int(stall_time))
        for failure in report["failures"]:
            LOG.warning("image cache clean: %s", failure)
        return report

    def get_least_recently_accessed(self) -> Optional[Tuple[str, int]]:
        return self.cache.get_least_recently_accessed()

    @contextmanager
    def open_for_write(self, image_id: ImageId) -> Iterator["_CacheFile"]:
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
    def open_for_read(self, image_id: ImageId) -> Iterator[ImageReader]:
        """Yield the cached file; the hit is counted when the block ends
        normally (as Glance's drivers do), nothing when it raises."""
        reader = self.cache.open_for_read(image_id)  # NotFound: a FileNotFoundError
        try:
            yield reader
        except BaseException:
            reader.close()
            raise
        reader.finish()

    def get_image_size(self, image_id: ImageId) -> int:
        return self.cache.get_image_size(image_id)  # NotFound: a FileNotFoundError

    def get_queued_images(self) -> List[str]:
        return self.cache.get_queued_images()
