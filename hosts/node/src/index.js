// image-cache-wasm: the image-cache driver components (contract
// image-cache:driver@0.3.0) in Node, on jco. Types: ../index.d.ts.
export { ImageCache, ImageReader, ImageWriter, Tee, parseChecksum, DEFAULT_MAX_SIZE, DEFAULT_STALL_TIME } from './cache.js';
export { CacheError, validateImageId } from './errors.js';
export { DEFAULT_LIMITS, stats } from './driver.js';
export { CONTRACT, SUPPORTED, BUILTIN, DEFAULT_GRANTS, checkContract, loadDriver, componentsDir, componentPath } from './component.js';
export { Databases } from './database/service.js';
export {
  CENTRALIZED_DATABASE,
  DATABASE_DEFAULTS,
  GLANCE_CACHE_SCHEMA,
  grantStatements,
  MYSQL_GLANCE_CACHE_SCHEMA,
  mysqlGrantStatements,
  dialectOfUrl,
} from './database/settings.js';
