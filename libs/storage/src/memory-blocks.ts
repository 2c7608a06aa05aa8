import type { WritableBlocks } from './block-source.js';
import { StorageClosed } from './storage-errors.js';

/**
 * A file held in memory: the "memory plugin" each data-path layer is tested over, and the
 * source of small in-process builds.
 */
export class MemoryBlocks implements WritableBlocks {
  private data: Buffer;
  private closed = false;

  constructor(data: Uint8Array | number) {
    this.data = typeof data === 'number' ? Buffer.alloc(data) : Buffer.from(data);
  }

  get size(): number {
    return this.data.length;
  }

  /** The current contents (a copy). */
  bytes(): Buffer {
    return Buffer.from(this.data);
  }

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    this.check(offset, target.length);
    target.set(this.data.subarray(offset, offset + target.length));
  }

  async writeAt(source: Uint8Array, offset: number): Promise<void> {
    this.check(offset, source.length);
    this.data.set(source, offset);
  }

  async zeroAt(offset: number, length: number): Promise<void> {
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
  }

  async flush(): Promise<void> {
    if (this.closed) throw new StorageClosed('memory blocks');
  }

  async close(): Promise<void> {
    this.closed = true;
  }

  private check(offset: number, length: number): void {
    if (this.closed) throw new StorageClosed('memory blocks');
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.data.length) {
      throw new RangeError(`range [${offset}, ${offset + length}) outside memory blocks of ${this.data.length} bytes`);
    }
  }
}
