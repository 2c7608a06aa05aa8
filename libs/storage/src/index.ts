export type { ReadableBlocks, WritableBlocks } from './block-source.js';
export { NIL_UUID, isBuildId, normalizeBuildId, newBuildId, uuidToBytes, uuidFromBytes } from './build-id.js';
export {
  HeaderInvalid,
  BuildIdInvalid,
  ObjectNotFound,
  BuildNotFound,
  StorageUnavailable,
  UploadFailed,
  StorageClosed,
  PrefetchInvalid,
} from './storage-errors.js';
export type { HeaderProblemLocation } from './storage-errors.js';
export { DirtyBitmap } from './dirty-bitmap.js';
export {
  baseMappings,
  createMappings,
  mergeMappings,
  normalizeMappings,
  validateMappings,
  mappingIndexAt,
} from './mappings.js';
export type { BuildMapping, DirtySet } from './mappings.js';
export {
  encodeHeader,
  decodeHeader,
  baseHeader,
  HEADER_VERSION,
  validateHeader,
  HEADER_METADATA_BYTES,
  HEADER_MAPPING_BYTES,
  HEADER_MIN_VERSION,
  HEADER_MAX_VERSION,
} from './header-codec.js';
export type { Header, HeaderMetadata, EncodeOptions } from './header-codec.js';
export {
  encodePrefetch,
  decodePrefetch,
  validatePrefetch,
  PREFETCH_FILE,
  PREFETCH_VERSION,
  PREFETCH_HEADER_BYTES,
  PREFETCH_ENTRY_BYTES,
} from './prefetch-codec.js';
export type { PrefetchSet } from './prefetch-codec.js';
export { LayeredFile } from './layered-file.js';
export type { BuildResolver, ReadSpan, MappedSpan, LayeredFileOptions } from './layered-file.js';
export { MemoryBlocks } from './memory-blocks.js';
export type { StorageBackend, UploadOptions } from './storage-backend.js';
export { LocalBackend } from './local-backend.js';
export { GcsBackend } from './gcs-backend.js';
export type { GcsBackendOptions } from './gcs-backend.js';
export { openBackend } from './open-backend.js';
export { DelayedBackend } from './delayed-backend.js';
export { DEFAULT_FETCH_POLICY, DEMAND_ONLY_FETCH_POLICY, type FetchPolicy } from './fetch-policy.js';
export {
  bucketFetchFields,
  configuredFetch,
  gcsEndpointField,
  openConfiguredBackend,
  type BucketSettings,
  type FetchSettings,
} from './bucket-config.js';
export {
  buildObjectPath,
  headerFileName,
  checkObjectPath,
  BUILD_DATA_FILES,
  BUILD_FILE_NAMES,
  HEADER_SUFFIX,
} from './object-paths.js';
export type { BuildDataFile, BuildFileName } from './object-paths.js';
export { withRetries, isRetryableStorageError, DEFAULT_RETRY_POLICY } from './retry-policy.js';
export type { RetryPolicy } from './retry-policy.js';
export type { CachedFile, RetryObserver } from './cached-file.js';
export { FileBlocks } from './file-blocks.js';
export { ChunkCache, CHUNK_SIZE, backendSource } from './chunk-cache.js';
export type { ChunkCacheOptions, ChunkCacheStats, ChunkSource } from './chunk-cache.js';
export { BuildCache, BuildCacheEntry } from './build-cache.js';
export type { BuildCacheOptions, BuildCacheEvent, CachedBuildInfo, DiskUsage } from './build-cache.js';
export { BuildStore, UPLOAD_ORDER } from './build-store.js';
export type {
  BuildStoreOptions,
  CachedBuild,
  OpenedBuildFile,
  SnapshotBuild,
  UploadEvent,
  UploadState,
} from './build-store.js';
export { summarizeHeader, formatHeader, formatMapping } from './inspect-header-command.js';
export { main as inspectDataMain } from './inspect-data-command.js';
export type { BuildShare } from './inspect-header-command.js';
