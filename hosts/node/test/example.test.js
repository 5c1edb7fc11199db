// The README's Node example runs as written.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const example = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', 'examples', 'embed.js');

test('examples/embed.js caches, tees, reads, lists, queues, prunes and cleans', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-example-'));
  try {
    const out = execFileSync(process.execPath, [example, root], { encoding: 'utf8' });
    assert.match(out, /passed 29000 bytes, cached: true/);
    assert.match(out, /read 29000 bytes; hits: 1/);
    assert.match(out, /queued: \[ 'image-3' \]/);
    assert.ok(fs.existsSync(path.join(root, 'image-1')) && fs.existsSync(path.join(root, 'cache.db')));
    // The book's Node chapter shows the example as it is.
    const chapter = path.resolve(path.dirname(example), '..', '..', '..', 'docs', 'src', 'embedding', 'node.md');
    const page = fs.readFileSync(chapter, 'utf8');
    assert.ok(page.includes(fs.readFileSync(example, 'utf8').trim()), 'docs/src/embedding/node.md shows examples/embed.js as it is');
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});

test('the library works from `node --input-type=module -e` (workers do not inherit that flag)', () => {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-node-eval-'));
  const index = new URL('../src/index.js', import.meta.url).href;
  try {
    const out = execFileSync(
      process.execPath,
      ['--input-type=module', '-e', `import { ImageCache } from '${index}'; const c = await ImageCache.open(process.argv[1]); await c.cache('a', 'x'); console.log(await c.isCached('a')); await c.close();`, root],
      { encoding: 'utf8' },
    );
    assert.equal(out.trim(), 'true');
  } finally {
    fs.rmSync(root, { recursive: true, force: true });
  }
});
