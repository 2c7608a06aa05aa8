import { describe, expect, it } from 'vitest';
import { DirtyBitmap, MemoryBlocks } from '#storage';
import { DirtyTracker } from './dirty-tracker.js';

const BS = 4096;

describe('DirtyTracker over in-memory blocks', () => {
  it('records written blocks, whole-zeroed blocks and I/O counts, passing bytes through', async () => {
    const inner = new MemoryBlocks(10 * BS);
    const tracker = new DirtyTracker({ inner, blockSize: BS });
    await tracker.writeAt(Buffer.alloc(10, 1), BS - 5); // touches blocks 0 and 1
    await tracker.zeroAt(3 * BS, 2 * BS); // 3, 4 whole
    await tracker.zeroAt(6 * BS + 1, BS); // 6 and 7 in part
    await tracker.writeAt(Buffer.alloc(BS, 2), 4 * BS); // 4 zeroed → dirty
    const back = Buffer.alloc(BS);
    await tracker.readAt(back, 4 * BS);
    expect(back).toEqual(Buffer.alloc(BS, 2));
    expect([...tracker.dirty]).toEqual([0, 1, 4, 6, 7]);
    expect([...tracker.zeroed]).toEqual([3]);
    expect(tracker.stats()).toMatchObject({ reads: 1, writes: 2, zeroes: 2, bytesWritten: 10 + BS, bytesRead: BS });
    expect(inner.bytes().subarray(BS - 5, BS + 5)).toEqual(Buffer.alloc(10, 1));
  });

  it('starts from the sets of a reopened device', async () => {
    const dirty = new DirtyBitmap(4);
    dirty.set(2);
    const tracker = new DirtyTracker({ inner: new MemoryBlocks(4 * BS), blockSize: BS, dirty });
    await tracker.writeAt(Buffer.alloc(1), 0);
    expect([...tracker.dirty]).toEqual([0, 2]);
    expect([...dirty]).toEqual([2]);
  });

  it('does not mark a block when the write below fails', async () => {
    const tracker = new DirtyTracker({ inner: new MemoryBlocks(BS), blockSize: BS });
    await expect(tracker.writeAt(Buffer.alloc(2), BS - 1)).rejects.toThrow(RangeError);
    expect(tracker.dirty.count).toBe(0);
  });
});
