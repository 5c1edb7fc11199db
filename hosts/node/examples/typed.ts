// The package from TypeScript: its types (index.d.ts) checked by
// `tsc --noEmit` (test/types.test.js), compiled and run against the
// installed tarball by .ci/node-package-check.sh.
//   tsc --strict --module nodenext --target es2022 --types node examples/typed.ts
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createHash } from 'node:crypto';
import {
  ImageCache,
  CacheError,
  componentPath,
  validateImageId,
  type CachedImage,
  type CleanReport,
  type ImageReader,
  type OpenOptions,
  type PruneReport,
} from 'image-cache-wasm';

const root = process.argv[2] ?? fs.mkdtempSync(path.join(os.tmpdir(), 'image-cache-typed-'));
const options: OpenOptions = { driver: 'sqlite', fallbackToSqlite: false, limits: { callDeadlineMs: 10_000 } };

{
  // Closed when the block ends (Symbol.asyncDispose).
  await using cache = await ImageCache.open(root, options);
  const image = Buffer.from('a typed disk image\n'.repeat(100));
  const checksum = `sha256:${createHash('sha256').update(image).digest('hex')}`;

  // Glance's integer ids are taken as their digits.
  const written: number = await cache.cache(42, [image], { checksum });
  const back: Buffer = await cache.readImage('42');
  if (!back.equals(image) || written !== image.length) throw new Error('the image did not come back');

  {
    await using reader: ImageReader = await cache.openForRead(42n);
    const recorded: string | null = await reader.checksum();
    if (recorded !== checksum) throw new Error(`checksum ${recorded}`);
  } // closed uncounted

  const listed: CachedImage[] = await cache.listCached();
  const hits: number = await cache.getHitCount(42);
  console.log(`cached ${listed.map((i) => `${i.imageId} (${i.size} bytes)`).join(', ')}; hits: ${hits}`);

  try {
    await cache.isCached('../etc/passwd');
    throw new Error('an invalid id was accepted');
  } catch (e) {
    if (!(e instanceof CacheError) || e.kind !== 'invalid-image-id') throw e;
    console.log(`refused: ${e.message}`);
  }

  const pruned: PruneReport = await cache.prune(0);
  const cleaned: CleanReport = await cache.clean();
  console.log(`pruned ${pruned.removed.length}, cleaned ${cleaned.invalid.length + cleaned.incomplete.length}`);
  console.log(`driver ${cache.driverInfo.name} ${cache.driverInfo.version}; component ${path.basename(componentPath('sqlite'))}; id ${validateImageId(7n)}`);
}
