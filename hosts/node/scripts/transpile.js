// Build step: transpile the built driver components with jco (the
// transpiler of @bytecodealliance/jco 1.35, as a library) into generated/:
// the JS glue and core modules of each built-in driver, which the package
// carries (sqlite, xattr, centralized), so that installing it runs no
// transpiler; `hostile` too, for the tests in the repository (not packed).
//
// Components come from IMAGE_CACHE_COMPONENTS_DIR, default
// <repo>/target/guest/components (where `cargo build` puts them).

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { GENERATED_DIR, PACKAGE_DIR, transpile, checkContract } from '../src/component.js';

/** Where the built components are, to build the package from (and for
 * the tests: the hostile and chaos fixtures are only there). */
export function componentsDir() {
  return process.env.IMAGE_CACHE_COMPONENTS_DIR
    ? path.resolve(process.env.IMAGE_CACHE_COMPONENTS_DIR)
    : path.resolve(PACKAGE_DIR, '..', '..', 'target', 'guest', 'components');
}

const drivers = {
  sqlite: 'sqlite_driver.wasm',
  xattr: 'xattr_driver.wasm',
  hostile: 'hostile_driver.wasm',
  centralized: 'centralized_driver.wasm',
};

async function main() {
const dir = componentsDir();
let failed = false;
fs.mkdirSync(GENERATED_DIR, { recursive: true });
for (const [name, file] of Object.entries(drivers)) {
  const src = path.join(dir, file);
  if (!fs.existsSync(src)) {
    console.error(`transpile: ${src} is missing (build the components with \`cargo build\`, or set IMAGE_CACHE_COMPONENTS_DIR)`);
    failed = true;
    continue;
  }
  const meta = await transpile(fs.readFileSync(src), `${name}_driver`);
  checkContract({ ...meta, name }, ['xattr', 'database']);
  const out = path.join(GENERATED_DIR, name);
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(out, { recursive: true });
  for (const [f, bytes] of Object.entries(meta.files)) fs.writeFileSync(path.join(out, f), bytes);
  const manifest = { name, sha256: meta.sha256, imports: meta.imports, exports: meta.exports, files: Object.keys(meta.files) };
  fs.writeFileSync(path.join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
  console.log(`transpile: ${name}: ${file} -> generated/${name} (imports: ${meta.imports.join(', ')})`);
}
process.exit(failed ? 1 : 0);
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) await main();
