// Build step (`npm run components`, part of `npm run build` and of
// `prepack`): copy the driver components the package carries (sqlite,
// xattr, centralized; not the hostile and chaos test fixtures) into
// components/, where the package finds them at run time (next to src/).
//
// They come from IMAGE_CACHE_COMPONENTS_DIR, default
// <repo>/target/guest/components (where `cargo build` puts them).

import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { COMPONENT_FILES, PACKAGE_COMPONENTS_DIR, SHIPPED } from '../src/component.js';
import { componentsDir } from './transpile.js';

export function copyComponents() {
  const dir = componentsDir();
  const missing = SHIPPED.map((n) => path.join(dir, COMPONENT_FILES[n])).filter((f) => !fs.existsSync(f));
  if (missing.length) {
    for (const f of missing) {
      console.error(`components: ${f} is missing (build the components with \`cargo build\`, or set IMAGE_CACHE_COMPONENTS_DIR)`);
    }
    return false;
  }
  fs.rmSync(PACKAGE_COMPONENTS_DIR, { recursive: true, force: true });
  fs.mkdirSync(PACKAGE_COMPONENTS_DIR, { recursive: true });
  for (const name of SHIPPED) {
    const file = COMPONENT_FILES[name];
    fs.copyFileSync(path.join(dir, file), path.join(PACKAGE_COMPONENTS_DIR, file));
    console.log(`components: ${path.join(dir, file)} -> components/${file}`);
  }
  return true;
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  process.exit(copyComponents() ? 0 : 1);
}
