// Types of image-cache-wasm: the image-cache driver components (contract
// image-cache:driver@0.3.0) in Node, on jco. Hand-written; checked by
// `tsc --noEmit` on examples/typed.ts (test/types.test.js, and against the
// installed tarball by .ci/node-package-check.sh). They use Node's own
// types (Buffer, Symbol.asyncDispose): install @types/node (20 or later).

/// <reference types="node" />

// ---- ids, errors ----------------------------------------------------------

/**
 * An image id as the API takes it: a string, or an integer (a BigInt, or a
 * number that is a safe integer), which is taken as its decimal digits as
 * Python's `str()` would (Glance's ids may be integers). Every method checks
 * it in the main thread before any worker sees it: not empty, at most 255
 * bytes of UTF-8, not `.` or `..`, no `/`, `\`, control or invisible
 * formatting character (the image-id crate's rule); otherwise, or for any
 * other type, a `CacheError` of kind `invalid-image-id`.
 */
export type ImageId = string | number | bigint;

/** The driver contract's error cases (the WIT `error` variant). */
export type DriverErrorKind =
  | 'bad-configuration'
  | 'invalid-image-id'
  | 'not-found'
  | 'already-cached'
  | 'being-cached'
  | 'io'
  | 'database'
  | 'not-configured'
  | 'unsupported';

/** The host's own error cases. */
export type HostErrorKind = 'checksum-mismatch' | 'source' | 'sink' | 'driver-fault' | 'load' | 'overloaded';

export type CacheErrorKind = DriverErrorKind | HostErrorKind;

/** The `fs` error code an `io` error carries (`ioCode`). */
export type FsErrorCode =
  | 'not-found'
  | 'already-exists'
  | 'access-denied'
  | 'invalid-path'
  | 'not-a-directory'
  | 'is-a-directory'
  | 'no-space'
  | 'unsupported'
  | 'limit-exceeded'
  | 'timed-out'
  | 'invalid-argument'
  | 'io'
  | (string & {});

/** Every error of the library: one class, told apart by `kind`. */
export class CacheError extends Error {
  constructor(kind: CacheErrorKind, message: string, extra?: Record<string, unknown>);
  readonly name: 'CacheError';
  readonly kind: CacheErrorKind;
  /** Kind `io`: the fs error code the driver's error carries. */
  readonly ioCode?: FsErrorCode;
  /** Kind `driver-fault`: the driver that broke. */
  readonly driver?: string;
}

/**
 * Check an image id as every method does and return it as the string the
 * driver gets (`12` and `12n` give `'12'`).
 * @throws {CacheError} kind `invalid-image-id`
 */
export function validateImageId(id: unknown): string;

// ---- records ----------------------------------------------------------------

/** Seconds since the Unix epoch, as Glance stores them (fractional). */
export type Timestamp = number;

export interface CachedImage {
  imageId: string;
  hits: number;
  lastModified: Timestamp;
  lastAccessed: Timestamp;
  size: number;
}

export interface LruEntry {
  imageId: string;
  size: number;
  lastAccessed: Timestamp;
}

export interface RemovedFile {
  imageId: string;
  size: number;
}

export interface CleanReport {
  invalid: RemovedFile[];
  incomplete: RemovedFile[];
  /** Files that could not be removed, one printable line each (at most 1000). */
  failures: string[];
}

export interface PruneReport {
  removed: RemovedFile[];
  bytesRemoved: number;
  sizeAfter: number;
  failures: string[];
}

export interface DriverInfo {
  name: string;
  version: string;
  /** Where the driver keeps metadata, in a sentence. */
  description: string;
  /** The component: a built-in name or the file's name. */
  component: string;
  /** The driver asked for, when the cache fell back to sqlite. */
  fellBackFrom?: string;
}

// ---- options ----------------------------------------------------------------

/** Bounds on one driver instance (DEFAULT_LIMITS has the defaults). */
export interface Limits {
  /** Longest one driver call may run, host imports included (ms). 30 000. */
  callDeadlineMs: number;
  /** Most linear memory the instance may grow to (bytes). 1 GiB. */
  memoryBytes: number;
  /** Most files the instance may hold open. 256. */
  openFiles: number;
  /** Most entries one directory listing may return. 4 000 000. */
  maxListing: number;
  /** The JS heap of the instance's worker (MiB). 512. */
  heapMb: number;
  /** Stopped instances still running (inside a system call) a driver may
   * leave behind before it gets no new instance. 2. */
  maxStoppedRunning: number;
  /** Most database connections the instance may hold at once. 4. */
  databaseConnections: number;
}

/** One shared database a driver importing `database` may open. */
export interface DatabaseSettings {
  /** `postgresql://user:pw@host:port/db` (also `postgres://`,
   * `postgresql+psycopg2://`, libpq's `key=value`), or
   * `mysql+pymysql://user:pw@host:port/db` (also `mysql://`, `mariadb://`). */
  url: string;
  /** Connections this cache holds at most (all its drivers together). 4. */
  poolSize?: number;
  /** The server-side bound of one statement, lock wait and idle
   * transaction (ms); default `limits.callDeadlineMs`. */
  statementTimeoutMs?: number;
  /** Opening one connection (ms). 10 000. */
  connectTimeoutMs?: number;
  /** Most bytes one query's result may hold. 64 MiB. */
  maxResultBytes?: number;
  /** Accept a role with more than a cache driver needs (tests and
   * migrations only; a warning is given). false. */
  allowPrivilegedRole?: boolean;
}

/** A built-in driver. `hostile` is a test fixture the package does not carry. */
export type BuiltinDriver = 'sqlite' | 'xattr' | 'centralized' | 'hostile';

/** What a driver may be granted beyond `fs` and `clock`. `sqlite` (retired
 * with contract 0.3.0) is accepted and ignored with a warning. */
export type Grant = 'xattr' | 'database' | 'sqlite';

export interface OpenOptions {
  /** A built-in driver or the path of a component file. 'sqlite'. */
  driver?: BuiltinDriver | (string & {});
  /** Run on the built-in sqlite driver (with a warning) when the driver
   * cannot be used; never for an unreachable database. true. */
  fallbackToSqlite?: boolean;
  /** The metadata database's name in the root. 'cache.db'. */
  sqliteDb?: string;
  limits?: Partial<Limits>;
  /** What a component file is granted. ['xattr']. */
  grants?: Grant[];
  /** The driver's options, by Glance's names, e.g.
   * `{ worker_self_reference_url: 'http://glance-api-1:9292' }`. */
  driverOptions?: Record<string, string>;
  /** false makes every xattr call `unsupported`. true. */
  xattr?: boolean;
  /** Where warnings go. `process.emitWarning(message, 'ImageCacheWarning')`. */
  onWarning?: (message: string) => void;
  /** The shared databases drivers may open, by name (the centralized
   * driver opens `glance`): a URL or its settings. */
  databases?: Record<string, string | DatabaseSettings>;
}

/** A byte source to cache: bytes, a string, or an (async) iterable of
 * chunks, e.g. a Node `Readable`. */
export type ImageSource =
  | string
  | Uint8Array
  | Iterable<Uint8Array | string>
  | AsyncIterable<Uint8Array | string>;

/** `md5:HEX`, `sha256:HEX`, `sha512:HEX`, or bare hex whose length says which. */
export type ChecksumSpec = string;

export interface Checksum {
  algorithm: 'md5' | 'sha256' | 'sha512';
  hex: string;
  toString(): string;
}

/** Parse a checksum; null for null or undefined.
 * @throws {CacheError} kind `checksum-mismatch` when it cannot be read */
export function parseChecksum(s: ChecksumSpec | null | undefined): Checksum | null;

// ---- the cache ----------------------------------------------------------------

export class ImageCache {
  /** Use `await ImageCache.open(root, options)`; the constructor throws a
   * TypeError. */
  private constructor();

  /**
   * Open a cache on `root` (created if missing): loads and configures the
   * driver in a worker thread.
   * @throws {CacheError} `bad-configuration`, `load`, `database`, ...
   */
  static open(root: string, options?: OpenOptions): Promise<ImageCache>;

  /** The cache directory (its real path). */
  readonly root: string;
  /** The driver now serving calls. */
  readonly driverInfo: DriverInfo;

  /** Replace the driver; the old one stays if the new one fails. Sessions
   * already open finish on the old one. */
  swapDriver(source: BuiltinDriver | (string & {}), options?: { grants?: Grant[] }): Promise<void>;
  /** Stop the driver's worker and close the database pools. */
  close(): Promise<void>;
  /** `await using cache = await ImageCache.open(...)`: closes it. */
  [Symbol.asyncDispose](): Promise<void>;

  getCacheSize(): Promise<number>;
  getHitCount(id: ImageId): Promise<number>;
  /** Every cached image, ordered by id. */
  getCachedImages(): Promise<CachedImage[]>;
  /** Glance's list_cached: getCachedImages. */
  listCached(): Promise<CachedImage[]>;
  isCached(id: ImageId): Promise<boolean>;
  isBeingCached(id: ImageId): Promise<boolean>;
  isCacheable(id: ImageId): Promise<boolean>;
  isQueued(id: ImageId): Promise<boolean>;
  /** Queue an image for prefetching; false if cached, incoming or queued. */
  queueImage(id: ImageId): Promise<boolean>;
  /** Glance's name of queueImage. */
  queue(id: ImageId): Promise<boolean>;
  /** Queued ids, oldest first. */
  getQueuedImages(): Promise<string[]>;
  deleteCachedImage(id: ImageId): Promise<void>;
  /** How many files were removed. */
  deleteAllCachedImages(): Promise<number>;
  deleteQueuedImage(id: ImageId): Promise<void>;
  deleteAllQueuedImages(): Promise<number>;
  /** [id, size] of the image accessed longest ago, or null. */
  getLeastRecentlyAccessed(): Promise<[string, number] | null>;
  getLeastRecentlyAccessedBatch(count: number): Promise<LruEntry[]>;
  /** @throws {CacheError} `not-found` if not cached */
  getImageSize(id: ImageId): Promise<number>;
  /** The nodes holding the image (the centralized driver); `unsupported`
   * for drivers whose metadata is local. */
  getCachedNodes(id: ImageId): Promise<string[]>;
  /** Evict least recently accessed images until the cache is at or under
   * maxSize bytes (default 10 GiB; 0 empties it). */
  prune(maxSize?: number): Promise<PruneReport>;
  /** Remove invalid files, and incomplete ones older than stallTime
   * seconds (default 86 400). */
  clean(stallTime?: number): Promise<CleanReport>;

  /** Start writing an image. @throws {CacheError} `already-cached`, `being-cached` */
  openForWrite(id: ImageId): Promise<ImageWriter>;
  /** Start reading a cached image. @throws {CacheError} `not-found` */
  openForRead(id: ImageId): Promise<ImageReader>;
  /** Read a whole cached image, counting the hit. */
  readImage(id: ImageId): Promise<Buffer>;
  /** Cache `source` as image `id`, verifying `checksum` if given. Strict:
   * an image that cannot be cached is an error. Resolves to the bytes
   * written. */
  cache(id: ImageId, source: ImageSource, options?: { checksum?: ChecksumSpec }): Promise<number>;
  /** Glance's caching iterator: the chunks of `source` pass through while
   * they are cached. */
  cacheStream(id: ImageId, source: ImageSource, options?: { checksum?: ChecksumSpec }): Promise<Tee>;
}

/** What a Tee did, once it has been iterated. */
export interface TeeReport {
  /** Bytes passed through. */
  bytes: number;
  /** Whether the image was committed to the cache. */
  cached: boolean;
  /** Why it was not cached, when the cache (not the source) failed. */
  cacheError: string | null;
}

/** The caching tee: iterate it to pass the source's chunks on. */
export class Tee implements AsyncIterable<Uint8Array> {
  private constructor();
  readonly report: TeeReport;
  [Symbol.asyncIterator](): AsyncIterator<Uint8Array>;
}

/** A write session: write the bytes, then commit (or abort). */
export class ImageWriter {
  private constructor();
  readonly imageId: string;
  /** Bytes written so far. */
  readonly written: number;
  write(chunk: Uint8Array | string): Promise<void>;
  /** Flush to stable storage and publish the image, recording `checksum`
   * (e.g. `sha256:HEX`) if given. */
  commit(checksum?: string | Checksum | null): Promise<void>;
  /** Give up: the file moves to invalid/ with `reason`. */
  abort(reason: string): Promise<void>;
  /** End without commit or abort (aborted as an incomplete fetch). */
  drop(): Promise<void>;
  /** `await using`: drop(), a no-op once committed or aborted. */
  [Symbol.asyncDispose](): Promise<void>;
}

/** A read session: an async iterable of chunks; reading to the end counts
 * the hit. */
export class ImageReader implements AsyncIterable<Buffer> {
  private constructor();
  readonly imageId: string;
  /** The image's size when the read began. */
  readonly size: number;
  /** Read up to buf.length bytes; 0 at the end (which counts the hit). */
  read(buf: Uint8Array): Promise<number>;
  /** The checksum recorded at commit (e.g. `md5:HEX`), or null. */
  checksum(): Promise<string | null>;
  /** End the read and count the hit. */
  finish(): Promise<void>;
  /** End the read without counting it. */
  close(): Promise<void>;
  /** `await using`: close(), a no-op once the read has ended. */
  [Symbol.asyncDispose](): Promise<void>;
  [Symbol.asyncIterator](): AsyncGenerator<Buffer, void, undefined>;
  /** Read the rest, counting the hit. */
  readAll(): Promise<Buffer>;
}

// ---- constants, components ---------------------------------------------------

/** 10 GiB: prune()'s default. */
export const DEFAULT_MAX_SIZE: number;
/** 86 400 s: clean()'s default. */
export const DEFAULT_STALL_TIME: number;
export const DEFAULT_LIMITS: Readonly<Limits>;
/** Instances started and discarded in this process. */
export const stats: { readonly instances: number; readonly discarded: number };

/** 'image-cache:driver@0.3.0' */
export const CONTRACT: string;
/** '>=0.3.0, <0.4.0' */
export const SUPPORTED: string;
export const BUILTIN: readonly BuiltinDriver[];
export const DEFAULT_GRANTS: readonly Grant[];

/** Where the driver components are: $IMAGE_CACHE_COMPONENTS_DIR when set,
 * else the package's own `components/`. */
export function componentsDir(): string;
/** The component file of a built-in driver, e.g. for `swapDriver` or
 * another host. */
export function componentPath(name: 'sqlite' | 'xattr' | 'centralized' | 'hostile'): string;

/** What a component imports and exports (`image-cache:driver/fs@0.3.0`, ...). */
export interface ComponentWorld {
  name: string;
  imports: string[];
  exports: string[];
}

/** Check a component's imports and exports against the contract and the
 * grants. @throws {CacheError} kind `load` */
export function checkContract(meta: ComponentWorld, grants?: readonly Grant[]): void;

/** A checked, compiled driver component (what ImageCache.open loads). */
export interface LoadedDriver extends ComponentWorld {
  sha256: string;
}

export function loadDriver(
  source: BuiltinDriver | (string & {}),
  options?: { grants?: readonly Grant[]; memoryBytes?: number; onWarning?: (message: string) => void },
): Promise<LoadedDriver>;

// ---- databases ------------------------------------------------------------------

/** The databases one cache offers its drivers (ImageCache.open makes one
 * from `databases`). @throws {CacheError} `bad-configuration` */
export class Databases {
  constructor(
    config?: Record<string, string | DatabaseSettings>,
    options?: { callDeadlineMs?: number; onWarning?: (message: string) => void },
  );
  readonly names: string[];
  close(): void;
}

/** 'glance': the name the centralized driver opens. */
export const CENTRALIZED_DATABASE: string;
export const DATABASE_DEFAULTS: Readonly<{
  poolSize: number;
  connectTimeoutMs: number;
  maxResultBytes: number;
  allowPrivilegedRole: boolean;
}>;
/** Glance's cache tables on PostgreSQL (one script). */
export const GLANCE_CACHE_SCHEMA: string;
/** Glance's cache tables on MySQL/MariaDB (one statement each). */
export const MYSQL_GLANCE_CACHE_SCHEMA: readonly string[];
/** What `image-cache db grants` prints for a PostgreSQL role. */
export function grantStatements(role: string, database: string): string[];
/** What `image-cache db grants --mysql` prints (role or `user@host`). */
export function mysqlGrantStatements(role: string, database: string): string[];
/** The SQL a URL's server speaks. @throws {Error} for another scheme */
export function dialectOfUrl(url: string): 'postgresql' | 'mysql';
