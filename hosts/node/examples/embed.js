// Embedding the image cache in a Node application:
//   cd hosts/node && npm ci && npm run build && node examples/embed.js /tmp/my-cache
import { Readable } from 'node:stream';
import { createHash } from 'node:crypto';
import { ImageCache } from '../src/index.js'; // from another package: 'image-cache-wasm'

const root = process.argv[2] ?? '/tmp/image-cache-example';
const cache = await ImageCache.open(root, { driver: 'sqlite' }); // or 'xattr' (sqlite where user xattrs are unsupported)

// Cache an image from a stream, verified against its checksum.
const image = Buffer.from('pretend this is a disk image\n'.repeat(1000));
const checksum = `sha256:${createHash('sha256').update(image).digest('hex')}`;
if (!(await cache.isCached('image-1'))) {
  await cache.cache('image-1', Readable.from([image]), { checksum });
}

// Glance's caching tee: bytes pass through to the caller while they are cached.
const tee = await cache.cacheStream('image-2', Readable.from([image]));
let passed = 0;
for await (const chunk of tee) passed += chunk.length; // e.g. res.write(chunk)
console.log(`passed ${passed} bytes, cached: ${tee.report.cached}`);

// Read it back; reading to the end counts the hit.
let size = 0;
for await (const chunk of await cache.openForRead('image-1')) size += chunk.length;
console.log(`read ${size} bytes; hits: ${await cache.getHitCount('image-1')}`);

console.log(await cache.listCached());
await cache.queue('image-3');
console.log('queued:', await cache.getQueuedImages());
console.log('pruned:', await cache.prune(10 * 1024 ** 3), 'cleaned:', await cache.clean());
await cache.close();
