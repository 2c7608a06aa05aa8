import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { BuildStore, createMappings, LocalBackend, mergeMappings, newBuildId, baseHeader } from '#storage';
import { CowOverlay } from './cow-overlay.js';

const BS = 4096;
const SIZE = 10 * 1024 * 1024; // more than two 4 MiB chunks
let dir: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'build-rootfs-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('a build rootfs under an overlay: bucket → build store → layered file → overlay', () => {
  it('reads a base from the bucket and a child paused on this node that is in no bucket yet', async () => {
    const bucket = new LocalBackend(join(dir, 'bucket'));
    const baseId = newBuildId();
    const base = randomBytes(SIZE);
    await bucket.write(`${baseId}/rootfs.ext4`, base);
    // The orchestrator's store writes the child into {cacheDir}/builds; block-server's reads it.
    const orchestrator = new BuildStore({ backend: bucket, cacheDir: join(dir, 'cache'), owner: 'orchestrator' });
    const childId = newBuildId();
    const diff = randomBytes(4 * BS);
    await writeFile(join(await orchestrator.stageBuild(childId), 'rootfs.ext4'), diff);
    const header = baseHeader(baseId, SIZE, BS);
    await orchestrator.commitBuild(childId, {
      'rootfs.ext4': {
        metadata: { ...header.metadata, generation: 1, buildId: childId },
        mappings: mergeMappings(header.mappings, createMappings([3, 4, 5, 1500], BS, childId, SIZE)),
      },
    });
    const expected = Buffer.from(base);
    diff.copy(expected, 3 * BS, 0, 3 * BS);
    diff.copy(expected, 1500 * BS, 3 * BS, 4 * BS);

    const builds = new BuildStore({ backend: bucket, cacheDir: join(dir, 'cache'), owner: 'block-server' });
    const { file } = await builds.openBuildFile(childId, 'rootfs.ext4');
    const overlay = await CowOverlay.open({ base: file, dir: join(dir, 'overlay') });
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
    await builds.close();
    await orchestrator.close();
  });

  it('an unknown build is BuildNotFound', async () => {
    const builds = new BuildStore({ backend: new LocalBackend(join(dir, 'empty')), cacheDir: dir, owner: 'b' });
    await expect(builds.openBuildFile(newBuildId(), 'rootfs.ext4')).rejects.toMatchObject({ code: 'BUILD_NOT_FOUND' });
    await builds.close();
  });
});
