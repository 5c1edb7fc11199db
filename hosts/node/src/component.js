// Loading a driver component: the built-in ones transpiled when the
// package was built (scripts/transpile.js, into generated/; the package
// carries them, so installing it runs no transpiler), any other component
// file transpiled when it is loaded; its contract (version, imports)
// checked before anything is instantiated; its core modules compiled once,
// with a cap on linear memory written into them.
//
// The components themselves are in the package's components/ (found from
// this file's URL); IMAGE_CACHE_COMPONENTS_DIR, when set, overrides it: a
// built-in driver whose component there differs from the one generated/
// was made from is transpiled from there when it is loaded.

import fs from 'node:fs';
import path from 'node:path';
import crypto from 'node:crypto';
import { fileURLToPath } from 'node:url';
import { CacheError } from './errors.js';

export const CONTRACT = 'image-cache:driver@0.3.0';
/** The contract versions this host runs: one minor line while the
 * contract is 0.x (a minor bump may break drivers), as the Rust host. */
export const SUPPORTED = '>=0.3.0, <0.4.0';
export const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
export const GENERATED_DIR = path.join(PACKAGE_DIR, 'generated');
/** The driver components the package carries (scripts/components.js). */
export const PACKAGE_COMPONENTS_DIR = path.join(PACKAGE_DIR, 'components');
export const BUILTIN = ['sqlite', 'xattr', 'hostile', 'centralized'];
/** Each built-in driver's component file. The package ships all but
 * `hostile`, a test fixture that exists only in the repository. */
export const COMPONENT_FILES = {
  sqlite: 'sqlite_driver.wasm',
  xattr: 'xattr_driver.wasm',
  centralized: 'centralized_driver.wasm',
  hostile: 'hostile_driver.wasm',
};
export const SHIPPED = ['sqlite', 'xattr', 'centralized'];

/** Where the driver components are: $IMAGE_CACHE_COMPONENTS_DIR when it is
 * set (an override), else the package's own components/. */
export function componentsDir() {
  const override = process.env.IMAGE_CACHE_COMPONENTS_DIR;
  return override ? path.resolve(override) : PACKAGE_COMPONENTS_DIR;
}

/** The component file of a built-in driver (`sqlite`, `xattr`,
 * `centralized`), e.g. to give to `swapDriver`, to another host or to
 * wasm-tools. */
export function componentPath(name) {
  const file = Object.hasOwn(COMPONENT_FILES, name) ? COMPONENT_FILES[name] : null;
  if (!file) throw new CacheError('load', `there is no built-in driver ${JSON.stringify(String(name))} (built-in: ${SHIPPED.join(', ')})`);
  return path.join(componentsDir(), file);
}
/** What each built-in driver is granted, whatever the cache's grants (as
 * the Rust host's built-ins): the centralized driver its database. */
const BUILTIN_GRANTS = { sqlite: [], xattr: ['xattr'], hostile: ['xattr'], centralized: ['database'] };

/** Interfaces a driver may import, and which need a grant. */
const ALWAYS = ['clock', 'fs', 'types'];
const GRANTABLE = ['xattr', 'database'];
/** Grants of an older contract, accepted and ignored: contract 0.3.0
 * retired the host-side `sqlite` import (SQLite runs inside the driver,
 * over `fs`). */
const RETIRED_GRANTS = ['sqlite'];
/** A component file is granted `xattr` unless the cache says otherwise;
 * `database` (the shared PostgreSQL, MySQL or MariaDB the cache's
 * `databases` option configures) only when it is granted. */
export const DEFAULT_GRANTS = ['xattr'];

let warnedRetired = false;

/** The grants as this contract knows them: a retired one (`sqlite`) is
 * dropped, with one warning per process. */
export function normalizeGrants(grants = DEFAULT_GRANTS, onWarning = (m) => process.emitWarning(m, 'ImageCacheWarning')) {
  const list = [...grants];
  const retired = list.filter((g) => RETIRED_GRANTS.includes(g));
  if (retired.length && !warnedRetired) {
    warnedRetired = true;
    onWarning(
      `the ${retired.join(', ')} grant is retired (contract ${CONTRACT} has no host-side sqlite import: SQLite runs inside the driver, over fs) and is ignored`,
    );
  }
  return list.filter((g) => !RETIRED_GRANTS.includes(g));
}

/** What a driver author must change to move a driver of an older contract
 * line to this one (the same advice as the Rust host's). */
function upgradeAdvice(version) {
  if (/^0\.2\./.test(version)) {
    return 'contract 0.3.0 retired the host-side `sqlite` import (link SQLite into the driver over the `fs` import\'s read-at, write-at and set-range-lock, as the built-in sqlite driver does: guest/sqlite-vfs), carries the fs error code in the `io` error and adds clock.sleep; rebuild the driver against wit/ of this release';
  }
  if (/^0\.1\./.test(version)) {
    return 'contract 0.1 drivers imported WASI; rebuild the driver against wit/ of this release for wasm32-unknown-unknown';
  }
  return 'rebuild the driver against wit/ of this release';
}

/** Whether a contract version is in SUPPORTED. */
export function supportedVersion(version) {
  const m = /^(\d+)\.(\d+)\.(\d+)$/.exec(version);
  return Boolean(m) && Number(m[1]) === 0 && Number(m[2]) === 3;
}

/** The options every transpile uses (build time and load time alike). */
export const TRANSPILE_OPTIONS = {
  instantiation: 'sync',
  emitTypescriptDeclarations: false,
  nodejsCompat: false,
  wasiShim: false,
  base64Cutoff: 0,
  tlaCompat: false,
  namespacedExports: false,
};

/** What a component imports and exports, from its own world (wasm-tools),
 * without transpiling or compiling anything. */
export async function describe(bytes) {
  const { componentWit } = await import('@bytecodealliance/jco-transpile/wasm-tools');
  // jco's lists drop versions and interfaces without functions: the
  // component's own world is what the contract is checked on.
  return worldOf(await componentWit(new Uint8Array(bytes)));
}

/** Transpile component bytes with jco. */
export async function transpile(bytes, name, world) {
  const { transpileBytes } = await import('@bytecodealliance/jco-transpile');
  world ??= await describe(bytes);
  const result = await transpileBytes(new Uint8Array(bytes), { ...TRANSPILE_OPTIONS, name });
  return {
    name,
    sha256: crypto.createHash('sha256').update(bytes).digest('hex'),
    imports: world.imports,
    exports: world.exports,
    files: result.files,
  };
}

/** The imports and exports of a component's world, from its WIT text:
 * `import image-cache:driver/fs@0.3.0;` lines. Anything else imported
 * (a function, an inline interface) is listed as it is written, so the
 * contract check refuses it. */
export function worldOf(wit) {
  const lines = wit.split('\n');
  const start = lines.findIndex((l) => /^world /.test(l));
  const imports = [];
  const exports = [];
  let depth = 0;
  for (const line of lines.slice(start + 1)) {
    const t = line.trim();
    if (depth === 0 && t === '}') break;
    const m = /^(import|export)\s+([^;{]+?)\s*(;|\{|$)/.exec(t);
    if (depth === 0 && m) (m[1] === 'import' ? imports : exports).push(m[2]);
    depth += (t.match(/\{/g) ?? []).length - (t.match(/\}/g) ?? []).length;
  }
  return { imports, exports };
}

/** The interface part of an import or export name: `fs` from
 * `image-cache:driver/fs@0.3.0`; null for anything not of our package. */
function ourInterface(spec) {
  const m = /^image-cache:driver\/([a-z-]+)@(\d+\.\d+\.\d+)$/.exec(spec);
  if (!m) return null;
  return { name: m[1], version: m[2] };
}

/** Check what a component imports and exports against the contract and
 * the grants, before instantiating it. Throws a `load` CacheError. A
 * component of another contract line (e.g. one importing
 * `image-cache:driver/sqlite@0.2.0`) is refused here, naming its version
 * and the supported range. */
export function checkContract(meta, grants = DEFAULT_GRANTS) {
  const fail = (why) => {
    throw new CacheError('load', `cannot load driver ${meta.name}: ${why}`);
  };
  grants = grants.filter((g) => !RETIRED_GRANTS.includes(g));
  const exported = meta.exports;
  const driverExport = exported.find((n) => n.startsWith('image-cache:driver/cache-driver'));
  if (!driverExport) {
    fail(`it exports no image-cache:driver/cache-driver interface (exports: ${exported.join(', ') || 'none'}); it is not an image-cache driver`);
  }
  const v = ourInterface(driverExport);
  if (!v) fail(`it exports ${driverExport}, whose contract version is not a version`);
  if (!supportedVersion(v.version)) {
    fail(`it speaks contract image-cache:driver@${v.version}; this host runs ${SUPPORTED} (${upgradeAdvice(v.version)})`);
  }
  for (const spec of meta.imports) {
    const i = ourInterface(spec);
    if (!i) fail(`it imports ${spec}, which is not part of the driver contract`);
    if (!supportedVersion(i.version)) {
      fail(`it imports ${spec}: it speaks contract image-cache:driver@${i.version}; this host runs ${SUPPORTED} (${upgradeAdvice(i.version)})`);
    }
    if (i.version !== v.version) {
      fail(`it imports ${spec} but exports contract ${v.version}: one component speaks one contract version`);
    }
    if (ALWAYS.includes(i.name)) continue;
    if (!GRANTABLE.includes(i.name)) fail(`it imports ${spec}, which the Node host does not provide`);
    if (!grants.includes(i.name)) fail(`it imports ${spec}, which it was not granted`);
  }
}

/** The manifest of a built-in driver transpiled into generated/, or null. */
function generatedManifest(name) {
  try {
    return JSON.parse(fs.readFileSync(path.join(GENERATED_DIR, name, 'manifest.json'), 'utf8'));
  } catch {
    return null;
  }
}

/** Read a transpiled built-in driver from generated/. */
export function loadBuiltin(name) {
  const dir = path.join(GENERATED_DIR, name);
  const meta = generatedManifest(name);
  if (!meta) {
    throw new CacheError(
      'load',
      `built-in driver ${name} is not built: run \`npm run build\` in hosts/node (components from IMAGE_CACHE_COMPONENTS_DIR)`,
    );
  }
  const files = {};
  for (const f of meta.files) files[f] = fs.readFileSync(path.join(dir, f));
  const js = meta.files.find((f) => f.endsWith('.js'));
  return { ...meta, files, sourcePath: path.join(dir, js) };
}

/** Where a built-in driver comes from: generated/ (transpiled when the
 * package was built), unless IMAGE_CACHE_COMPONENTS_DIR holds a different
 * build of its component, or generated/ lacks it and components/ has it:
 * then that component file, transpiled when it is loaded (which needs
 * @bytecodealliance/jco-transpile, a dependency of the package). */
function builtinSource(name) {
  const readIf = (file) => {
    try {
      return fs.readFileSync(file);
    } catch {
      return null;
    }
  };
  const manifest = generatedManifest(name);
  if (process.env.IMAGE_CACHE_COMPONENTS_DIR) {
    const file = path.join(componentsDir(), COMPONENT_FILES[name]);
    const bytes = readIf(file);
    if (bytes) {
      const sha = crypto.createHash('sha256').update(bytes).digest('hex');
      if (manifest?.sha256 === sha) return { builtin: true };
      return { bytes, file, sha };
    }
  }
  if (manifest) return { builtin: true };
  const file = path.join(PACKAGE_COMPONENTS_DIR, COMPONENT_FILES[name]);
  const bytes = readIf(file);
  if (bytes) return { bytes, file, sha: crypto.createHash('sha256').update(bytes).digest('hex') };
  throw new CacheError(
    'load',
    SHIPPED.includes(name)
      ? `built-in driver ${name} is not built: run \`npm run build\` in hosts/node (components from IMAGE_CACHE_COMPONENTS_DIR)`
      : `built-in driver ${name} is a test fixture that this package does not carry (set IMAGE_CACHE_COMPONENTS_DIR to a directory holding ${COMPONENT_FILES[name]})`,
  );
}

/** A driver source (built-in name or component file path) as a checked,
 * compiled driver, cached per content and memory cap. */
const compiled = new Map();

export async function loadDriver(source, { grants = DEFAULT_GRANTS, memoryBytes, onWarning } = {}) {
  grants = normalizeGrants(grants, onWarning);
  let meta;
  let bytes;
  let sha;
  let file;
  let name;
  if (BUILTIN.includes(source)) {
    grants = [...new Set([...grants, ...BUILTIN_GRANTS[source]])];
    const from = builtinSource(source);
    if (from.builtin) meta = loadBuiltin(source);
    else ({ bytes, sha, file } = from);
    name = source;
  } else {
    file = String(source);
    try {
      bytes = fs.readFileSync(source);
    } catch (e) {
      throw new CacheError('load', `cannot load driver ${path.basename(file)}: ${e.code ?? e.message}`);
    }
    sha = crypto.createHash('sha256').update(bytes).digest('hex');
    name = fileDriverName(source);
  }
  if (!meta) {
    const key = `${sha}:${memoryBytes}`;
    if (compiled.has(key)) {
      const c = compiled.get(key);
      checkContract(c, grants);
      return { ...c, name };
    }
    // The contract first, from the component's world: a component of
    // another contract line is refused before anything is transpiled.
    let world;
    try {
      world = await describe(bytes);
    } catch (e) {
      throw new CacheError('load', `cannot load driver ${path.basename(file)}: ${notAComponent(e)}`);
    }
    checkContract({ name, ...world }, grants);
    try {
      meta = await transpile(bytes, name, world);
    } catch (e) {
      throw new CacheError('load', `cannot load driver ${path.basename(file)}: not a component jco can transpile (${String(e?.message ?? e).split('\n')[0]})`);
    }
  }
  checkContract(meta, grants);
  const key = `${meta.sha256}:${memoryBytes}`;
  if (compiled.has(key)) return { ...compiled.get(key), name: meta.name };
  const js = Object.keys(meta.files).find((f) => f.endsWith('.js'));
  const modules = {};
  for (const [f, bytes] of Object.entries(meta.files)) {
    if (f.endsWith('.wasm')) modules[f] = await WebAssembly.compile(capMemory(bytes, memoryBytes));
  }
  const driver = {
    name: meta.name,
    sha256: meta.sha256,
    imports: meta.imports,
    exports: meta.exports,
    // Built-ins are imported from their file (faster than a data: URL).
    source: meta.sourcePath ? null : Buffer.from(meta.files[js]).toString('utf8'),
    sourcePath: meta.sourcePath ?? null,
    modules,
  };
  compiled.set(key, driver);
  return driver;
}

/** Why describe() failed: jco's transpiler missing, or not a component. */
function notAComponent(e) {
  if (e?.code === 'ERR_MODULE_NOT_FOUND' && /jco-transpile/.test(String(e.message))) {
    return 'loading a component file needs @bytecodealliance/jco-transpile (npm install @bytecodealliance/jco-transpile@0.15.0)';
  }
  return `not a component (${String(e?.message ?? e).split('\n')[0]})`;
}

/** A driver loaded from a file is named after it. */
function fileDriverName(source) {
  return path.basename(String(source)).replace(/\.wasm$/, '').replace(/[^A-Za-z0-9_]/g, '_');
}

// ---- linear memory cap -------------------------------------------------

function readU32(buf, pos) {
  let result = 0;
  let shift = 0;
  for (;;) {
    const b = buf[pos++];
    result += (b & 0x7f) * 2 ** shift;
    if ((b & 0x80) === 0) return [result, pos];
    shift += 7;
  }
}

function writeU32(n) {
  const out = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n !== 0) b |= 0x80;
    out.push(b);
  } while (n !== 0);
  return out;
}

/** Rewrite the limits of every 32-bit memory a core module defines so its
 * maximum is at most maxBytes: growing past it fails inside the guest
 * (its allocator traps), instead of taking the host's memory. */
export function capMemory(bytes, maxBytes) {
  const buf = Buffer.from(bytes);
  if (!maxBytes || buf.length < 8 || buf.readUInt32LE(0) !== 0x6d736100) return buf;
  const capPages = Math.max(1, Math.floor(maxBytes / 65536));
  const parts = [buf.subarray(0, 8)];
  let pos = 8;
  while (pos < buf.length) {
    const id = buf[pos];
    const [size, start] = readU32(buf, pos + 1);
    const end = start + size;
    if (id !== 5) {
      parts.push(buf.subarray(pos, end));
      pos = end;
      continue;
    }
    let p = start;
    const [count, p1] = readU32(buf, p);
    p = p1;
    const body = [...writeU32(count)];
    for (let i = 0; i < count; i++) {
      const flags = buf[p++];
      const [min, p2] = readU32(buf, p);
      p = p2;
      let max = null;
      if (flags & 1) {
        [max, p] = readU32(buf, p);
      }
      if (flags & ~0x03) return buf; // memory64 or unknown flags: leave it
      const newMax = Math.max(min, max === null ? capPages : Math.min(max, capPages));
      body.push(flags | 1, ...writeU32(min), ...writeU32(newMax));
    }
    parts.push(Buffer.from([5, ...writeU32(body.length), ...body]));
    pos = end;
  }
  return Buffer.concat(parts);
}
