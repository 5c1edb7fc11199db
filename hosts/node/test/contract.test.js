// What the built components import and export, read from their own world
// (not from jco's lists), and what the host refuses at load: another
// contract line, an interface it does not provide or did not grant (the
// database import is granted, not given).
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { loadBuiltin, checkContract, capMemory, normalizeGrants, CONTRACT, SUPPORTED, DEFAULT_GRANTS } from '../src/component.js';
import { ImageCache } from '../src/index.js';
import { componentsDir } from '../scripts/transpile.js';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const FIXTURES_0_2 = path.resolve(HERE, '..', '..', '..', 'tests', 'fixtures', 'contract-0.2.0');

const dirs = [];
after(() => dirs.forEach((d) => fs.rmSync(d, { recursive: true, force: true })));
function tmp() {
  const d = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-contract-'));
  dirs.push(d);
  return d;
}

const ours = (names, v = '0.3.0') => names.map((n) => `image-cache:driver/${n}@${v}`).sort();

test('this host speaks contract 0.3.0 and runs the 0.3 line', () => {
  assert.equal(CONTRACT, 'image-cache:driver@0.3.0');
  assert.equal(SUPPORTED, '>=0.3.0, <0.4.0');
  assert.deepEqual(DEFAULT_GRANTS, ['xattr']);
});

test('the built drivers import only image-cache:driver interfaces, exactly these (no host-side sqlite)', () => {
  const expected = {
    sqlite: ours(['clock', 'fs', 'types']),
    xattr: ours(['clock', 'fs', 'xattr', 'types']),
    hostile: ours(['clock', 'fs', 'types', 'xattr']),
    centralized: ours(['clock', 'database', 'fs', 'types']),
  };
  for (const [name, imports] of Object.entries(expected)) {
    const meta = loadBuiltin(name);
    assert.deepEqual([...meta.imports].sort(), imports, name);
    assert.deepEqual(meta.exports, ['image-cache:driver/cache-driver@0.3.0'], name);
    checkContract(meta, name === 'centralized' ? ['database'] : undefined);
  }
  // The sqlite driver needs nothing granted: fs and clock are always linked.
  checkContract(loadBuiltin('sqlite'), []);
});

test('a component importing WASI, another contract version or an ungranted interface is refused', () => {
  const meta = (imports, exports = ['image-cache:driver/cache-driver@0.3.0']) => ({ name: 't', imports, exports });
  const refused = (m, grants, re) => assert.throws(() => checkContract(m, grants), (e) => e.kind === 'load' && re.test(e.message));
  refused(meta(['wasi:clocks/wall-clock@0.2.0']), undefined, /wasi:clocks\/wall-clock@0\.2\.0, which is not part of the driver contract/);
  refused(meta(['image-cache:driver/fs@0.1.0']), undefined, /speaks contract image-cache:driver@0\.1\.0; this host runs >=0\.3\.0, <0\.4\.0/);
  refused(meta(['image-cache:driver/fs@0.3.1']), undefined, /one component speaks one contract version/);
  // database (shared PostgreSQL) is offered, by grant only.
  refused(meta(['image-cache:driver/database@0.3.0']), undefined, /database@0\.3\.0, which it was not granted/);
  checkContract(meta(['image-cache:driver/database@0.3.0']), ['database']);
  refused(meta(['image-cache:driver/mysql@0.3.0']), ['database'], /mysql@0\.3\.0, which the Node host does not provide/);
  // The host-side sqlite import is gone: at 0.3.0 it is an unknown
  // interface, at 0.2.0 another contract line.
  refused(meta(['image-cache:driver/sqlite@0.3.0']), ['sqlite', 'xattr'], /sqlite@0\.3\.0, which the Node host does not provide/);
  refused(
    meta(['image-cache:driver/sqlite@0.2.0']),
    ['sqlite', 'xattr'],
    /imports image-cache:driver\/sqlite@0\.2\.0: it speaks contract image-cache:driver@0\.2\.0; this host runs >=0\.3\.0, <0\.4\.0 \(contract 0\.3\.0 retired the host-side `sqlite` import/,
  );
  refused(meta(['image-cache:driver/xattr@0.3.0']), [], /which it was not granted/);
  refused(meta([], ['image-cache:driver/cache-driver@0.2.0']), undefined, /it speaks contract image-cache:driver@0\.2\.0; this host runs >=0\.3\.0, <0\.4\.0/);
  refused(meta([], ['image-cache:driver/cache-driver@0.4.0']), undefined, /this host runs >=0\.3\.0, <0\.4\.0/);
  refused(meta([], []), undefined, /exports no image-cache:driver\/cache-driver/);
  checkContract(meta(['image-cache:driver/fs@0.3.0', 'image-cache:driver/xattr@0.3.0']), ['xattr']);
  // A later patch release of the 0.3 line runs.
  checkContract(meta(['image-cache:driver/fs@0.3.2'], ['image-cache:driver/cache-driver@0.3.2']));
});

test('the retired sqlite grant is accepted and ignored, with one warning', () => {
  const warnings = [];
  const warn = (m) => warnings.push(m);
  assert.deepEqual(normalizeGrants(['sqlite', 'xattr'], warn), ['xattr']);
  assert.deepEqual(normalizeGrants(['sqlite'], warn), []);
  assert.equal(warnings.length <= 1, true, 'once per process');
  // Another test may have warned first in this process: either way the
  // grant does nothing.
  if (warnings.length) assert.match(warnings[0], /the sqlite grant is retired .* and is ignored/);
  checkContract(loadBuiltin('sqlite'), ['sqlite']);
  assert.throws(() => checkContract(loadBuiltin('xattr'), ['sqlite']), /which it was not granted/);
});

test('the 0.2.0 components are refused before instantiation, naming their version and the supported range', async () => {
  for (const file of ['sqlite_driver.wasm', 'xattr_driver.wasm', 'centralized_driver.wasm']) {
    const component = path.join(FIXTURES_0_2, file);
    assert.ok(fs.existsSync(component), component);
    const root = tmp();
    await assert.rejects(
      ImageCache.open(root, { driver: component, fallbackToSqlite: false, grants: ['sqlite', 'xattr'], onWarning: () => {} }),
      (e) => {
        assert.equal(e.kind, 'load', e.message);
        assert.match(e.message, /it speaks contract image-cache:driver@0\.2\.0; this host runs >=0\.3\.0, <0\.4\.0/);
        assert.match(e.message, /retired the host-side `sqlite` import/);
        return true;
      },
    );
    assert.deepEqual(fs.readdirSync(root), [], `${file}: nothing ran in the root`);
  }
  // With the fallback (the default), the cache runs on the built-in sqlite
  // driver and says why.
  const warnings = [];
  const cache = await ImageCache.open(tmp(), { driver: path.join(FIXTURES_0_2, 'sqlite_driver.wasm'), onWarning: (m) => warnings.push(m) });
  try {
    assert.equal(cache.driverInfo.name, 'sqlite');
    assert.match(warnings.join('\n'), /speaks contract image-cache:driver@0\.2\.0.*falling back to the sqlite driver/);
  } finally {
    await cache.close();
  }
});

test('the built 0.3.0 components of the repository load from their files', async () => {
  for (const file of ['sqlite_driver.wasm', 'xattr_driver.wasm']) {
    const cache = await ImageCache.open(tmp(), { driver: path.join(componentsDir(), file), fallbackToSqlite: false });
    try {
      assert.equal(await cache.isCached('nothing'), false, file);
    } finally {
      await cache.close();
    }
  }
});

test('the linear memory cap is written into the core modules', async () => {
  const meta = loadBuiltin('sqlite');
  const main = Object.entries(meta.files).find(([f, b]) => f.endsWith('.wasm') && WebAssembly.Module.exports(new WebAssembly.Module(b)).some((e) => e.kind === 'memory'));
  assert.ok(main, 'a core module that defines the memory');
  const capped = new WebAssembly.Module(capMemory(main[1], 8 << 20));
  const imports = {};
  for (const i of WebAssembly.Module.imports(capped)) {
    imports[i.module] ??= {};
    imports[i.module][i.name] = i.kind === 'function' ? () => {} : undefined;
  }
  const instance = new WebAssembly.Instance(capped, imports);
  const memory = Object.values(instance.exports).find((x) => x instanceof WebAssembly.Memory);
  const pages = memory.buffer.byteLength / 65536;
  assert.equal(memory.grow(0), pages);
  assert.throws(() => memory.grow((8 << 20) / 65536 - pages + 1), RangeError, 'cannot grow past 8 MiB');
  memory.grow((8 << 20) / 65536 - pages);
});
