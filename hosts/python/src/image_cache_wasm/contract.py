"""What a driver component says about itself before any of it runs: the
contract version it speaks and the interfaces it imports (as the Rust
host's ``host/src/contract.rs``).

Version policy: the contract is the WIT package ``image-cache:driver``.
While it is ``0.x`` a minor bump (0.2 -> 0.3) may break drivers, so the
host runs exactly one minor line (``>=0.3.0, <0.4.0``) and a patch bump only
adds. A component of another line is refused before it is compiled (from
the names in its binary) with a message naming its version, the supported
range and what its author must change.
"""

from __future__ import annotations

import logging
from typing import FrozenSet, Iterable, List, Optional, Sequence, Tuple

from . import errors

log = logging.getLogger("image_cache_wasm")

#: The WIT package of the contract.
PACKAGE = "image-cache:driver"
#: The contract version this host implements.
CONTRACT = "0.3.0"
#: The contract versions this host runs, for messages.
SUPPORTED = ">=0.3.0, <0.4.0"
#: The interface every driver exports.
EXPORT = "cache-driver"

#: Interfaces every driver is linked with.
ALWAYS_LINKED = ("clock", "fs", "types")
#: Interfaces that must be granted.
CAPABILITIES = ("xattr", "database")
#: Grants of earlier contracts that name nothing any more: accepted in a
#: grant list (with a warning, once per process) so a configuration keeps
#: working. ``sqlite`` was contract 0.2's host-side SQLite import; SQLite now
#: runs inside the driver, over ``fs``.
RETIRED = ("sqlite",)
#: What the built-in drivers are granted beyond ``fs`` and ``clock``.
BUILTIN_GRANTS = {
    "sqlite": frozenset(),
    "xattr": frozenset({"xattr"}),
    "centralized": frozenset({"database"}),
}
#: Other names operators use for built-in drivers (Glance's).
BUILTIN_ALIASES = {"centralized_db": "centralized"}

_warned_retired: set = set()


def iface(name: str) -> str:
    return f"{PACKAGE}/{name}@{CONTRACT}"


def parse_version(text: str) -> Optional[Tuple[int, int, int]]:
    parts = text.split(".")
    if len(parts) != 3 or not all(p.isdigit() and p.isascii() for p in parts):
        return None
    return (int(parts[0]), int(parts[1]), int(parts[2]))


_HOST = parse_version(CONTRACT)


def supported(version: Tuple[int, int, int]) -> bool:
    """Whether this host runs components of contract ``version``: the same
    minor line while the contract is 0.x, the same major from 1.0 on, and
    never newer than the host."""
    if _HOST[0] == 0:
        return version[:2] == _HOST[:2] and version <= _HOST
    return version[0] == _HOST[0] and version <= _HOST


def upgrade_advice(version: Tuple[int, int, int]) -> str:
    """What a driver author must change to move a driver of an older
    contract line to this one."""
    if version[:2] == (0, 2):
        return (
            "contract 0.3.0 retired the host-side `sqlite` import (link SQLite into the "
            "driver over the `fs` import's read-at, write-at and set-range-lock, as the "
            "built-in sqlite driver does: guest/sqlite-vfs), carries the fs error code in "
            "the `io` error and adds clock.sleep; rebuild the driver against wit/ of this "
            "release"
        )
    if version[:2] == (0, 1):
        return (
            "contract 0.1 drivers imported WASI; rebuild the driver against wit/ of this "
            "release for wasm32-unknown-unknown"
        )
    return "rebuild the driver against wit/ of this release"


def normalize_grants(grants: Iterable[str], name: str = "") -> FrozenSet[str]:
    """The capabilities an operator's grant list names: ``fs`` and
    ``clock`` (always linked) are dropped; a retired grant (``sqlite``) is
    accepted, grants nothing and is warned about once per process; anything
    else unknown is a :class:`~image_cache_wasm.errors.LoadError`."""
    out = set()
    for g in grants:
        if g in CAPABILITIES:
            out.add(g)
        elif g in ("fs", "clock"):
            continue
        elif g in RETIRED:
            if g not in _warned_retired:
                _warned_retired.add(g)
                log.warning(
                    "the grant %r is retired (contract 0.3.0 runs SQLite inside the driver, "
                    "over fs) and grants nothing; remove it from the list",
                    g,
                )
        else:
            raise errors.LoadError(
                f"cannot load driver {name}: unknown capability {g!r}: grant any of "
                f"{', '.join(CAPABILITIES)} (fs and clock come with every driver)"
            )
    return frozenset(out)


def _split_import(name: str) -> Optional[Tuple[str, str]]:
    """``image-cache:driver/fs@0.3.0`` -> (``fs``, ``0.3.0``)."""
    prefix = PACKAGE + "/"
    if not name.startswith(prefix) or "@" not in name:
        return None
    interface, version = name[len(prefix):].split("@", 1)
    return interface, version


def check_names(driver: str, imports: Sequence[str], exports: Sequence[str], grants: FrozenSet[str]) -> None:
    """Refuse a component whose import and export names do not make a
    driver this host runs with ``grants``
    (:class:`~image_cache_wasm.errors.LoadError`, naming what is wrong)."""

    def refuse(why: str) -> errors.LoadError:
        return errors.LoadError(f"cannot load driver {driver}: {why}")

    prefix = f"{PACKAGE}/{EXPORT}@"
    exported = [e[len(prefix):] for e in exports if e.startswith(prefix)]
    if not exported:
        listed = ", ".join(exports) if exports else "none"
        raise refuse(
            f"it exports no {PACKAGE}/{EXPORT} interface (exports: {listed}); it is not an image-cache driver"
        )
    text = exported[0]
    version = parse_version(text)
    if version is None:
        raise refuse(f"its contract version {text!r} is not a version")
    if not supported(version):
        raise refuse(
            f"it speaks contract {PACKAGE}@{text}; this host runs {SUPPORTED} ({upgrade_advice(version)})"
        )
    for imp in imports:
        split = _split_import(imp)
        if split is None:
            raise refuse(f"it imports {imp}, which is not part of the driver contract")
        interface, imp_version = split
        if imp_version != text:
            raise refuse(
                f"it imports {imp} but exports contract {text}: one component speaks one contract "
                f"version (this host runs {SUPPORTED})"
            )
        if interface in ALWAYS_LINKED:
            continue
        if interface in CAPABILITIES:
            if interface not in grants:
                granted = ", ".join(["fs", "clock"] + sorted(grants))
                raise refuse(f"it imports {imp}, which it was not granted (granted: {granted})")
            continue
        if interface in RETIRED:
            raise refuse(
                f"it imports {imp}: contract 0.3.0 retired the host-side {interface} interface "
                f"(SQLite runs inside the driver, over fs); this host runs {SUPPORTED}"
            )
        raise refuse(f"it imports {imp}, which this host does not offer")


# -- the names in a component binary ---------------------------------------------


class _Unreadable(Exception):
    pass


class _Reader:
    def __init__(self, data: bytes, pos: int = 0, end: Optional[int] = None):
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise _Unreadable("truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def leb(self) -> int:
        result = shift = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7
            if shift > 35:
                raise _Unreadable("a number too long")

    def name(self) -> str:
        if self.byte() != 0x00:
            raise _Unreadable("an import or export name of an unknown form")
        n = self.leb()
        if self.pos + n > self.end:
            raise _Unreadable("truncated")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8")

    def externdesc(self) -> None:
        kind = self.byte()
        if kind == 0x00:  # core module: 0x11 then a core type index
            self.byte()
            self.leb()
        elif kind in (0x01, 0x04, 0x05):  # func, component, instance
            self.leb()
        elif kind in (0x02, 0x03):  # value or type bound
            bound = self.byte()
            if bound == 0x00 or (kind == 0x02 and bound == 0x01):
                self.leb()
            elif not (kind == 0x03 and bound == 0x01):
                raise _Unreadable("an unknown bound")
        else:
            raise _Unreadable("an unknown extern kind")


_CORE_MODULE = b"\0asm\x01\0\0\0"
_COMPONENT = b"\0asm\x0d\0\x01\0"


def top_level_names(driver: str, wasm: bytes) -> Optional[Tuple[List[str], List[str]]]:
    """The component's top-level import and export names, read from its
    binary without compiling it; None where this reader does not know the
    encoding (then the compiled component's type decides). A core module is
    refused here, by name."""
    if wasm[:8] == _CORE_MODULE:
        raise errors.LoadError(
            f"cannot load driver {driver}: it is a core WebAssembly module, not a component "
            "(turn it into one with `wasm-tools component new`)"
        )
    if wasm[:8] != _COMPONENT:
        return None
    imports: List[str] = []
    exports: List[str] = []
    r = _Reader(wasm, 8)
    try:
        while r.pos < r.end:
            section = r.byte()
            size = r.leb()
            end = r.pos + size
            if end > r.end:
                raise _Unreadable("truncated")
            if section in (10, 11):
                s = _Reader(wasm, r.pos, end)
                for _ in range(s.leb()):
                    name = s.name()
                    if section == 10:
                        s.externdesc()
                        imports.append(name)
                    else:
                        sort = s.byte()
                        if sort == 0x00:
                            s.byte()
                        s.leb()
                        if s.byte() == 0x01:
                            s.externdesc()
                        exports.append(name)
            r.pos = end
    except (_Unreadable, UnicodeDecodeError):
        return None
    return imports, exports
