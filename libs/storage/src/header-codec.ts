import { NIL_UUID, uuidFromBytes, uuidToBytes } from './build-id.js';
import { baseMappings, type BuildMapping, validateMappings } from './mappings.js';
import { HeaderInvalid } from './storage-errors.js';

/**
 * E2B's uncompressed build header, versions 1 to 3 (DESIGN.md §2): Go's
 * `binary.Write(LittleEndian, Metadata)` then one `binary.Write` per `BuildMap`, so the layout
 * is the structs' fields in order with no padding; uuid.UUID is 16 bytes in RFC 4122 order.
 *
 *   metadata (64): version u64 | blockSize u64 | size u64 | generation u64 | buildId [16] | baseBuildId [16]
 *   mapping  (40): offset u64 | length u64 | buildId [16] | buildStorageOffset u64
 */
export interface HeaderMetadata {
  version: number;
  blockSize: number;
  size: number;
  generation: number;
  buildId: string;
  baseBuildId: string;
}

export interface Header {
  metadata: HeaderMetadata;
  mappings: BuildMapping[];
}

export const HEADER_METADATA_BYTES = 64;
export const HEADER_MAPPING_BYTES = 40;
export const HEADER_MIN_VERSION = 1;
export const HEADER_MAX_VERSION = 3;
/** Smallest block we accept: a disk sector. Largest: 1 GiB huge pages. */
export const MIN_BLOCK_SIZE = 512;
export const MAX_BLOCK_SIZE = 1 << 30;

/** The version of the headers we write and the one given to a build that has none. */
export const HEADER_VERSION = 3;

/**
 * The header of a build stored without one (a plain base build: an image put in the bucket as
 * it is): one mapping [0, size) onto its own data file at 0, generation 0, version 3 (what
 * E2B's header.NewTemplateMetadata writes today). Every reader uses this one function.
 */
export function baseHeader(buildId: string, size: number, blockSize: number): Header {
  return {
    metadata: { version: HEADER_VERSION, blockSize, size, generation: 0, buildId, baseBuildId: buildId },
    mappings: baseMappings(size, buildId),
  };
}

export interface EncodeOptions {
  /** Checks the header like decodeHeader does before writing it. Default true. */
  validate?: boolean;
}

export function encodeHeader(header: Header, options: EncodeOptions = {}): Buffer {
  if (options.validate ?? true) validateHeader(header);
  const { metadata, mappings } = header;
  const out = Buffer.alloc(HEADER_METADATA_BYTES + HEADER_MAPPING_BYTES * mappings.length);
  out.writeBigUInt64LE(BigInt(metadata.version), 0);
  out.writeBigUInt64LE(BigInt(metadata.blockSize), 8);
  out.writeBigUInt64LE(BigInt(metadata.size), 16);
  out.writeBigUInt64LE(BigInt(metadata.generation), 24);
  uuidToBytes(metadata.buildId).copy(out, 32);
  uuidToBytes(metadata.baseBuildId).copy(out, 48);
  let at = HEADER_METADATA_BYTES;
  for (const m of mappings) {
    out.writeBigUInt64LE(BigInt(m.offset), at);
    out.writeBigUInt64LE(BigInt(m.length), at + 8);
    uuidToBytes(m.buildId).copy(out, at + 16);
    out.writeBigUInt64LE(BigInt(m.buildStorageOffset), at + 32);
    at += HEADER_MAPPING_BYTES;
  }
  return out;
}

/** Parses and validates a header; throws HeaderInvalid saying what is wrong and where. */
export function decodeHeader(bytes: Uint8Array): Header {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < HEADER_METADATA_BYTES) {
    throw new HeaderInvalid(`${buf.length} bytes is shorter than the ${HEADER_METADATA_BYTES}-byte metadata`);
  }
  const trailing = (buf.length - HEADER_METADATA_BYTES) % HEADER_MAPPING_BYTES;
  if (trailing !== 0) {
    throw new HeaderInvalid(`${trailing} trailing bytes after the last whole ${HEADER_MAPPING_BYTES}-byte mapping`, {
      mappingIndex: Math.floor((buf.length - HEADER_METADATA_BYTES) / HEADER_MAPPING_BYTES),
    });
  }
  const metadata: HeaderMetadata = {
    version: readU64(buf, 0, 'version'),
    blockSize: readU64(buf, 8, 'block size'),
    size: readU64(buf, 16, 'size'),
    generation: readU64(buf, 24, 'generation'),
    buildId: uuidFromBytes(buf, 32),
    baseBuildId: uuidFromBytes(buf, 48),
  };
  validateMetadata(metadata);
  const count = (buf.length - HEADER_METADATA_BYTES) / HEADER_MAPPING_BYTES;
  // Mappings have at least one block each: more of them than blocks cannot be valid, and a
  // hostile header must not make us build millions of objects before saying so.
  const blocks = Math.ceil(metadata.size / metadata.blockSize);
  if (count > blocks) {
    throw new HeaderInvalid(`${count} mappings for a file of ${blocks} blocks`, { mappingIndex: blocks });
  }
  const mappings: BuildMapping[] = [];
  for (let i = 0; i < count; i++) {
    const at = HEADER_METADATA_BYTES + i * HEADER_MAPPING_BYTES;
    mappings.push({
      offset: readU64(buf, at, 'mapping offset', i),
      length: readU64(buf, at + 8, 'mapping length', i),
      buildId: uuidFromBytes(buf, at + 16),
      buildStorageOffset: readU64(buf, at + 32, 'mapping build storage offset', i),
    });
  }
  const header = { metadata, mappings };
  validateHeader(header);
  return header;
}

/** Throws HeaderInvalid unless the metadata is sane and the mappings satisfy DESIGN.md §2. */
export function validateHeader(header: Header): void {
  validateMetadata(header.metadata);
  validateMappings(header.mappings, header.metadata.size, header.metadata.blockSize);
}

function validateMetadata(m: HeaderMetadata): void {
  if (!Number.isInteger(m.version) || m.version < HEADER_MIN_VERSION || m.version > HEADER_MAX_VERSION) {
    throw new HeaderInvalid(
      `version ${m.version} is not supported (uncompressed versions ${HEADER_MIN_VERSION} to ${HEADER_MAX_VERSION})`,
    );
  }
  if (
    !Number.isSafeInteger(m.blockSize) ||
    m.blockSize < MIN_BLOCK_SIZE ||
    m.blockSize > MAX_BLOCK_SIZE ||
    (m.blockSize & (m.blockSize - 1)) !== 0
  ) {
    throw new HeaderInvalid(
      `block size ${m.blockSize} is not a power of two in [${MIN_BLOCK_SIZE}, ${MAX_BLOCK_SIZE}]`,
    );
  }
  if (!Number.isSafeInteger(m.size) || m.size <= 0) throw new HeaderInvalid(`size ${m.size} is not positive`);
  if (!Number.isSafeInteger(m.generation) || m.generation < 0) {
    throw new HeaderInvalid(`generation ${m.generation} is not a non-negative integer`);
  }
  if (m.buildId === NIL_UUID) throw new HeaderInvalid('the header build id is the nil UUID');
}

function readU64(buf: Buffer, at: number, field: string, mappingIndex?: number): number {
  const value = buf.readBigUInt64LE(at);
  if (value > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new HeaderInvalid(
      `${field} ${value} is larger than 2^53 - 1`,
      mappingIndex === undefined ? {} : { mappingIndex },
    );
  }
  return Number(value);
}
