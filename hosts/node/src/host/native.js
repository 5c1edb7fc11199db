// The range-lock add-on (native/range_lock.c, built by node-gyp when the
// package is installed): fcntl F_OFD_SETLK / F_OFD_GETLK for the `fs`
// import's byte-range locks. Without it (not built, or a system without
// open-file-description locks) range locks are `unsupported`: README.md.

import { createRequire } from 'node:module';
import util from 'node:util';

let loaded;

/** The add-on's functions, with system errors named as Node names them
 * (code EBADF, ...), or null when it cannot be loaded. */
export function rangeLockAddon() {
  if (loaded !== undefined) return loaded;
  let raw;
  try {
    raw = createRequire(import.meta.url)('../../build/Release/range_lock.node');
  } catch {
    raw = null;
  }
  if (typeof raw?.setLock !== 'function') {
    loaded = null; // not built, or built where there are no OFD locks
    return loaded;
  }
  const named = (fn) =>
    (...args) => {
      try {
        return fn(...args);
      } catch (e) {
        if (typeof e?.errno === 'number' && e.errno < 0 && e.code === undefined) {
          e.code = util.getSystemErrorName(e.errno);
        }
        throw e;
      }
    };
  loaded = {
    setLock: named(raw.setLock),
    lockedElsewhere: named(raw.lockedElsewhere),
    clearNonblock: named(raw.clearNonblock),
  };
  return loaded;
}
