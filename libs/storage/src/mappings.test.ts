import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { NIL_UUID } from './build-id.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { decodeHeader, encodeHeader } from './header-codec.js';
import { LayeredFile } from './layered-file.js';
import {
  baseMappings,
  type BuildMapping,
  createMappings,
  mergeMappings,
  normalizeMappings,
  validateMappings,
} from './mappings.js';
import { MemoryBlocks } from './memory-blocks.js';
import { HeaderInvalid } from './storage-errors.js';

const A = 'aaaaaaaa-0000-4000-8000-000000000001';
const B = 'bbbbbbbb-0000-4000-8000-000000000002';
const C = 'cccccccc-0000-4000-8000-000000000003';

describe('createMappings', () => {
  it('joins consecutive dirty blocks and places them at their position in the diff file', () => {
    expect(createMappings([1, 2, 3, 7, 9, 10], 4096, B)).toEqual([
      { offset: 4096, length: 3 * 4096, buildId: B, buildStorageOffset: 0 },
      { offset: 7 * 4096, length: 4096, buildId: B, buildStorageOffset: 3 * 4096 },
      { offset: 9 * 4096, length: 2 * 4096, buildId: B, buildStorageOffset: 4 * 4096 },
    ]);
  });

  it('takes a DirtyBitmap and cuts the last block at a size that is not block-aligned', () => {
    const dirty = new DirtyBitmap(3);
    dirty.set(2);
    dirty.set(1);
    expect(createMappings(dirty, 512, B, 1300)).toEqual([
      { offset: 512, length: 788, buildId: B, buildStorageOffset: 0 },
    ]);
  });

  it('rejects unsorted, repeated and out-of-range blocks', () => {
    expect(() => createMappings([3, 1], 4096, B)).toThrow(/ascend/);
    expect(() => createMappings([1, 1], 4096, B)).toThrow(/ascend/);
    expect(() => createMappings([4], 4096, B, 4 * 4096)).toThrow(/past the end/);
    expect(() => createMappings([1], 4096, 'not-a-uuid')).toThrow(/not a UUID/);
  });
});

describe('mergeMappings', () => {
  it('splits the parent around the diff and shifts the storage offsets of the tail', () => {
    const parent = baseMappings(8 * 4096, A);
    const diff = createMappings([2, 3], 4096, B);
    expect(mergeMappings(parent, diff)).toEqual([
      { offset: 0, length: 2 * 4096, buildId: A, buildStorageOffset: 0 },
      { offset: 2 * 4096, length: 2 * 4096, buildId: B, buildStorageOffset: 0 },
      { offset: 4 * 4096, length: 4 * 4096, buildId: A, buildStorageOffset: 4 * 4096 },
    ]);
  });

  it('lets a later diff cover several parent mappings and join with its own neighbour', () => {
    const g1 = mergeMappings(baseMappings(8 * 4096, A), createMappings([1, 3, 5], 4096, B));
    const g2 = mergeMappings(g1, createMappings([0, 1, 2, 3, 4], 4096, C));
    expect(g2).toEqual([
      { offset: 0, length: 5 * 4096, buildId: C, buildStorageOffset: 0 },
      { offset: 5 * 4096, length: 4096, buildId: B, buildStorageOffset: 2 * 4096 },
      { offset: 6 * 4096, length: 2 * 4096, buildId: A, buildStorageOffset: 6 * 4096 },
    ]);
    validateMappings(g2, 8 * 4096, 4096);
  });

  it('joins only what is contiguous in storage too', () => {
    expect(
      normalizeMappings([
        { offset: 0, length: 4096, buildId: B, buildStorageOffset: 4096 },
        { offset: 4096, length: 4096, buildId: B, buildStorageOffset: 0 },
        { offset: 8192, length: 4096, buildId: NIL_UUID, buildStorageOffset: 0 },
        { offset: 12288, length: 4096, buildId: NIL_UUID, buildStorageOffset: 4096 },
      ]),
    ).toEqual([
      { offset: 0, length: 4096, buildId: B, buildStorageOffset: 4096 },
      { offset: 4096, length: 4096, buildId: B, buildStorageOffset: 0 },
      { offset: 8192, length: 8192, buildId: NIL_UUID, buildStorageOffset: 0 },
    ]);
  });
});

describe('validateMappings', () => {
  it('names the mapping and offset at fault', () => {
    const m: BuildMapping[] = [
      { offset: 0, length: 4096, buildId: A, buildStorageOffset: 0 },
      { offset: 8192, length: 4096, buildId: A, buildStorageOffset: 8192 },
    ];
    try {
      validateMappings(m, 12288, 4096);
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(HeaderInvalid);
      expect((err as HeaderInvalid).mappingIndex).toBe(1);
      expect((err as HeaderInvalid).offset).toBe(8192);
      expect((err as HeaderInvalid).message).toMatch(/gap: \[4096, 8192\)/);
    }
  });
});

/**
 * One pause: some blocks rewritten with data (stored in the new build's diff file), some
 * zeroed (mapped to the nil UUID, as the uffd-server does for zero pages).
 */
interface Pause {
  writes: Map<number, number>; // block -> seed of its new data
  zeros: Set<number>;
}

function blockData(seed: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    out[i] = (x >>> 16) & 0xff || 1;
  }
  return out;
}

const arbChain = fc
  .record({ blocks: fc.integer({ min: 1, max: 48 }), tail: fc.integer({ min: 0, max: 511 }) })
  .chain(({ blocks, tail }) =>
    fc.record({
      blocks: fc.constant(blocks),
      tail: fc.constant(blocks > 1 ? tail : 0),
      pauses: fc.array(
        fc.record({
          writes: fc.uniqueArray(fc.tuple(fc.nat(blocks - 1), fc.nat()), { selector: (t) => t[0], maxLength: blocks }),
          zeros: fc.uniqueArray(fc.nat(blocks - 1), { maxLength: Math.ceil(blocks / 3) }),
        }),
        { minLength: 1, maxLength: 8 },
      ),
      reads: fc.array(fc.tuple(fc.nat(), fc.nat()), { maxLength: 6 }),
    }),
  );

describe('pause chains (property)', () => {
  it('reading the merged layered file equals applying the same writes to a flat copy', async () => {
    const blockSize = 512;
    await fc.assert(
      fc.asyncProperty(arbChain, async ({ blocks, tail, pauses, reads }) => {
        const size = blocks * blockSize - tail;
        const baseId = crypto.randomUUID();
        const flat = blockData(7, size);
        const files = new Map<string, MemoryBlocks>([[baseId, new MemoryBlocks(flat)]]);
        let mappings = baseMappings(size, baseId);
        let generation = 0;
        for (const raw of pauses) {
          const pause: Pause = { writes: new Map(raw.writes), zeros: new Set(raw.zeros) };
          for (const z of pause.zeros) pause.writes.delete(z);
          const id = crypto.randomUUID();
          const dirty = [...pause.writes.keys()].sort((a, b) => a - b);
          const pieces: Buffer[] = [];
          for (const b of dirty) {
            const len = Math.min(blockSize, size - b * blockSize);
            const data = blockData(pause.writes.get(b)!, len);
            data.copy(flat, b * blockSize);
            pieces.push(data);
          }
          for (const z of pause.zeros) flat.fill(0, z * blockSize, Math.min(size, (z + 1) * blockSize));
          files.set(id, new MemoryBlocks(Buffer.concat(pieces)));
          const zeroMappings = createMappings(
            [...pause.zeros].sort((a, b) => a - b),
            blockSize,
            NIL_UUID,
            size,
          );
          const diff = mergeMappings(zeroMappings, createMappings(dirty, blockSize, id, size));
          mappings = mergeMappings(mappings, diff);
          generation++;
          validateMappings(mappings, size, blockSize);
          const header = decodeHeader(
            encodeHeader({
              metadata: { version: 3, blockSize, size, generation, buildId: id, baseBuildId: baseId },
              mappings,
            }),
          );
          const file = new LayeredFile({
            header,
            resolve: (buildId) => {
              const f = files.get(buildId);
              if (f === undefined) throw new Error(`unknown build ${buildId}`);
              return f;
            },
          });
          const whole = Buffer.alloc(size);
          await file.readAt(whole, 0);
          expect(whole.equals(flat)).toBe(true);
          for (const [a, b] of reads) {
            const offset = a % size;
            const length = b % (size - offset + 1);
            const part = Buffer.alloc(length, 0xee);
            await file.readAt(part, offset);
            expect(part.equals(flat.subarray(offset, offset + length))).toBe(true);
          }
          await file.close();
        }
      }),
      { numRuns: 150 },
    );
  });
});
