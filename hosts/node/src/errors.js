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

// ---- image ids: the image-id crate (image-id/src/lib.rs), ported ----------

/** Rust's `char::is_control`: the general category Cc. */
const CONTROL = /\p{Cc}/u;

/** Characters that change how text around them shows without showing
 * themselves (the crate's `hidden`): control characters, bidirectional
 * marks, overrides and isolates (U+061C, U+200E/F, U+202A-U+202E,
 * U+2066-U+2069), zero-width characters (U+200B-U+200D, U+2060, U+FEFF)
 * and other invisible formatting (U+00AD, U+180E, U+2061-U+2064). */
const HIDDEN = /[\p{Cc}\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2069\uFEFF]/u;

/** Whether one character (a code point) is hidden, as the crate's `hidden`. */
export function hidden(c) {
  return HIDDEN.test(c);
}

/** A lone UTF-16 surrogate: no Rust string has one (the Rust host cannot
 * be given such an id); jco would turn it into U+FFFD, another id. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;
const wellFormed = typeof String.prototype.isWellFormed === 'function' ? (s) => s.isWellFormed() : (s) => !LONE_SURROGATE.test(s);

/** The common case, checked in one pass: printable ASCII without a
 * separator (the crate's fast path; `.` and `..` are checked after it). */
const PLAIN = /^[\x20-\x2e\x30-\x5b\x5d-\x7e]{1,255}$/;

/** Why `id` (a string) cannot be an image id, or null if it can: the
 * crate's `problem`, reason for reason, in the same order. Not empty, at
 * most 255 bytes of UTF-8, not `.` or `..`, no `/`, `\`, NUL or other
 * control character, no invisible formatting character (a bidi override
 * would make an id print as another). One more, which Rust strings cannot
 * carry: a lone surrogate. */
export function idProblem(id) {
  if (PLAIN.test(id) && id !== '.' && id !== '..') return null;
  if (id.length === 0) return 'it is empty';
  if (Buffer.byteLength(id, 'utf8') > MAX_ID_BYTES) return 'it is longer than 255 bytes';
  if (id === '.' || id === '..') return 'it is a relative directory name';
  if (id.includes('/') || id.includes('\\')) return 'it contains a path separator';
  if (CONTROL.test(id)) return 'it contains a control character';
  if (HIDDEN.test(id)) return 'it contains an invisible formatting character';
  if (!wellFormed(id)) return 'it is not well-formed Unicode (a lone surrogate)';
  return null;
}

/** Why a value a driver returned (or an application passed) is not an
 * image id, or null: anything but a string is refused. */
export function invalidIdReason(id) {
  if (typeof id !== 'string') return 'it is not a string';
  return idProblem(id);
}

/** Rust's `char::is_printable`, as `{:?}` uses it: not a separator other
 * than the space, not a control, format, surrogate, private-use or
 * unassigned code point. */
const NOT_PRINTABLE = /[\p{Zl}\p{Zp}\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}]|[^\P{Zs} ]/u;
const GRAPHEME_EXTEND = /\p{Grapheme_Extend}/u;
const ESCAPES = { '\0': '\\0', '\t': '\\t', '\r': '\\r', '\n': '\\n', '"': '\\"', '\\': '\\\\' };

/** A string as Rust's `{:?}` writes it: in double quotes, `\t \r \n \0 \" \\`
 * escaped, and every other character that does not print itself (controls,
 * invisible formatting, combining marks, ...) as `\u{hex}`. The Rust host's
 * messages quote ids this way. */
export function rustDebug(s) {
  let out = '"';
  for (const c of s) {
    if (ESCAPES[c]) out += ESCAPES[c];
    else if (NOT_PRINTABLE.test(c) || GRAPHEME_EXTEND.test(c)) out += `\\u{${c.codePointAt(0).toString(16)}}`;
    else out += c;
  }
  return `${out}"`;
}

/** The message for an id refused because of `reason` (the crate's
 * `refusal`): the id quoted, shortened to 64 characters, with control and
 * invisible characters escaped so the message stays one line. */
export function refusal(id, reason) {
  const chars = Array.from(id);
  const shown = chars.slice(0, 64).join('') + (chars.length > 64 ? '...' : '');
  return `invalid image id ${rustDebug(shown)}: ${reason}`;
}

/** An image id as the application gives it, as the string the driver
 * gets, checked in the main thread before any worker sees it. A string is
 * taken as it is; an integer (a BigInt, or a number that is a safe
 * integer: Glance's ids may be integers) as its decimal digits, as
 * Python's `str()`. Anything else, and any string the rule refuses, is a
 * `CacheError` of kind `invalid-image-id`. Returns the id. */
export function validateImageId(id) {
  let s;
  if (typeof id === 'string') s = id;
  else if (typeof id === 'bigint') s = String(id);
  else if (typeof id === 'number') {
    if (!Number.isSafeInteger(id)) {
      throw new CacheError(
        'invalid-image-id',
        `invalid image id ${String(id)}: a number is taken as an id only when it is a safe integer (pass a string or a BigInt)`,
      );
    }
    s = String(id);
  } else {
    const what = id === null ? 'null' : typeof id;
    throw new CacheError('invalid-image-id', `invalid image id (${what}): an image id is a string, an integer or a BigInt`);
  }
  const reason = idProblem(s);
  if (reason) throw new CacheError('invalid-image-id', refusal(s, reason));
  return s;
}
