// The library's errors: one class, a `kind` that is the WIT `error` case
// (bad-configuration, invalid-image-id, not-found, already-cached,
// being-cached, io, database, not-configured, unsupported) or the host's
// own (checksum-mismatch, source, sink, driver-fault, load, overloaded).

export class CacheError extends Error {
  constructor(kind, message, extra = {}) {
    super(message);
    this.name = 'CacheError';
    this.kind = kind;
    Object.assign(this, extra);
  }
}

/** A guest-supplied string as one printable line of at most max chars:
 * control characters (terminal escapes included) become `?`. */
export function printable(s, max = 512) {
  const str = String(s);
  const chars = Array.from(str.length > max * 4 ? str.slice(0, max * 4) : str);
  let out = chars
    .slice(0, max)
    .map((c) => (/\p{Cc}/u.test(c) ? '?' : c))
    .join('');
  if (chars.length > max || str.length > max * 4) out += '...';
  return out;
}

export const MAX_ID_BYTES = 255;

/** Why an image id is refused, or null (the rules of SPEC.md). */
export function invalidIdReason(id) {
  if (typeof id !== 'string' || id.length === 0) return 'it is empty';
  if (Buffer.byteLength(id) > MAX_ID_BYTES) return 'it is longer than 255 bytes';
  if (id === '.' || id === '..') return 'it is a relative directory name';
  if (id.includes('/') || id.includes('\\')) return 'it contains a path separator';
  if (/\p{Cc}/u.test(id)) return 'it contains a control character';
  return null;
}

export function validateImageId(id) {
  const reason = invalidIdReason(id);
  if (reason) {
    const chars = Array.from(String(id));
    const shown = chars.slice(0, 64).join('') + (chars.length > 64 ? '...' : '');
    throw new CacheError('invalid-image-id', `invalid image id ${JSON.stringify(shown)}: ${reason}`);
  }
}
