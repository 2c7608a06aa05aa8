import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  DirtyBitmap,
  LayeredFile,
  MemoryBlocks,
  NIL_UUID,
  baseMappings,
  mergeMappings,
  newBuildId,
  validateMappings,
  type ReadableBlocks,
} from '#storage';
import { CowOverlay } from './cow-overlay.js';
import { exportDiff } from './dirty-export.js';
import { exportParent } from './export-parent.js';

const BS = 4096;
let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'dirty-export-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('exportDiff', () => {
  it('writes dirty blocks ascending, zero blocks as nil, and merges over the parent to the device contents', async () => {
    const size = 64 * BS;
    const parentId = newBuildId();
    const childId = newBuildId();
    const parentData = randomBytes(size);
    // The overlay's block maps are what the export reads (the only record of what changed).
    const device = await CowOverlay.open({ base: new MemoryBlocks(parentData), dir: join(dir, 'o'), blockSize: BS });
    await device.writeAt(Buffer.alloc(3 * BS, 9), 40 * BS); // 40..42
    await device.writeAt(randomBytes(100), 5 * BS + 7); // 5
    await device.writeAt(Buffer.alloc(BS), 20 * BS); // written, but all zeros → nil
    await device.zeroAt(30 * BS, 2 * BS); // 30, 31 → nil
    await device.writeAt(Buffer.alloc(BS, 1), 6 * BS); // 6, next to 5: one mapping

    const diffPath = join(dir, 'rootfs.ext4');
    const result = await exportDiff({
      source: device,
      buildId: childId,
      diffPath,
    });
    expect(result).toMatchObject({ storedBlocks: 5, zeroBlocks: 3, diffSize: 5 * BS });
    const diff = await readFile(diffPath);
    const final = Buffer.alloc(size);
    await device.readAt(final, 0);
    // Ascending order: 5, 6, 40, 41, 42.
    expect(diff.subarray(0, BS)).toEqual(final.subarray(5 * BS, 6 * BS));
    expect(diff.subarray(2 * BS)).toEqual(final.subarray(40 * BS, 43 * BS));
    expect(result.mappings.filter((m) => m.buildId === NIL_UUID).map((m) => [m.offset / BS, m.length / BS])).toEqual([
      [20, 1],
      [30, 2],
    ]);

    const merged = mergeMappings(baseMappings(size, parentId), result.mappings);
    validateMappings(merged, size, BS);
    const builds = new Map<string, ReadableBlocks>([
      [parentId, new MemoryBlocks(parentData)],
      [childId, new MemoryBlocks(diff)],
    ]);
    const layered = new LayeredFile({
      header: {
        metadata: { version: 3, blockSize: BS, size, generation: 1, buildId: childId, baseBuildId: parentId },
        mappings: merged,
      },
      resolve: (id) => builds.get(id)!,
    });
    const readBack = Buffer.alloc(size);
    await layered.readAt(readBack, 0);
    expect(readBack).toEqual(final);
    await device.close();
  });

  it('an untouched device exports an empty diff and no mappings', async () => {
    const device = await CowOverlay.open({ base: new MemoryBlocks(4 * BS), dir: join(dir, 'o') });
    const result = await exportDiff({
      source: device,
      buildId: newBuildId(),
      diffPath: join(dir, 'd'),
    });
    expect(result).toEqual({ mappings: [], diffSize: 0, storedBlocks: 0, zeroBlocks: 0, dedupedBlocks: 0 });
    await device.close();
  });

  it('with dedup, blocks rewritten identical are left to the parent layers, zeros stay nil, and the new build reads back byte-exact', async () => {
    const blocks = 512;
    const size = blocks * BS;
    // Two parent layers: G, a full image, and P over it (blocks 100..179 its own, 400.. nil).
    const gId = newBuildId();
    const pId = newBuildId();
    const childId = newBuildId();
    const gData = randomBytes(size);
    const pDiff = randomBytes(80 * BS);
    const pMappings = mergeMappings(baseMappings(size, gId), [
      { offset: 100 * BS, length: 80 * BS, buildId: pId, buildStorageOffset: 0 },
      { offset: 400 * BS, length: 112 * BS, buildId: NIL_UUID, buildStorageOffset: 0 },
    ]);
    const files = new Map<string, ReadableBlocks>([
      [gId, new MemoryBlocks(gData)],
      [pId, new MemoryBlocks(pDiff)],
    ]);
    const layered = (buildId: string, mappings: typeof pMappings): LayeredFile =>
      new LayeredFile({
        header: {
          metadata: { version: 3, blockSize: BS, size, generation: 1, buildId, baseBuildId: gId },
          mappings,
        },
        resolve: (id) => files.get(id)!,
      });
    const parent = layered(pId, pMappings);
    const parentBytes = Buffer.alloc(size);
    await parent.readAt(parentBytes, 0);

    // A seeded random workload over the device opened on P.
    let seed = 0x5eed;
    const random = (n: number): number => {
      seed = (seed * 1103515245 + 12345) & 0x7fffffff;
      return (seed >>> 16) % n;
    };
    const device = await CowOverlay.open({ base: parent, dir: join(dir, 'o'), blockSize: BS });
    const identical = new Set<number>();
    const changed = new Set<number>();
    const zeroed = new Set<number>();
    for (let b = 0; b < blocks; b++) {
      const at = b * BS;
      const own = parentBytes.subarray(at, at + BS);
      switch (random(6)) {
        case 0: // untouched
          break;
        case 1: // the guest writes the bytes already there, whole block or a piece of it
          if (random(2) === 0) await device.writeAt(Buffer.from(own), at);
          else await device.writeAt(Buffer.from(own.subarray(100, 300)), at + 100);
          (own.equals(Buffer.alloc(BS)) ? zeroed : identical).add(b);
          break;
        case 2:
          await device.zeroAt(at, BS);
          zeroed.add(b);
          break;
        case 3:
          await device.writeAt(Buffer.alloc(BS), at);
          zeroed.add(b);
          break;
        default: {
          const bytes = randomBytes(random(2) === 0 ? BS : 512);
          await device.writeAt(bytes, at + (bytes.length === BS ? 0 : 1024));
          changed.add(b);
        }
      }
    }
    // Blocks 400.. are nil in P: identical rewrites there are zeros (nil), never a compare.
    expect([...identical].some((b) => b >= 400)).toBe(false);
    expect(identical.size).toBeGreaterThan(40);
    expect(changed.size).toBeGreaterThan(40);
    const parentReads: Array<[number, number]> = [];
    const seen = exportParent(pId, parent);
    const result = await exportDiff({
      source: device,
      buildId: childId,
      diffPath: join(dir, 'dedup.diff'),
      parent: {
        ...seen,
        readAt: (t, o) => {
          parentReads.push([o, t.length]);
          return seen.readAt(t, o);
        },
      },
    });
    expect(result).toMatchObject({
      storedBlocks: changed.size,
      zeroBlocks: zeroed.size,
      dedupedBlocks: identical.size,
      diffSize: changed.size * BS,
    });
    // The parent is read once per run of consecutive written blocks at most, never over its nil range.
    const writtenRuns = [...device.written].filter((b) => b < 400 && !device.written.has(b - 1)).length;
    expect(parentReads.length).toBeLessThanOrEqual(writtenRuns);
    expect(parentReads.every(([o, n]) => o + n <= 400 * BS)).toBe(true);

    const diff = await readFile(join(dir, 'dedup.diff'));
    files.set(childId, new MemoryBlocks(diff));
    const merged = mergeMappings(pMappings, result.mappings);
    validateMappings(merged, size, BS);
    const child = layered(childId, merged);
    const expected = Buffer.alloc(size);
    await device.readAt(expected, 0);
    const readBack = Buffer.alloc(size);
    await child.readAt(readBack, 0);
    expect(readBack.equals(expected)).toBe(true);
    // Identical blocks keep the parent's layer (G or P) in the new header; changed ones are the child's.
    for (const b of identical) {
      const [span] = child.readSpans(b * BS, BS);
      expect(span!.buildId).toBe(b >= 100 && b < 180 ? pId : gId);
    }
    for (const b of changed) expect(child.readSpans(b * BS, BS)[0]!.buildId).toBe(childId);
    for (const b of zeroed) expect(child.readSpans(b * BS, BS)[0]!.zero).toBe(true);

    // The same export without dedup stores the identical blocks again.
    const plain = await exportDiff({ source: device, buildId: childId, diffPath: join(dir, 'plain.diff') });
    expect(plain.diffSize).toBe((changed.size + identical.size) * BS);
    await device.close();
  });

  it('only: exports just the given blocks (a checkpoint set), over the parent', async () => {
    const device = await CowOverlay.open({ base: new MemoryBlocks(randomBytes(16 * BS)), dir: join(dir, 'o') });
    await device.writeAt(Buffer.alloc(2 * BS, 1), 2 * BS); // 2, 3: before the checkpoint
    await device.writeAt(Buffer.alloc(BS, 2), 3 * BS); // 3 again, after it
    await device.zeroAt(9 * BS, BS);
    const only = new DirtyBitmap(16);
    for (const b of [3, 9, 12]) only.set(b); // 12: not changed at all, so not exported
    const result = await exportDiff({ source: device, buildId: newBuildId(), diffPath: join(dir, 'd'), only });
    expect(result).toMatchObject({ storedBlocks: 1, zeroBlocks: 1, diffSize: BS });
    expect(result.mappings.map((m) => [m.offset / BS, m.length / BS])).toEqual([
      [3, 1],
      [9, 1],
    ]);
    expect(await readFile(join(dir, 'd'))).toEqual(Buffer.alloc(BS, 2));
    await device.close();
  });
});
