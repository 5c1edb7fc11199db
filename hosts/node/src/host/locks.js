// File locks for `file.lock` / `try-lock` / `unlock` when fs-ext's flock(2)
// cannot be loaded (driver.js asks the main thread to flock otherwise), and
// the table of descriptors an instance holds.
//
// The locks here are advisory and exclusive like flock's, keyed by the
// file's device and inode, held per open file (two handles on one file in
// one instance exclude each other, as flock's open file descriptions do),
// and shared by every worker of this process through one
// SharedArrayBuffer. They are not seen by other processes (another Node
// process, the Rust CLI): README.md says so. When a worker is stopped, the
// main thread releases every lock it held, as the kernel would at a
// process exit.

export const LOCK_SLOTS = 4096;

/** The process-wide lock table (created once in the main thread, handed to
 * every worker). */
export function createLockTable() {
  return new SharedArrayBuffer(LOCK_SLOTS * 8 + LOCK_SLOTS * 4 * 2 + 16);
}

export class Locks {
  constructor(sab) {
    this.keys = new BigInt64Array(sab, 0, LOCK_SLOTS);
    this.owners = new Int32Array(sab, LOCK_SLOTS * 8, LOCK_SLOTS);
    this.workers = new Int32Array(sab, LOCK_SLOTS * 12, LOCK_SLOTS);
    // [0]: token counter, [1]: release generation (waiters sleep on it).
    this.meta = new Int32Array(sab, LOCK_SLOTS * 16, 4);
  }

  newToken() {
    return Atomics.add(this.meta, 0, 1) + 1;
  }

  /** A 63-bit key for (dev, ino), never 0. */
  static key(dev, ino) {
    const k = ((BigInt(dev) << 40n) ^ BigInt(ino)) & 0x7fffffffffffffffn;
    return k === 0n ? 1n : k;
  }

  /** The slot holding key, or -1. */
  find(key) {
    for (let i = 0; i < LOCK_SLOTS; i++) {
      if (Atomics.load(this.keys, i) === key) return i;
    }
    return -1;
  }

  /** Try to take the lock for key as token (of worker wid): 'taken',
   * 'held' (by this token already), 'busy' or 'full'. */
  tryLock(key, token, wid) {
    const held = this.find(key);
    if (held >= 0) {
      return Atomics.load(this.owners, held) === token ? 'held' : 'busy';
    }
    for (let i = 0; i < LOCK_SLOTS; i++) {
      if (Atomics.compareExchange(this.keys, i, 0n, key) !== 0n) continue;
      // Two takers may have claimed two slots at once: the lower slot wins.
      for (let j = 0; j < LOCK_SLOTS; j++) {
        if (j !== i && Atomics.load(this.keys, j) === key) {
          if (j < i) {
            Atomics.store(this.keys, i, 0n);
            return 'busy';
          }
        }
      }
      Atomics.store(this.owners, i, token);
      Atomics.store(this.workers, i, wid);
      return 'taken';
    }
    return 'full';
  }

  /** Release what token holds on key (nothing if it holds nothing). */
  unlock(key, token) {
    const i = this.find(key);
    if (i >= 0 && Atomics.load(this.owners, i) === token) this.clear(i);
  }

  clear(i) {
    Atomics.store(this.owners, i, 0);
    Atomics.store(this.workers, i, 0);
    Atomics.store(this.keys, i, 0n);
    Atomics.add(this.meta, 1, 1);
    Atomics.notify(this.meta, 1);
  }

  /** Sleep until a lock is released or ms pass. */
  waitForRelease(ms) {
    const generation = Atomics.load(this.meta, 1);
    Atomics.wait(this.meta, 1, generation, Math.max(1, ms));
  }

  /** Release every lock a stopped worker held. */
  releaseWorker(wid) {
    for (let i = 0; i < LOCK_SLOTS; i++) {
      if (Atomics.load(this.keys, i) !== 0n && Atomics.load(this.workers, i) === wid) this.clear(i);
    }
  }
}

/** The descriptors one instance holds, in shared memory so the main thread
 * can close them when it stops the worker. Its size is the instance's cap
 * on open files. */
export function createFdTable(max) {
  const table = new Int32Array(new SharedArrayBuffer(4 * max));
  table.fill(-1);
  return table;
}
