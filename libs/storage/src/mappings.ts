import { isBuildId, NIL_UUID, normalizeBuildId } from './build-id.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { HeaderInvalid } from './storage-errors.js';

/**
 * Bytes `[offset, offset + length)` of the virtual file live in build `buildId`'s data file at
 * `buildStorageOffset` (DESIGN.md §2). The nil UUID means zeros, not stored.
 */
export interface BuildMapping {
  offset: number;
  length: number;
  buildId: string;
  buildStorageOffset: number;
}

/** Dirty blocks of one pause: ascending unique block indices, or a bitmap. */
export type DirtySet = DirtyBitmap | Iterable<number>;

/** The whole file `[0, size)` → `buildId` at 0: a base build that has no header. */
export function baseMappings(size: number, buildId: string): BuildMapping[] {
  if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`size must be a non-negative integer, got ${size}`);
  if (size === 0) return [];
  return [{ offset: 0, length: size, buildId: normalizeBuildId(buildId), buildStorageOffset: 0 }];
}

/**
 * Mappings of one diff file: consecutive dirty blocks become one mapping to `buildId`, at the
 * position those blocks take in the diff (blocks are concatenated in ascending order). With
 * `size`, a last block that passes the end of a file whose size is not block-aligned is cut at it.
 */
export function createMappings(dirty: DirtySet, blockSize: number, buildId: string, size?: number): BuildMapping[] {
  checkBlockSize(blockSize);
  const id = normalizeBuildId(buildId);
  const totalBlocks = size === undefined ? Infinity : Math.ceil(size / blockSize);
  const out: BuildMapping[] = [];
  let previous = -1;
  let storageOffset = 0;
  let current: BuildMapping | undefined;
  for (const block of dirty) {
    if (!Number.isSafeInteger(block) || block < 0) throw new RangeError(`dirty block index invalid: ${block}`);
    if (block <= previous) throw new RangeError(`dirty blocks must ascend without repeats: ${block} after ${previous}`);
    if (block >= totalBlocks) throw new RangeError(`dirty block ${block} is past the end (${totalBlocks} blocks)`);
    const offset = block * blockSize;
    const length = size === undefined ? blockSize : Math.min(blockSize, size - offset);
    if (current !== undefined && block === previous + 1) {
      current.length += length;
    } else {
      current = { offset, length, buildId: id, buildStorageOffset: storageOffset };
      out.push(current);
    }
    storageOffset += blockSize;
    previous = block;
  }
  return out;
}

/**
 * Lays `diff` over `parent`: the diff wins where they overlap, parent mappings it cuts through
 * are split (their storage offsets shifted by the cut), and neighbours that end up describing
 * one contiguous range of one build are joined. Both inputs sorted and non-overlapping.
 */
export function mergeMappings(parent: readonly BuildMapping[], diff: readonly BuildMapping[]): BuildMapping[] {
  const out: BuildMapping[] = [];
  let d = 0;
  for (const p of parent) {
    const pEnd = p.offset + p.length;
    // Parents ascend, so a diff mapping that ends before this one ends before every later one.
    while (d < diff.length && diff[d]!.offset + diff[d]!.length <= p.offset) d++;
    let cursor = p.offset;
    for (let k = d; k < diff.length && diff[k]!.offset < pEnd; k++) {
      const dm = diff[k]!;
      if (dm.offset > cursor) out.push(slice(p, cursor, dm.offset));
      cursor = Math.max(cursor, dm.offset + dm.length);
    }
    if (cursor < pEnd) out.push(slice(p, cursor, pEnd));
  }
  for (const dm of diff) out.push({ ...dm });
  out.sort((a, b) => a.offset - b.offset);
  return normalizeMappings(out);
}

function slice(m: BuildMapping, start: number, end: number): BuildMapping {
  return {
    offset: start,
    length: end - start,
    buildId: m.buildId,
    buildStorageOffset: m.buildId === NIL_UUID ? 0 : m.buildStorageOffset + (start - m.offset),
  };
}

/**
 * Joins neighbours that are one contiguous range of one build (for the nil UUID any two
 * adjacent mappings, as zeros have no storage). E2B's NormalizeMappings joins on build alone,
 * which is only right while storage is contiguous; we check it.
 */
export function normalizeMappings(mappings: readonly BuildMapping[]): BuildMapping[] {
  const out: BuildMapping[] = [];
  for (const m of mappings) {
    if (m.length === 0) continue;
    const last = out[out.length - 1];
    if (
      last !== undefined &&
      last.buildId === m.buildId &&
      last.offset + last.length === m.offset &&
      (m.buildId === NIL_UUID || last.buildStorageOffset + last.length === m.buildStorageOffset)
    ) {
      last.length += m.length;
    } else {
      out.push({ ...m });
    }
  }
  return out;
}

/**
 * Throws HeaderInvalid unless the mappings are block-aligned, sorted, non-overlapping, of
 * positive length, and cover exactly `[0, size)` (DESIGN.md §2). Only a last mapping that ends
 * at a `size` which is not block-aligned may have a length that is not a whole number of blocks.
 */
export function validateMappings(mappings: readonly BuildMapping[], size: number, blockSize: number): void {
  checkBlockSize(blockSize);
  if (!Number.isSafeInteger(size) || size < 0)
    throw new HeaderInvalid(`size ${size} is not a safe non-negative integer`);
  let cursor = 0;
  for (let i = 0; i < mappings.length; i++) {
    const m = mappings[i]!;
    const at = { mappingIndex: i, offset: m.offset };
    if (!Number.isSafeInteger(m.offset) || m.offset < 0) throw new HeaderInvalid(`offset is not a safe integer`, at);
    if (!Number.isSafeInteger(m.length) || m.length <= 0)
      throw new HeaderInvalid(`length ${m.length} is not positive`, at);
    if (m.offset < cursor) {
      throw new HeaderInvalid(
        `overlaps or is out of order: starts at ${m.offset}, previous mapping ends at ${cursor}`,
        at,
      );
    }
    if (m.offset > cursor) throw new HeaderInvalid(`gap: [${cursor}, ${m.offset}) is not covered by any mapping`, at);
    if (m.offset % blockSize !== 0) throw new HeaderInvalid(`offset is not aligned to block size ${blockSize}`, at);
    const end = m.offset + m.length;
    if (end > size) throw new HeaderInvalid(`ends at ${end}, past the file size ${size}`, at);
    if (m.length % blockSize !== 0 && end !== size) {
      throw new HeaderInvalid(`length ${m.length} is not a multiple of block size ${blockSize}`, at);
    }
    if (!isBuildId(m.buildId)) throw new HeaderInvalid(`build id ${JSON.stringify(m.buildId)} is not a UUID`, at);
    if (!Number.isSafeInteger(m.buildStorageOffset) || m.buildStorageOffset < 0) {
      throw new HeaderInvalid(`build storage offset ${m.buildStorageOffset} is not a safe non-negative integer`, at);
    }
    if (m.buildId !== NIL_UUID) {
      if (m.buildStorageOffset % blockSize !== 0) {
        throw new HeaderInvalid(`build storage offset ${m.buildStorageOffset} is not block-aligned`, at);
      }
      if (!Number.isSafeInteger(m.buildStorageOffset + m.length)) {
        throw new HeaderInvalid(`build storage range ends past 2^53`, at);
      }
    }
    cursor = end;
  }
  if (cursor !== size) {
    throw new HeaderInvalid(`mappings cover [0, ${cursor}) but the file size is ${size}`, {
      mappingIndex: mappings.length,
      offset: cursor,
    });
  }
}

/** Index of the mapping that holds `offset` (binary search over validated mappings), or -1. */
export function mappingIndexAt(mappings: readonly BuildMapping[], offset: number): number {
  let lo = 0;
  let hi = mappings.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const m = mappings[mid]!;
    if (offset < m.offset) hi = mid - 1;
    else if (offset >= m.offset + m.length) lo = mid + 1;
    else return mid;
  }
  return -1;
}

function checkBlockSize(blockSize: number): void {
  if (!Number.isSafeInteger(blockSize) || blockSize <= 0) {
    throw new HeaderInvalid(`block size ${blockSize} is not a positive integer`);
  }
}
