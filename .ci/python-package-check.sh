#!/usr/bin/env bash
# The Python host as a wheel (hosts/python): `python -m build` on a copy of
# its sources (the sdist, then the wheel from the sdist; setup.py's hook
# copies the driver components into both), the wheel's contents and size
# checked, then, in a clean venv outside the repository, the wheel installed
# with its `glance` and `test` extras (Glance 33) and, from a directory
# outside the repository with no IMAGE_CACHE_COMPONENTS_DIR:
#   - a small example (cache an image, read it back, list it; ids as Glance
#     passes them; errors as built-ins) that checks the components came
#     from the installed package;
#   - a typed example checked by mypy --strict against the installed
#     package (py.typed), and a wrong one that mypy must refuse;
#   - glance-api through the one-line switch, its WSGI application
#     image_cache_wasm.glance.wsgi:application (tests/glance_wsgi_smoke.py):
#     an image uploaded, downloaded twice, cached by the components (their
#     seal on the file), listed by the cache API;
#   - Glance's own cache tests with the switch on (tests/test_glance_own.py:
#     the unit ImageCacheTestCase on the sqlite and xattr components, 40
#     tests, and the functional test_cache_middleware and v2/test_cache_api).
# Any failure exits non-zero.
#
# Needs the components built (cargo build: target/guest/components, or
# $IMAGE_CACHE_COMPONENTS_DIR, read by the build step only), python3 (3.10+)
# with venv, and PyPI (build, setuptools, wasmtime, glance and its
# dependencies, mypy).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
pkg="$repo/hosts/python"
components="${IMAGE_CACHE_COMPONENTS_DIR:-${CARGO_TARGET_DIR:-$repo/target}/guest/components}"
python="${PYTHON:-python3}"
max_wheel_bytes=$((8 * 1024 * 1024))

work="$(mktemp -d "${TMPDIR:-/tmp}/image-cache-python-package.XXXXXX")"
work="$(cd "$work" && pwd -P)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
case "$work/" in
  "$repo"/*) echo "python-package-check: $work is inside the repository" >&2; exit 1 ;;
esac

fail() { echo "python-package-check: $*" >&2; exit 1; }
say() { echo "python-package-check: $*"; }

for c in sqlite xattr centralized; do
  [ -f "$components/${c}_driver.wasm" ] || fail "$components/${c}_driver.wasm is missing: build the components first (cargo build)"
done

# ---- build: sdist, then the wheel from it ------------------------------------------
# From a copy of the package's sources, so the checkout gets no build/,
# dist/ or egg-info.
mkdir "$work/src"
cp -R "$pkg/pyproject.toml" "$pkg/setup.py" "$pkg/README.md" "$pkg/src" "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} + -o -name '*.egg-info' -prune -exec rm -rf {} +
rm -rf "$work/src/src/image_cache_wasm/components"
"$python" -m venv "$work/build-venv"
"$work/build-venv/bin/pip" install --quiet --upgrade pip build
IMAGE_CACHE_COMPONENTS_DIR="$components" "$work/build-venv/bin/python" -m build --outdir "$work/dist" "$work/src" \
  >"$work/build.log" 2>&1 || { tail -50 "$work/build.log" >&2; fail "python -m build failed"; }
wheels=("$work"/dist/image_cache_wasm-*.whl)
sdists=("$work"/dist/image_cache_wasm-*.tar.gz)
[ ${#wheels[@]} -eq 1 ] && [ -f "${wheels[0]}" ] || fail "no single wheel in $work/dist"
[ ${#sdists[@]} -eq 1 ] && [ -f "${sdists[0]}" ] || fail "no single sdist in $work/dist"
wheel="${wheels[0]}"
sdist="${sdists[0]}"
case "$(basename "$wheel")" in
  *-py3-none-any.whl) ;;
  *) fail "$(basename "$wheel") is not a pure-Python wheel (py3-none-any)" ;;
esac
size=$(stat -c %s "$wheel")
say "$(basename "$wheel"): $size bytes ($(( (size + 1023) / 1024 )) KiB); $(basename "$sdist"): $(stat -c %s "$sdist") bytes"
[ "$size" -le "$max_wheel_bytes" ] || fail "the wheel is $size bytes, over $max_wheel_bytes"

# What ships: the components (byte for byte what was built), py.typed, the
# Glance switch; not the hostile/chaos fixtures, the tests or setup.py.
"$python" - "$wheel" "$sdist" "$components" <<'PY'
import hashlib, sys, tarfile, zipfile
from pathlib import Path

wheel, sdist, components = sys.argv[1], sys.argv[2], Path(sys.argv[3])
names = zipfile.ZipFile(wheel).namelist()
need = ["image_cache_wasm/py.typed", "image_cache_wasm/__init__.py", "image_cache_wasm/results.py",
        "image_cache_wasm/glance/__init__.py", "image_cache_wasm/glance/wsgi.py", "image_cache_wasm/glance/__main__.py"]
need += [f"image_cache_wasm/components/{c}_driver.wasm" for c in ("sqlite", "xattr", "centralized")]
missing = [n for n in need if n not in names]
unwanted = [n for n in names if any(w in n for w in ("hostile", "chaos", "tests/", "setup.py", "__pycache__"))]
if missing or unwanted:
    sys.exit(f"python-package-check: the wheel lacks {missing} / carries {unwanted}")
z = zipfile.ZipFile(wheel)
for c in ("sqlite", "xattr", "centralized"):
    inside = z.read(f"image_cache_wasm/components/{c}_driver.wasm")
    built = (components / f"{c}_driver.wasm").read_bytes()
    if hashlib.sha256(inside).digest() != hashlib.sha256(built).digest():
        sys.exit(f"python-package-check: the wheel's {c}_driver.wasm is not the one built in {components}")
in_sdist = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
for c in ("sqlite", "xattr", "centralized"):
    if f"src/image_cache_wasm/components/{c}_driver.wasm" not in in_sdist:
        sys.exit(f"python-package-check: the sdist lacks its {c} component")
print("python-package-check: wheel contents:", len(names), "files;",
      ", ".join(f"{n.rsplit('/', 1)[1]} {z.getinfo(n).compress_size} bytes compressed"
                for n in names if n.endswith(".wasm")))
PY

# ---- install in a clean venv outside the repository --------------------------------
"$python" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet --upgrade pip
"$py" -m pip install --quiet "${wheel}[glance,test]" mypy >"$work/install.log" 2>&1 \
  || { tail -50 "$work/install.log" >&2; fail "pip install of the wheel failed"; }
consumer="$work/consumer"
mkdir "$consumer"
cd "$consumer"
unset IMAGE_CACHE_COMPONENTS_DIR

# ---- the small example, with no environment variable ------------------------------
cat >example.py <<'PY'
import hashlib, io, os, tempfile, uuid
from pathlib import Path

import image_cache_wasm
from image_cache_wasm import ImageCache, InvalidImageId, NotFound, components_dir

assert "IMAGE_CACHE_COMPONENTS_DIR" not in os.environ
site = Path(image_cache_wasm.__file__).resolve().parent
assert str(site).startswith(os.environ["VIRTUAL_ENV_DIR"]), f"imported from {site}"
assert components_dir() == site / "components", components_dir()
with tempfile.TemporaryDirectory() as root:
    with ImageCache(root, driver="sqlite", fallback_to_sqlite=False) as cache:
        image = b"a disk image from the installed wheel\n" * 4096
        checksum = "sha256:" + hashlib.sha256(image).hexdigest()
        assert cache.cache("image-1", io.BytesIO(image), checksum=checksum) == len(image)
        with cache.open_for_read("image-1") as r:
            assert r.checksum() == checksum
            assert r.read() == image
        listed = cache.list_cached()
        assert [(i["image_id"], i["size"], i["hits"]) for i in listed] == [("image-1", len(image), 1)], listed
        # Ids as Glance passes them (ints, UUIDs), errors as the built-ins.
        u = uuid.uuid4()
        cache.cache(42, io.BytesIO(b"int id"))
        cache.cache(u, io.BytesIO(b"uuid id"))
        assert cache.read("42") == b"int id" and cache.is_cached(str(u))
        try:
            cache.open_for_read("never-cached")
        except FileNotFoundError as e:
            assert isinstance(e, NotFound)
        else:
            raise AssertionError("no FileNotFoundError")
        try:
            cache.is_cached(None)
        except ValueError as e:
            assert isinstance(e, InvalidImageId)
        else:
            raise AssertionError("no ValueError")
        print(f"driver {cache.info['name']} {cache.info['version']}, components from {components_dir()}")
        print(f"cached, read back and listed {listed[0]['image_id']} ({listed[0]['size']} bytes, {listed[0]['hits']} hit)")
PY
VIRTUAL_ENV_DIR="$work/venv" env -u IMAGE_CACHE_COMPONENTS_DIR "$py" example.py

# ---- the types: mypy --strict against the installed package ------------------------
cat >typed_ok.py <<'PY'
import io
import uuid
from typing import List, Optional, Tuple

from image_cache_wasm import CachedImage, CleanReport, ImageCache, ImageReader, PruneReport


def total(cache: ImageCache) -> int:
    images: List[CachedImage] = cache.list_cached()
    return sum(i["size"] for i in images)


def use(cache: ImageCache) -> Tuple[int, Optional[str], int]:
    cache.cache(uuid.uuid4(), io.BytesIO(b"x"))
    cache.cache(7, io.BytesIO(b"y"))
    reader: ImageReader
    with cache.open_for_read(7) as reader:
        checksum: Optional[str] = reader.checksum()
    report: PruneReport = cache.prune("1G")
    cleaned: CleanReport = cache.clean()
    return report["bytes_removed"] + len(cleaned["invalid"]), checksum, total(cache)
PY
cat >typed_bad.py <<'PY'
from image_cache_wasm import ImageCache


def size(cache: ImageCache) -> str:
    return cache.list_cached()[0]["sizee"]
PY
"$work/venv/bin/mypy" --strict --no-incremental typed_ok.py || fail "mypy --strict refused the typed example"
if "$work/venv/bin/mypy" --strict --no-incremental typed_bad.py >"$work/mypy-bad.log" 2>&1; then
  fail "mypy accepted a wrong key of a result (are the types seen?)"
fi
grep -q 'TypedDict "CachedImage" has no key "sizee"' "$work/mypy-bad.log" || { cat "$work/mypy-bad.log" >&2; fail "mypy did not refuse the wrong key as it should"; }
say "mypy --strict: the typed example passes, a wrong key is refused"

# ---- glance-api through the one-line switch ----------------------------------------
cp "$pkg/tests/glance_wsgi_smoke.py" "$consumer/"
for driver in sqlite xattr; do
  env -u IMAGE_CACHE_COMPONENTS_DIR "$py" glance_wsgi_smoke.py "$work/wsgi-$driver" "$driver" image_cache_wasm.glance.wsgi \
    >"$work/wsgi-$driver.out" 2>"$work/wsgi-$driver.err" || { tail -60 "$work/wsgi-$driver.err" >&2; fail "glance-api ($driver) through image_cache_wasm.glance.wsgi"; }
  "$py" - "$work/wsgi-$driver.out" <<'PY'
import json, sys
seen = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
image = seen["image_id"]
assert seen["drivers"] == ["image_cache_wasm.glance.Driver"], seen
assert seen["seal"] == image and seen["cached_file"], seen
assert seen["cached_images"] == [[image, 1, 143360]], seen
PY
  say "glance-api ($driver) through image_cache_wasm.glance.wsgi:application: cached on the component, served from the cache, listed"
done

# ---- Glance's own cache tests, with the switch on -----------------------------------
mkdir "$consumer/tests"
cp "$pkg/tests/conftest.py" "$pkg/tests/test_glance_own.py" "$pkg/tests/glance_switch_plugin.py" "$consumer/tests/"
cd "$consumer/tests"
status=0
env -u IMAGE_CACHE_COMPONENTS_DIR IMAGE_CACHE_REQUIRE_GLANCE=1 "$py" -m pytest -p no:cacheprovider -q -s -W ignore \
  --rootdir "$consumer/tests" test_glance_own.py || status=$?
[ "$status" -eq 0 ] || fail "Glance's own cache tests with the switch on (pytest exit $status)"

say "ok ($(basename "$wheel"), $size bytes)"
