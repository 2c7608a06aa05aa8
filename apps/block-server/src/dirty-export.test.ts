import { randomBytes } from 'node:crypto';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
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
    expect(result).toEqual({ mappings: [], diffSize: 0, storedBlocks: 0, zeroBlocks: 0 });
    await device.close();
  });
});
