import { DirtyBitmap, type WritableBlocks } from '#storage';

export interface DirtyTrackerOptions {
  inner: WritableBlocks;
  blockSize: number;
  /** Blocks already changed before this tracker existed (a device reopened after a restart). */
  dirty?: DirtyBitmap;
  zeroed?: DirtyBitmap;
}

export interface DirtyTrackerStats {
  reads: number;
  writes: number;
  zeroes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
  dirtyBlocks: number;
  zeroedBlocks: number;
}

/**
 * Records which blocks changed since the device was opened over its build: `dirty` blocks
 * hold new bytes, `zeroed` blocks were trimmed or zero-written whole (exported as nil
 * mappings, nothing stored). Counts I/O for stats. Everything passes through to `inner`.
 */
export class DirtyTracker implements WritableBlocks {
  readonly dirty: DirtyBitmap;
  readonly zeroed: DirtyBitmap;
  private readonly inner: WritableBlocks;
  private readonly blockSize: number;
  private readonly counters = { reads: 0, writes: 0, zeroes: 0, flushes: 0, bytesRead: 0, bytesWritten: 0 };

  constructor(options: DirtyTrackerOptions) {
    this.inner = options.inner;
    this.blockSize = options.blockSize;
    const blocks = Math.ceil(options.inner.size / options.blockSize);
    this.dirty = options.dirty?.clone() ?? new DirtyBitmap(blocks);
    this.zeroed = options.zeroed?.clone() ?? new DirtyBitmap(blocks);
    if (this.dirty.blockCount !== blocks || this.zeroed.blockCount !== blocks) {
      throw new RangeError(`initial bitmaps must have ${blocks} blocks`);
    }
  }

  get size(): number {
    return this.inner.size;
  }

  /** Counted when issued (reads change nothing, so there is nothing to record on completion). */
  readAt(target: Uint8Array, offset: number): Promise<void> {
    this.counters.reads++;
    this.counters.bytesRead += target.length;
    return this.inner.readAt(target, offset);
  }

  async writeAt(source: Uint8Array, offset: number): Promise<void> {
    await this.inner.writeAt(source, offset);
    this.counters.writes++;
    this.counters.bytesWritten += source.length;
    if (source.length === 0) return;
    const first = Math.floor(offset / this.blockSize);
    const last = Math.floor((offset + source.length - 1) / this.blockSize);
    for (let b = first; b <= last; b++) {
      this.dirty.set(b);
      this.zeroed.clear(b);
    }
  }

  async zeroAt(offset: number, length: number): Promise<void> {
    await this.inner.zeroAt(offset, length);
    this.counters.zeroes++;
    if (length === 0) return;
    const bs = this.blockSize;
    const end = offset + length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    for (let b = first; b <= last; b++) {
      const whole = offset <= b * bs && (end >= (b + 1) * bs || end === this.size);
      if (whole) {
        this.zeroed.set(b);
        this.dirty.clear(b);
      } else {
        // Part of the block was zeroed, the rest keeps its bytes: the block must be stored.
        this.dirty.set(b);
        this.zeroed.clear(b);
      }
    }
  }

  async flush(): Promise<void> {
    await this.inner.flush();
    this.counters.flushes++;
  }

  close(): Promise<void> {
    return this.inner.close();
  }

  stats(): DirtyTrackerStats {
    return { ...this.counters, dirtyBlocks: this.dirty.count, zeroedBlocks: this.zeroed.count };
  }
}
