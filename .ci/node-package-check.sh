#!/usr/bin/env bash
# The Node host as an npm package (hosts/node): `npm pack` (its prepack
# copies the built components into components/ and transpiles them into
# generated/), then, in a fresh directory outside the repository, `npm init
# -y && npm install <tarball>` (the native add-ons built by node-gyp) and,
# with no IMAGE_CACHE_COMPONENTS_DIR, a small example on the sqlite driver
# (cache an image, read it back, list it, close), the package's own
# examples/embed.js, and its typed example (examples/typed.ts) compiled by
# tsc against the installed types and run. Any failure exits non-zero.
#
# Needs the components built (cargo build: target/guest/components, or
# $IMAGE_CACHE_COMPONENTS_DIR, read by the pack step only), Node 20+, npm,
# and what node-gyp needs (python3, make, a C/C++ compiler, Node headers).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
pkg="$repo/hosts/node"

# The add-ons build against the installed Node headers where there are
# some (as .ci/run), else node-gyp downloads them.
if [ -f /usr/include/node/node_api.h ]; then export npm_config_nodedir=/usr; fi

work="$(mktemp -d "${TMPDIR:-/tmp}/image-cache-node-package.XXXXXX")"
work="$(cd "$work" && pwd -P)"
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
case "$work/" in
  "$repo"/*) echo "node-package-check: $work is inside the repository" >&2; exit 1 ;;
esac

fail() { echo "node-package-check: $*" >&2; exit 1; }

# ---- pack -------------------------------------------------------------------
(
  cd "$pkg"
  [ -d node_modules ] || npm ci --no-audit --no-fund
  npm pack --pack-destination "$work" >"$work/pack.log" 2>&1 || { cat "$work/pack.log" >&2; exit 1; }
)
tarballs=("$work"/image-cache-wasm-*.tgz)
[ ${#tarballs[@]} -eq 1 ] && [ -f "${tarballs[0]}" ] || fail "npm pack made no single tarball: $(cat "$work/pack.log")"
tarball="${tarballs[0]}"
size=$(stat -c %s "$tarball")
echo "node-package-check: $(basename "$tarball"): $size bytes ($(( (size + 1023) / 1024 )) KiB)"

# What ships: the components, their transpiled glue, the types, the add-on's
# source; not the test fixtures, the tests, the build or node_modules.
tar -tzf "$tarball" | sort >"$work/contents"
for f in package/package.json package/README.md package/index.d.ts package/binding.gyp package/native/range_lock.c \
  package/src/index.js package/examples/typed.ts package/examples/embed.js \
  package/components/sqlite_driver.wasm package/components/xattr_driver.wasm package/components/centralized_driver.wasm \
  package/generated/sqlite/manifest.json package/generated/xattr/manifest.json package/generated/centralized/manifest.json \
  package/generated/sqlite/sqlite_driver.js package/generated/sqlite/sqlite_driver.core.wasm; do
  grep -qxF "$f" "$work/contents" || fail "the tarball lacks $f"
done
if grep -E 'hostile|chaos|^package/(test|build|node_modules|bench|scripts)/|\.node$' "$work/contents"; then
  fail "the tarball carries the files above, which it must not"
fi

# ---- install in a clean directory outside the repository ------------------------
consumer="$work/consumer"
mkdir "$consumer"
cd "$consumer"
unset IMAGE_CACHE_COMPONENTS_DIR
npm init -y >/dev/null
npm pkg set type=module
# Where npm reviews dependencies' install scripts (allowScripts, npm 11.x),
# approve the three that build add-ons, and fail on any other.
strict=()
if [ "$(npm config get strict-allow-scripts 2>/dev/null)" = false ]; then
  # (by node: `npm pkg set` would read the dots of the tarball's name as a path)
  TARBALL="$tarball" node -e '
    const fs = require("fs");
    const p = JSON.parse(fs.readFileSync("package.json", "utf8"));
    p.allowScripts = { [`file:${process.env.TARBALL}`]: true, "fs-ext": true, "fs-xattr": true };
    fs.writeFileSync("package.json", JSON.stringify(p, null, 2) + "\n");'
  strict=(--strict-allow-scripts)
fi
npm install --no-audit --no-fund "${strict[@]}" "$tarball"
installed="$consumer/node_modules/image-cache-wasm"
for addon in "$installed/build/Release/range_lock.node" node_modules/fs-ext/build/Release/fs_ext.node node_modules/fs-xattr/build/Release/xattr.node; do
  [ -f "$addon" ] || fail "the add-on $addon was not built"
done

# ---- the small example, with no environment variable ------------------------
cat >example.js <<'EOF'
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import { ImageCache, componentsDir } from 'image-cache-wasm';

if (process.env.IMAGE_CACHE_COMPONENTS_DIR !== undefined) throw new Error('IMAGE_CACHE_COMPONENTS_DIR is set');
const root = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-package-check-'));
try {
  const cache = await ImageCache.open(root, { driver: 'sqlite', fallbackToSqlite: false });
  const image = Buffer.from('a disk image from the packed package\n'.repeat(4096));
  const checksum = `sha256:${createHash('sha256').update(image).digest('hex')}`;
  if ((await cache.cache('image-1', image, { checksum })) !== image.length) throw new Error('short write');
  const back = await cache.readImage('image-1');
  if (!back.equals(image)) throw new Error('the image read back differs');
  const listed = await cache.listCached();
  if (listed.length !== 1 || listed[0].imageId !== 'image-1' || listed[0].size !== image.length || listed[0].hits !== 1) {
    throw new Error(`listCached: ${JSON.stringify(listed)}`);
  }
  const reader = await cache.openForRead('image-1');
  if ((await reader.checksum()) !== checksum) throw new Error('the checksum did not come back');
  await reader.close();
  const dir = componentsDir();
  if (!dir.startsWith(path.join(process.cwd(), 'node_modules', 'image-cache-wasm'))) throw new Error(`components from ${dir}`);
  console.log(`driver ${cache.driverInfo.name} ${cache.driverInfo.version}, components from ${dir}`);
  console.log(`cached, read back and listed ${listed[0].imageId} (${listed[0].size} bytes, ${listed[0].hits} hit)`);
  await cache.close();
} finally {
  fs.rmSync(root, { recursive: true, force: true });
}
EOF
env -u IMAGE_CACHE_COMPONENTS_DIR node example.js

# The package's own example, as it ships.
env -u IMAGE_CACHE_COMPONENTS_DIR node "$installed/examples/embed.js" "$work/embed-root" >"$work/embed.log"
grep -q 'passed 29000 bytes, cached: true' "$work/embed.log" || { cat "$work/embed.log" >&2; fail "examples/embed.js"; }

# ---- the typed example: tsc against the installed index.d.ts, then run ------
ts=$(node -p "require('$installed/package.json').devDependencies.typescript")
types=$(node -p "require('$installed/package.json').devDependencies['@types/node']")
npm install --no-audit --no-fund --save-dev "typescript@$ts" "@types/node@$types"
cp "$installed/examples/typed.ts" typed.ts
npx --no-install tsc --strict --module nodenext --moduleResolution nodenext --target es2022 --types node --outDir out typed.ts
env -u IMAGE_CACHE_COMPONENTS_DIR node out/typed.js "$work/typed-root" | tee "$work/typed.log"
grep -q '^cached 42 (1900 bytes); hits: 1$' "$work/typed.log" || fail "examples/typed.ts did not print what it should"
grep -q '^refused: invalid image id "../etc/passwd": it contains a path separator$' "$work/typed.log" || fail "examples/typed.ts: no refusal"

echo "node-package-check: ok ($(basename "$tarball"), $size bytes)"
