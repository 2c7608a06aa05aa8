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
  validateHeader,
  HEADER_METADATA_BYTES,
  HEADER_MAPPING_BYTES,
  HEADER_MIN_VERSION,
  HEADER_MAX_VERSION,
} from './header-codec.js';
export type { Header, HeaderMetadata, EncodeOptions } from './header-codec.js';
export { LayeredFile } from './layered-file.js';
export type { BuildResolver, ReadSpan, LayeredFileOptions } from './layered-file.js';
export { MemoryBlocks } from './memory-blocks.js';
