import { describe, expect, it } from 'vitest';
import { NIL_UUID } from './build-id.js';
import type { Header } from './header-codec.js';
import { LayeredFile } from './layered-file.js';
import { MemoryBlocks } from './memory-blocks.js';
import { StorageClosed } from './storage-errors.js';

const A = 'aaaaaaaa-0000-4000-8000-000000000001';
const B = 'bbbbbbbb-0000-4000-8000-000000000002';

const header: Header = {
  metadata: { version: 1, blockSize: 512, size: 2048, generation: 1, buildId: B, baseBuildId: A },
  mappings: [
    { offset: 0, length: 512, buildId: A, buildStorageOffset: 0 },
    { offset: 512, length: 512, buildId: B, buildStorageOffset: 0 },
    { offset: 1024, length: 512, buildId: NIL_UUID, buildStorageOffset: 0 },
    { offset: 1536, length: 512, buildId: A, buildStorageOffset: 1536 },
  ],
};

function sources(): Map<string, MemoryBlocks> {
  return new Map([
    [A, new MemoryBlocks(Buffer.alloc(2048, 0xaa))],
    [B, new MemoryBlocks(Buffer.alloc(512, 0xbb))],
  ]);
}

describe('LayeredFile', () => {
  it('splits a read across mappings, zero-fills the nil UUID and never returns short', async () => {
    const files = sources();
    const file = new LayeredFile({ header, resolve: (id) => files.get(id)! });
    const out = Buffer.alloc(1400, 0x11);
    await file.readAt(out, 300);
    expect(out.subarray(0, 212).every((b) => b === 0xaa)).toBe(true);
    expect(out.subarray(212, 724).every((b) => b === 0xbb)).toBe(true);
    expect(out.subarray(724, 1236).every((b) => b === 0)).toBe(true);
    expect(out.subarray(1236).every((b) => b === 0xaa)).toBe(true);
  });

  it('reports the spans a range maps to', () => {
    const file = new LayeredFile({ header, resolve: () => new MemoryBlocks(0) });
    expect(file.readSpans(500, 1100)).toEqual([
      { offset: 500, length: 12, buildId: A, storageOffset: 500, zero: false },
      { offset: 512, length: 512, buildId: B, storageOffset: 0, zero: false },
      { offset: 1024, length: 512, buildId: NIL_UUID, storageOffset: 0, zero: true },
      { offset: 1536, length: 64, buildId: A, storageOffset: 1536, zero: false },
    ]);
  });

  it('rejects reads past the size and after close', async () => {
    const files = sources();
    const file = new LayeredFile({ header, resolve: (id) => files.get(id)! });
    await expect(file.readAt(Buffer.alloc(2), 2047)).rejects.toThrow(RangeError);
    await file.close();
    await expect(file.readAt(Buffer.alloc(2), 0)).rejects.toThrow(StorageClosed);
  });

  it('resolves a source again when the build cache closed it between resolve and read', async () => {
    const files = sources();
    const stale = new MemoryBlocks(Buffer.alloc(2048, 0xaa));
    await stale.close();
    let calls = 0;
    const file = new LayeredFile({ header, resolve: (id) => (id === A && calls++ === 0 ? stale : files.get(id)!) });
    const out = Buffer.alloc(512);
    await file.readAt(out, 0);
    expect(out.every((b) => b === 0xaa)).toBe(true);
    expect(calls).toBe(2);
  });

  it('refuses a header whose mappings break DESIGN §2', () => {
    const broken = structuredClone(header);
    broken.mappings.pop();
    expect(() => new LayeredFile({ header: broken, resolve: () => new MemoryBlocks(0) })).toThrow(/cover \[0, 1536\)/);
  });
});
