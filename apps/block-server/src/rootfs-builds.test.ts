import { randomBytes } from 'node:crypto';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { baseMappings, createMappings, encodeHeader, mergeMappings, newBuildId } from '#storage';
import { CowOverlay } from './cow-overlay.js';
import { RootfsBuilds } from './rootfs-builds.js';

const BS = 4096;
const SIZE = 10 * 1024 * 1024; // more than two 4 MiB chunks
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'rootfs-builds-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A base build and a child whose diff replaces blocks 3..5 and 1500, as a pause would. */
async function makeBuilds(bucket: string) {
  const baseId = newBuildId();
  const childId = newBuildId();
  const base = randomBytes(SIZE);
  const diff = randomBytes(4 * BS);
  await mkdir(join(bucket, baseId), { recursive: true });
  await writeFile(join(bucket, baseId, 'rootfs.ext4'), base);
  await mkdir(join(bucket, childId), { recursive: true });
  await writeFile(join(bucket, childId, 'rootfs.ext4'), diff);
  const mappings = mergeMappings(baseMappings(SIZE, baseId), createMappings([3, 4, 5, 1500], BS, childId, SIZE));
  await writeFile(
    join(bucket, childId, 'rootfs.ext4.header'),
    encodeHeader({
      metadata: { version: 3, blockSize: BS, size: SIZE, generation: 1, buildId: childId, baseBuildId: baseId },
      mappings,
    }),
  );
  const expected = Buffer.from(base);
  diff.copy(expected, 3 * BS, 0, 3 * BS);
  diff.copy(expected, 1500 * BS, 3 * BS, 4 * BS);
  return { childId, expected };
}

describe('RootfsBuilds: source → (chunk cache) → layered build → overlay', () => {
  for (const readInPlace of [true, false]) {
    it(`reads a two-layer build ${readInPlace ? 'in place' : 'through the chunk cache'}, under an overlay`, async () => {
      const bucket = join(dir, 'bucket');
      const { childId, expected } = await makeBuilds(bucket);
      const builds = new RootfsBuilds({ bucket, readInPlace, cacheDir: join(dir, 'cache') });
      const rootfs = await builds.open(childId);
      expect(rootfs.blocks.size).toBe(SIZE);
      const overlay = await CowOverlay.open({ base: rootfs.blocks, dir: join(dir, 'overlay') });
      await overlay.writeAt(Buffer.alloc(100, 9), 4 * BS + 50);
      expected.fill(9, 4 * BS + 50, 4 * BS + 150);
      // Concurrent readers over chunk boundaries.
      const parts = await Promise.all(
        Array.from({ length: 5 }, async (_, i) => {
          const part = Buffer.alloc(SIZE / 5);
          await overlay.readAt(part, (i * SIZE) / 5);
          return part;
        }),
      );
      expect(Buffer.concat(parts).equals(expected)).toBe(true);
      await overlay.remove();
      await rootfs.release();
      await builds.close();
    });
  }

  it('an unknown build is BuildNotFound', async () => {
    const builds = new RootfsBuilds({ bucket: join(dir, 'empty') });
    await expect(builds.open(newBuildId())).rejects.toMatchObject({ code: 'BUILD_NOT_FOUND' });
    await builds.close();
  });
});
