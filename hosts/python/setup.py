"""Build hooks: the wheel carries the driver components.

Everything else is in pyproject.toml. A wheel (``python -m build``, ``pip
wheel``, ``pip install .``) gets ``image_cache_wasm/components/`` with
the built-in drivers' components (``sqlite``, ``xattr``, ``centralized``;
never the test fixtures), copied at build time from, in this order:

1. ``$IMAGE_CACHE_COMPONENTS_DIR``;
2. ``../../target/guest/components`` next to this file (what ``cargo
   build`` at the repository root makes; ``$CARGO_TARGET_DIR/guest/components``
   when that is set);
3. ``src/image_cache_wasm/components/`` (what an sdist made here carries).

A wheel build that finds none of them fails, saying so: a wheel without
its components cannot cache anything. An sdist gets them too (so a wheel
built from it has them). An editable install (``pip install -e``) copies
nothing: it finds the components in the checkout at run time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
COMPONENTS = ("sqlite_driver.wasm", "xattr_driver.wasm", "centralized_driver.wasm")
PACKAGED = Path("src") / "image_cache_wasm" / "components"


def _candidates():
    env = os.environ.get("IMAGE_CACHE_COMPONENTS_DIR")
    if env:
        yield Path(env), "IMAGE_CACHE_COMPONENTS_DIR"
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        yield Path(target) / "guest" / "components", "CARGO_TARGET_DIR"
    yield HERE.parent.parent / "target" / "guest" / "components", "the repository's cargo build"
    yield HERE / PACKAGED, "the sdist"


def components_source() -> Path:
    tried = []
    for path, what in _candidates():
        if all((path / name).is_file() for name in COMPONENTS):
            return path
        tried.append(f"{path} ({what})")
    raise SystemExit(
        "image_cache_wasm: the wheel must carry the driver components "
        f"({', '.join(COMPONENTS)}), and none of these has them all: {'; '.join(tried)}. "
        "Build them with `cargo build` at the repository root, or point "
        "IMAGE_CACHE_COMPONENTS_DIR at a directory that has them."
    )


def copy_components(dest: Path) -> None:
    source = components_source()
    dest.mkdir(parents=True, exist_ok=True)
    for name in COMPONENTS:
        if (source / name).resolve() != (dest / name).resolve():
            shutil.copyfile(source / name, dest / name)


class BuildPyWithComponents(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # the checkout's components are found at run time
        copy_components(Path(self.build_lib) / "image_cache_wasm" / "components")

    def get_outputs(self, include_bytecode=True):
        outputs = list(super().get_outputs(include_bytecode))
        if not getattr(self, "editable_mode", False):
            base = Path(self.build_lib) / "image_cache_wasm" / "components"
            outputs += [str(base / name) for name in COMPONENTS if str(base / name) not in outputs]
        return outputs


class SdistWithComponents(sdist):
    def make_release_tree(self, base_dir, files):
        super().make_release_tree(base_dir, files)
        copy_components(Path(base_dir) / PACKAGED)


setup(cmdclass={"build_py": BuildPyWithComponents, "sdist": SdistWithComponents})
