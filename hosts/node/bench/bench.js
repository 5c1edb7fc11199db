// Benchmarks of the Node host, printed as a table:
// - start-up: load + instantiate + configure (cold: transpiled module read
//   and compiled, worker started; warm: compiled modules reused);
// - a 4 KiB image cached and read back (one cache() + one readImage());
// - is-cached;
// - 256 MiB written and read back through the cache, against plain node:fs
//   I/O of the same bytes (same chunk size, fdatasync on write), in the same
//   run, alternating which goes first, best of BENCH_ROUNDS (default 3):
//   the disk's writeback makes single runs noisy.
//
//   node bench/bench.js            (BENCH_BIG_MIB=256 BENCH_ROUNDS=3)

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import crypto from 'node:crypto';
import { promisify } from 'node:util';
import { ImageCache } from '../src/index.js';

const write = promisify(fs.write);
const read = promisify(fs.read);
const fdatasync = promisify(fs.fdatasync);
const CHUNK = 1 << 20;
const BIG = Number(process.env.BENCH_BIG_MIB ?? 256) << 20;
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const driver = process.env.BENCH_DRIVER ?? 'sqlite';

const top = fs.mkdtempSync(path.join(process.env.BENCH_DIR ?? os.tmpdir(), 'image-cache-node-bench-'));
const ms = (t0) => performance.now() - t0;

async function time(n, fn) {
  const t0 = performance.now();
  for (let i = 0; i < n; i++) await fn(i);
  return ms(t0) / n;
}

async function plainWrite(file, data) {
  const fd = fs.openSync(file, 'wx');
  try {
    for (let off = 0; off < data.length; off += CHUNK) {
      const chunk = data.subarray(off, Math.min(data.length, off + CHUNK));
      let done = 0;
      while (done < chunk.length) done += (await write(fd, chunk, done, chunk.length - done)).bytesWritten;
    }
    await fdatasync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

async function plainRead(file) {
  const fd = fs.openSync(file, 'r');
  let total = 0;
  try {
    for (;;) {
      const buf = Buffer.allocUnsafe(CHUNK);
      const { bytesRead } = await read(fd, buf, 0, CHUNK, null);
      if (bytesRead === 0) break;
      total += bytesRead;
    }
  } finally {
    fs.closeSync(fd);
  }
  return total;
}

async function cacheRead(cache, id) {
  let total = 0;
  for await (const chunk of await cache.openForRead(id)) total += chunk.length;
  return total;
}

const rows = [];
const row = (what, value, unit, note = '') => rows.push([what, value, unit, note]);

try {
  // ---- start-up
  let t0 = performance.now();
  const cache = await ImageCache.open(path.join(top, 'cache'), { driver });
  row('start-up, cold (load + compile + worker + instantiate + configure)', ms(t0).toFixed(1), 'ms');
  const warm = [];
  for (let i = 0; i < 5; i++) {
    t0 = performance.now();
    const c = await ImageCache.open(path.join(top, `warm-${i}`), { driver });
    warm.push(ms(t0));
    await c.close();
  }
  row('start-up, warm (compiled modules reused)', Math.min(...warm).toFixed(1), 'ms', 'best of 5');

  // ---- small images
  const small = crypto.randomBytes(4096);
  const n = 200;
  const perSmall = await time(n, async (i) => {
    await cache.cache(`small-${i}`, small);
    const back = await cache.readImage(`small-${i}`);
    if (back.length !== small.length) throw new Error('short read');
  });
  row('4 KiB image: cache + read', (perSmall * 1000).toFixed(0), 'µs', `mean of ${n}`);
  const perIsCached = await time(2000, (i) => cache.isCached(`small-${i % n}`));
  row('is-cached', (perIsCached * 1000).toFixed(0), 'µs', 'mean of 2000');

  // ---- 256 MiB
  const big = crypto.randomBytes(BIG);
  const mib = BIG / (1 << 20);
  const best = { cacheW: Infinity, cacheR: Infinity, plainW: Infinity, plainR: Infinity };
  for (let r = 0; r < ROUNDS; r++) {
    const plainFile = path.join(top, `plain-${r}`);
    const plainW = async () => {
      const t = performance.now();
      await plainWrite(plainFile, big);
      best.plainW = Math.min(best.plainW, ms(t));
    };
    const cacheW = async () => {
      const t = performance.now();
      await cache.cache(`big-${r}`, big);
      best.cacheW = Math.min(best.cacheW, ms(t));
    };
    const plainR = async () => {
      const t = performance.now();
      if ((await plainRead(plainFile)) !== BIG) throw new Error('short plain read');
      best.plainR = Math.min(best.plainR, ms(t));
    };
    const cacheR = async () => {
      const t = performance.now();
      if ((await cacheRead(cache, `big-${r}`)) !== BIG) throw new Error('short cache read');
      best.cacheR = Math.min(best.cacheR, ms(t));
    };
    const order = r % 2 === 0 ? [plainW, cacheW, plainR, cacheR] : [cacheW, plainW, cacheR, plainR];
    for (const step of order) await step();
    fs.rmSync(plainFile);
    await cache.deleteCachedImage(`big-${r}`);
  }
  const rate = (t) => (mib / (t / 1000)).toFixed(0);
  row(`${mib} MiB write through the cache`, rate(best.cacheW), 'MiB/s', `${best.cacheW.toFixed(0)} ms, best of ${ROUNDS}`);
  row(`${mib} MiB write, plain node:fs`, rate(best.plainW), 'MiB/s', `${best.plainW.toFixed(0)} ms (same chunks, fdatasync)`);
  row(`${mib} MiB read through the cache`, rate(best.cacheR), 'MiB/s', `${best.cacheR.toFixed(0)} ms, best of ${ROUNDS}`);
  row(`${mib} MiB read, plain node:fs`, rate(best.plainR), 'MiB/s', `${best.plainR.toFixed(0)} ms (same chunks)`);
  await cache.close();
} finally {
  fs.rmSync(top, { recursive: true, force: true });
}

const head = ['measure', 'value', 'unit', 'note'];
const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => String(r[i]).length)));
const line = (r) => `| ${r.map((c, i) => (i === 1 ? String(c).padStart(widths[i]) : String(c).padEnd(widths[i]))).join(' | ')} |`;
console.log(`Node ${process.version}, driver ${driver}, ${os.cpus().length} CPUs`);
console.log(line(head));
console.log(`|${widths.map((w, i) => (i === 1 ? '-'.repeat(w + 1) + ':' : '-'.repeat(w + 2))).join('|')}|`);
for (const r of rows) console.log(line(r));
