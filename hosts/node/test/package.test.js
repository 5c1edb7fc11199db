// The npm package: the components it carries (components/, found from the
// package's own URL; IMAGE_CACHE_COMPONENTS_DIR only an override), its
// pre-transpiled built-ins (generated/), its types (index.d.ts, checked by
// tsc on examples/typed.ts) and Symbol.asyncDispose. The tarball installed
// in a clean directory is .ci/node-package-check.sh's.
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { ImageCache, componentsDir, componentPath } from '../src/index.js';
import { loadDriver, PACKAGE_COMPONENTS_DIR, GENERATED_DIR, SHIPPED, COMPONENT_FILES } from '../src/component.js';
import { componentsDir as sourceComponentsDir } from '../scripts/transpile.js';

const PACKAGE = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const pkg = JSON.parse(fs.readFileSync(path.join(PACKAGE, 'package.json'), 'utf8'));

const dirs = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));
function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-package-'));
  dirs.push(d);
  return d;
}

/** Run fn with IMAGE_CACHE_COMPONENTS_DIR set to dir (or unset). */
async function withComponentsDir(dir, fn) {
  const saved = process.env.IMAGE_CACHE_COMPONENTS_DIR;
  if (dir === undefined) delete process.env.IMAGE_CACHE_COMPONENTS_DIR;
  else process.env.IMAGE_CACHE_COMPONENTS_DIR = dir;
  try {
    return await fn();
  } finally {
    if (saved === undefined) delete process.env.IMAGE_CACHE_COMPONENTS_DIR;
    else process.env.IMAGE_CACHE_COMPONENTS_DIR = saved;
  }
}

const sha256 = (file) => crypto.createHash('sha256').update(fs.readFileSync(file)).digest('hex');

test('the package carries sqlite, xattr and centralized in components/, the same builds generated/ was made from', () => {
  for (const name of SHIPPED) {
    const file = path.join(PACKAGE_COMPONENTS_DIR, COMPONENT_FILES[name]);
    assert.ok(fs.existsSync(file), `${file} (npm run build fills it)`);
    const manifest = JSON.parse(fs.readFileSync(path.join(GENERATED_DIR, name, 'manifest.json'), 'utf8'));
    assert.equal(manifest.sha256, sha256(file), `generated/${name} is the transpiled components/${COMPONENT_FILES[name]}`);
    assert.ok(pkg.files.includes(`components/${COMPONENT_FILES[name]}`) && pkg.files.includes(`generated/${name}/`));
  }
  assert.ok(!pkg.files.some((f) => /hostile|chaos/.test(f)), 'the test fixtures are not packed');
  assert.ok(!fs.existsSync(path.join(PACKAGE_COMPONENTS_DIR, 'hostile_driver.wasm')));
  assert.equal(pkg.private, undefined);
  assert.equal(pkg.types, 'index.d.ts');
  assert.equal(pkg.exports['.'].types, './index.d.ts');
  assert.equal(pkg.scripts.prepack, 'npm run build');
  for (const f of pkg.files) assert.ok(fs.existsSync(path.join(PACKAGE, f)), `${f} is listed in files and exists`);
});

test('components are found from the package; IMAGE_CACHE_COMPONENTS_DIR overrides', async () => {
  await withComponentsDir(undefined, () => {
    assert.equal(componentsDir(), PACKAGE_COMPONENTS_DIR);
    assert.equal(componentPath('sqlite'), path.join(PACKAGE_COMPONENTS_DIR, 'sqlite_driver.wasm'));
  });
  await withComponentsDir('/somewhere/else', () => {
    assert.equal(componentsDir(), '/somewhere/else');
    assert.equal(componentPath('xattr'), '/somewhere/else/xattr_driver.wasm');
  });
  assert.throws(() => componentPath('nope'), (e) => e.kind === 'load' && /no built-in driver "nope"/.test(e.message));
});

test('a built-in driver runs from generated/ without IMAGE_CACHE_COMPONENTS_DIR, and from it when it holds the same build', async () => {
  await withComponentsDir(undefined, async () => {
    const d = await loadDriver('sqlite');
    assert.ok(d.sourcePath?.startsWith(GENERATED_DIR), 'the pre-transpiled glue');
    const root = tmp();
    const cache = await ImageCache.open(root, { driver: 'sqlite', fallbackToSqlite: false });
    try {
      await cache.cache('a', 'bytes');
      assert.equal((await cache.readImage('a')).toString(), 'bytes');
    } finally {
      await cache.close();
    }
  });
  await withComponentsDir(PACKAGE_COMPONENTS_DIR, async () => {
    assert.ok((await loadDriver('xattr')).sourcePath?.startsWith(GENERATED_DIR), 'same sha256: generated/ is used');
  });
});

test('an override holding another build of a built-in is transpiled from there when it is loaded', async () => {
  const dir = tmp();
  // Another build of sqlite: the same component with a custom section
  // appended (id 0, name "test"), so its sha256 differs from generated/'s.
  const other = Buffer.concat([fs.readFileSync(path.join(PACKAGE_COMPONENTS_DIR, 'sqlite_driver.wasm')), Buffer.from([0, 5, 4, ...Buffer.from('test')])]);
  fs.writeFileSync(path.join(dir, 'sqlite_driver.wasm'), other);
  await withComponentsDir(dir, async () => {
    const d = await loadDriver('sqlite');
    assert.equal(d.sourcePath, null, 'transpiled at load, not generated/');
    assert.equal(d.name, 'sqlite');
    assert.equal(d.sha256, crypto.createHash('sha256').update(other).digest('hex'));
    const cache = await ImageCache.open(tmp(), { driver: 'sqlite', fallbackToSqlite: false });
    try {
      assert.equal(cache.driverInfo.component, 'sqlite');
      await cache.cache('b', 'other build');
      assert.equal((await cache.readImage('b')).toString(), 'other build');
    } finally {
      await cache.close();
    }
    // A built-in missing from the override comes from the package.
    assert.ok((await loadDriver('centralized')).sourcePath?.startsWith(GENERATED_DIR));
  });
});

test('the hostile fixture is not a driver the package carries', async () => {
  const hostileGenerated = fs.existsSync(path.join(GENERATED_DIR, 'hostile', 'manifest.json'));
  // In the repository it is built for the tests; the package has neither
  // generated/hostile nor components/hostile_driver.wasm.
  assert.ok(hostileGenerated, 'npm run build transpiles it for the tests');
  assert.ok(!pkg.files.includes('generated/hostile/'));
  assert.ok(fs.existsSync(path.join(sourceComponentsDir(), 'hostile_driver.wasm')));
});

test('Symbol.asyncDispose closes a cache, ends a read uncounted and drops a write', async () => {
  assert.equal(typeof Symbol.asyncDispose, 'symbol', `Node ${process.version} has Symbol.asyncDispose`);
  const root = tmp();
  const cache = await ImageCache.open(root);
  await cache.cache('img', 'data');
  const reader = await cache.openForRead('img');
  await reader[Symbol.asyncDispose]();
  assert.equal(await cache.getHitCount('img'), 0, 'closed, not counted');
  const writer = await cache.openForWrite('partial');
  await writer.write('half');
  await writer[Symbol.asyncDispose]();
  assert.deepEqual(fs.readdirSync(path.join(root, 'invalid')), ['partial'], 'dropped: aborted as an incomplete fetch');
  const committed = await cache.openForWrite('whole');
  await committed.write('all');
  await committed.commit();
  await committed[Symbol.asyncDispose](); // a no-op once committed
  assert.equal(await cache.isCached('whole'), true);
  const worker = cache.driver.instance.worker;
  let exited = false;
  worker.once('exit', () => (exited = true));
  await cache[Symbol.asyncDispose]();
  for (let i = 0; i < 50 && !exited; i++) await new Promise((r) => setTimeout(r, 20));
  assert.ok(exited, 'the driver worker stopped');
  assert.equal(cache.driver.instance, null);
  assert.ok(!Object.keys(ImageCache.prototype).includes(Symbol.asyncDispose), 'not enumerable, like a method');
});

test('index.d.ts: examples/typed.ts type-checks with tsc --strict', () => {
  let tsc;
  try {
    tsc = createRequire(import.meta.url).resolve('typescript/bin/tsc');
  } catch {
    assert.fail('typescript is a devDependency: run npm ci');
  }
  const args = ['--noEmit', '--strict', '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--types', 'node'];
  execFileSync(process.execPath, [tsc, ...args, path.join(PACKAGE, 'examples', 'typed.ts')], { cwd: PACKAGE, encoding: 'utf8' });
  // And a misuse is caught: the types are the ones checked.
  const bad = path.join(PACKAGE, 'examples', `.typed-misuse-${process.pid}.ts`);
  fs.writeFileSync(
    bad,
    "import { ImageCache } from 'image-cache-wasm';\nconst c = await ImageCache.open('/tmp/x', { driver: 'sqlite' });\nawait c.isCached({ id: 1 });\nconst n: string = await c.getCacheSize();\n",
  );
  try {
    assert.throws(
      () => execFileSync(process.execPath, [tsc, ...args, bad], { cwd: PACKAGE, encoding: 'utf8', stdio: 'pipe' }),
      (e) => /TS2345/.test(e.stdout) && /TS2322/.test(e.stdout),
    );
  } finally {
    fs.rmSync(bad, { force: true });
  }
});
