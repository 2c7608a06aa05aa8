import { crc32 } from 'node:zlib';
import { PrefetchInvalid } from './storage-errors.js';

/**
 * A build's recorded prefetch set (`memfile.prefetch`, stored with the build next to its
 * headers): the memory blocks a sandbox resumed from the build faulted while it started, in the
 * order of their first fault, each once. The next resume of the build copies them in first.
 * Ours (E2B keeps its prefetch mapping in its own header format); little endian, no padding:
 *
 *   0  magic     [8]  "SBXPFTCH"
 *   8  version   u32  1
 *   12 blockSize u32  the memfile header's block size (4096 or 2 MiB)
 *   16 size      u64  the memory file's size in bytes
 *   24 count     u32  entries
 *   28 crc32     u32  of the entry bytes (zlib's CRC-32)
 *   32 entries   u32 × count: block index (offset / blockSize), first fault first
 */
export interface PrefetchSet {
  blockSize: number;
  /** Size of the memory file the blocks index into. */
  size: number;
  /** Block indices, first fault first, no duplicates, each < ceil(size / blockSize). */
  blocks: number[];
}

export const PREFETCH_FILE = 'memfile.prefetch';
export const PREFETCH_MAGIC = Buffer.from('SBXPFTCH', 'latin1');
export const PREFETCH_VERSION = 1;
export const PREFETCH_HEADER_BYTES = 32;
export const PREFETCH_ENTRY_BYTES = 4;
const MIN_BLOCK = 4096;
const MAX_BLOCK = 1 << 30;

export function encodePrefetch(set: PrefetchSet): Buffer {
  validatePrefetch(set);
  const out = Buffer.alloc(PREFETCH_HEADER_BYTES + PREFETCH_ENTRY_BYTES * set.blocks.length);
  PREFETCH_MAGIC.copy(out, 0);
  out.writeUInt32LE(PREFETCH_VERSION, 8);
  out.writeUInt32LE(set.blockSize, 12);
  out.writeBigUInt64LE(BigInt(set.size), 16);
  out.writeUInt32LE(set.blocks.length, 24);
  let at = PREFETCH_HEADER_BYTES;
  for (const b of set.blocks) {
    out.writeUInt32LE(b, at);
    at += PREFETCH_ENTRY_BYTES;
  }
  out.writeUInt32LE(crc32(out.subarray(PREFETCH_HEADER_BYTES)), 28);
  return out;
}

/** Parses and checks a prefetch file; throws PrefetchInvalid saying what is wrong. */
export function decodePrefetch(bytes: Uint8Array): PrefetchSet {
  const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  if (buf.length < PREFETCH_HEADER_BYTES)
    throw new PrefetchInvalid(`${buf.length} bytes is shorter than the ${PREFETCH_HEADER_BYTES}-byte header`);
  if (!buf.subarray(0, 8).equals(PREFETCH_MAGIC))
    throw new PrefetchInvalid(`bad magic ${buf.subarray(0, 8).toString('hex')} (want "SBXPFTCH")`);
  const version = buf.readUInt32LE(8);
  if (version !== PREFETCH_VERSION)
    throw new PrefetchInvalid(`version ${version} is not supported (version ${PREFETCH_VERSION})`);
  const size = buf.readBigUInt64LE(16);
  if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw new PrefetchInvalid(`size ${size} is larger than 2^53 - 1`);
  const count = buf.readUInt32LE(24);
  const expected = PREFETCH_HEADER_BYTES + PREFETCH_ENTRY_BYTES * count;
  if (buf.length !== expected)
    throw new PrefetchInvalid(
      `${buf.length} bytes for ${count} entries (want ${expected}): truncated or trailing bytes`,
    );
  const sum = crc32(buf.subarray(PREFETCH_HEADER_BYTES));
  if (sum !== buf.readUInt32LE(28))
    throw new PrefetchInvalid(`entry checksum ${sum.toString(16)} does not match ${buf.readUInt32LE(28).toString(16)}`);
  const blocks: number[] = new Array<number>(count);
  for (let i = 0; i < count; i++) blocks[i] = buf.readUInt32LE(PREFETCH_HEADER_BYTES + i * PREFETCH_ENTRY_BYTES);
  const set = { blockSize: buf.readUInt32LE(12), size: Number(size), blocks };
  validatePrefetch(set);
  return set;
}

/** Throws PrefetchInvalid unless the block size, size and entries are sane. */
export function validatePrefetch(set: PrefetchSet): void {
  const { blockSize, size, blocks } = set;
  if (
    !Number.isSafeInteger(blockSize) ||
    blockSize < MIN_BLOCK ||
    blockSize > MAX_BLOCK ||
    (blockSize & (blockSize - 1)) !== 0
  )
    throw new PrefetchInvalid(`block size ${blockSize} is not a power of two in [${MIN_BLOCK}, ${MAX_BLOCK}]`);
  if (!Number.isSafeInteger(size) || size <= 0) throw new PrefetchInvalid(`size ${size} is not positive`);
  const total = Math.ceil(size / blockSize);
  if (total > 0xffffffff) throw new PrefetchInvalid(`${total} blocks do not fit a u32 block index`);
  if (blocks.length > total) throw new PrefetchInvalid(`${blocks.length} entries for a file of ${total} blocks`);
  const seen = new Set<number>();
  for (let i = 0; i < blocks.length; i++) {
    const b = blocks[i]!;
    if (!Number.isInteger(b) || b < 0 || b >= total)
      throw new PrefetchInvalid(`entry ${i}: block ${b} is outside the file's ${total} blocks`, i);
    if (seen.has(b)) throw new PrefetchInvalid(`entry ${i}: block ${b} is listed twice`, i);
    seen.add(b);
  }
}
