"""``python -m image_cache_wasm.glance COMMAND [ARGS...]``: run one of
Glance's commands (``glance-cache-prefetcher``, ``glance-cache-pruner``,
``glance-cache-cleaner``, ``glance-cache-manage``, ...) with the image
cache on the driver components (:func:`image_cache_wasm.glance.install`
first), as ``image_cache_wasm.glance.wsgi`` does for glance-api."""

from __future__ import annotations

import sys
from importlib.metadata import entry_points
from typing import List, Optional


def _glance_commands() -> dict:
    found = {}
    for ep in entry_points(group="console_scripts"):
        dist = getattr(ep, "dist", None)
        if dist is not None and (dist.metadata["Name"] or "").lower() == "glance":
            found[ep.name] = ep
    return found


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    commands = _glance_commands()
    if not args or args[0] in ("-h", "--help"):
        names = ", ".join(sorted(commands)) or "none: is Glance installed?"
        print(
            "usage: python -m image_cache_wasm.glance COMMAND [ARGS...]\n"
            "Runs one of Glance's commands with its image cache on the image_cache_wasm driver "
            f"components.\nGlance's commands: {names}",
            file=sys.stderr if not args else sys.stdout,
        )
        return 2 if not args else 0
    name = args[0]
    ep = commands.get(name)
    if ep is None:
        print(f"{name}: not a command of Glance (its commands: {', '.join(sorted(commands))})", file=sys.stderr)
        return 2
    from . import install

    install()
    sys.argv = [name] + args[1:]
    result = ep.load()()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
