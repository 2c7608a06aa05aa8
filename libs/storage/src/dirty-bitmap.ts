/**
 * One bit per block: which blocks a sandbox wrote since its resume (block-server, uffd-server)
 * or which chunks a cache holds. Serialized form (little endian), so it can be kept on disk:
 * magic "SBXBMAP1" (8 bytes), blockCount u64, then ceil(blockCount / 8) bytes of bits,
 * bit `i % 8` of byte `i / 8` for block `i`.
 */
export class DirtyBitmap implements Iterable<number> {
  static readonly MAGIC = Buffer.from('SBXBMAP1', 'ascii');
  readonly blockCount: number;
  private readonly bits: Uint8Array;
  private setCount = 0;

  constructor(blockCount: number) {
    if (!Number.isSafeInteger(blockCount) || blockCount < 0) {
      throw new RangeError(`block count must be a non-negative integer, got ${blockCount}`);
    }
    this.blockCount = blockCount;
    this.bits = new Uint8Array(Math.ceil(blockCount / 8));
  }

  /** A bitmap sized for a file of `size` bytes in blocks of `blockSize`. */
  static forSize(size: number, blockSize: number): DirtyBitmap {
    return new DirtyBitmap(Math.ceil(size / blockSize));
  }

  get count(): number {
    return this.setCount;
  }

  has(block: number): boolean {
    if (!Number.isInteger(block) || block < 0 || block >= this.blockCount) return false;
    return (this.bits[block >>> 3]! & (1 << (block & 7))) !== 0;
  }

  set(block: number): void {
    this.check(block);
    const i = block >>> 3;
    const bit = 1 << (block & 7);
    const byte = this.bits[i]!;
    if ((byte & bit) === 0) {
      this.bits[i] = byte | bit;
      this.setCount++;
    }
  }

  clear(block: number): void {
    this.check(block);
    const i = block >>> 3;
    const bit = 1 << (block & 7);
    const byte = this.bits[i]!;
    if ((byte & bit) !== 0) {
      this.bits[i] = byte & ~bit;
      this.setCount--;
    }
  }

  /** Sets blocks `[start, end)`. */
  setRange(start: number, end: number): void {
    for (let b = start; b < end; b++) this.set(b);
  }

  /** Sets every block that touches bytes `[offset, offset + length)`. */
  setBytes(offset: number, length: number, blockSize: number): void {
    if (length <= 0) return;
    this.setRange(Math.floor(offset / blockSize), Math.ceil((offset + length) / blockSize));
  }

  /** Adds every block set in `other` (same block count). */
  union(other: DirtyBitmap): void {
    if (other.blockCount !== this.blockCount) {
      throw new RangeError(`bitmap sizes differ: ${this.blockCount} and ${other.blockCount} blocks`);
    }
    for (const b of other) this.set(b);
  }

  clone(): DirtyBitmap {
    const copy = new DirtyBitmap(this.blockCount);
    copy.bits.set(this.bits);
    copy.setCount = this.setCount;
    return copy;
  }

  /** Set blocks in ascending order; whole empty bytes are skipped. */
  *[Symbol.iterator](): Iterator<number> {
    for (let i = 0; i < this.bits.length; i++) {
      const byte = this.bits[i]!;
      if (byte === 0) continue;
      for (let bit = 0; bit < 8; bit++) if ((byte & (1 << bit)) !== 0) yield i * 8 + bit;
    }
  }

  toBytes(): Buffer {
    const out = Buffer.alloc(16 + this.bits.length);
    DirtyBitmap.MAGIC.copy(out, 0);
    out.writeBigUInt64LE(BigInt(this.blockCount), 8);
    out.set(this.bits, 16);
    return out;
  }

  static fromBytes(bytes: Uint8Array): DirtyBitmap {
    const buf = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    if (buf.length < 16 || !buf.subarray(0, 8).equals(DirtyBitmap.MAGIC)) {
      throw new RangeError('dirty bitmap: bad magic (expected "SBXBMAP1")');
    }
    const count = buf.readBigUInt64LE(8);
    if (count > BigInt(Number.MAX_SAFE_INTEGER)) throw new RangeError(`dirty bitmap: block count ${count} too large`);
    const bitmap = new DirtyBitmap(Number(count));
    if (buf.length !== 16 + bitmap.bits.length) {
      throw new RangeError(
        `dirty bitmap: ${bitmap.blockCount} blocks need ${16 + bitmap.bits.length} bytes, got ${buf.length}`,
      );
    }
    bitmap.bits.set(buf.subarray(16));
    const tail = bitmap.blockCount & 7;
    if (tail !== 0 && (bitmap.bits[bitmap.bits.length - 1]! & ~((1 << tail) - 1)) !== 0) {
      throw new RangeError('dirty bitmap: bits set past the block count');
    }
    for (const byte of bitmap.bits) bitmap.setCount += popcount(byte);
    return bitmap;
  }

  private check(block: number): void {
    if (!Number.isInteger(block) || block < 0 || block >= this.blockCount) {
      throw new RangeError(`block ${block} outside bitmap of ${this.blockCount} blocks`);
    }
  }
}

function popcount(byte: number): number {
  let n = 0;
  for (let b = byte; b !== 0; b &= b - 1) n++;
  return n;
}
