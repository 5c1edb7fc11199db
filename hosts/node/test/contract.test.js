// What the built components import and export, read from their own world
// (not from jco's lists), and what the host refuses at load.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { loadBuiltin, checkContract, capMemory } from '../src/component.js';

const ours = (names) => names.map((n) => `image-cache:driver/${n}@0.2.0`).sort();

test('the built drivers import only image-cache:driver interfaces, exactly these', () => {
  const expected = {
    sqlite: ours(['clock', 'fs', 'sqlite', 'types']),
    xattr: ours(['clock', 'fs', 'xattr', 'types']),
    hostile: ours(['fs', 'sqlite', 'types', 'xattr']),
  };
  for (const [name, imports] of Object.entries(expected)) {
    const meta = loadBuiltin(name);
    assert.deepEqual([...meta.imports].sort(), imports, name);
    assert.deepEqual(meta.exports, ['image-cache:driver/cache-driver@0.2.0'], name);
    checkContract(meta);
  }
});

test('a component importing WASI, another contract version or an ungranted interface is refused', () => {
  const meta = (imports, exports = ['image-cache:driver/cache-driver@0.2.0']) => ({ name: 't', imports, exports });
  const refused = (m, grants, re) => assert.throws(() => checkContract(m, grants), (e) => e.kind === 'load' && re.test(e.message));
  refused(meta(['wasi:clocks/wall-clock@0.2.0']), undefined, /wasi:clocks\/wall-clock@0\.2\.0, which is not part of image-cache:driver@0\.2\.0/);
  refused(meta(['image-cache:driver/fs@0.1.0']), undefined, /not part of/);
  refused(meta(['image-cache:driver/database@0.2.0']), undefined, /which the Node host does not provide/);
  refused(meta(['image-cache:driver/sqlite@0.2.0']), ['xattr'], /which it was not granted/);
  refused(meta([], ['image-cache:driver/cache-driver@0.1.0']), undefined, /this host speaks image-cache:driver@0\.2\.0/);
  refused(meta([], []), undefined, /does not export image-cache:driver\/cache-driver/);
  checkContract(meta(['image-cache:driver/fs@0.2.0', 'image-cache:driver/sqlite@0.2.0']), ['sqlite']);
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
