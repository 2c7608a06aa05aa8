import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { openFds } from '#test-kit';
import {
  BuildStore,
  baseMappings,
  encodeHeader,
  mergeMappings,
  newBuildId,
  validateMappings,
  type BuildMapping,
} from '#storage';
import { DeviceManager } from './device-manager.js';

const run = promisify(execFile);
const logger = createLogger({ service: 'block-server-test', level: 'silent' });
const SIZE = 4 * 1024 * 1024;
let dir: string;
let image: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'device-manager-'));
  image = join(dir, 'base.img');
  await writeFile(image, randomBytes(SIZE));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

function manager(): DeviceManager {
  return new DeviceManager({ dataDir: join(dir, 'data'), nbdDir: join(dir, 'nbd'), logger, releaseTimeoutMs: 1000 });
}

describe('DeviceManager over a local image', () => {
  it('opens, survives a shutdown/restore, exports and removes everything', async () => {
    const first = manager();
    const device = await first.open({ sandboxId: 'dm-1', basePath: image, exportName: 'disk' });
    const uri = `nbd+unix:///disk?socket=${device.record.socketPath}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x7e 4096 8192', '-c', 'flush', uri]);
    await first.shutdown();
    expect(existsSync(device.record.socketPath)).toBe(false);

    const second = manager();
    expect((await second.restore()).reopened).toEqual(['dm-1']);
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x7e 4096 8192', uri]);
    const diffPath = join(dir, 'diff', 'rootfs.ext4');
    const result = await second.export('dm-1', newBuildId(), diffPath);
    expect(result.storedBlocks).toBe(2);
    expect((await readFile(diffPath)).equals(Buffer.alloc(8192, 0x7e))).toBe(true);
    expect(second.list()).toEqual([]);
    expect(existsSync(join(dir, 'data', 'devices', 'dm-1'))).toBe(false);
    await second.shutdown();
  });

  it('refuses relative base paths, unsafe ids and a second open of one sandbox', async () => {
    const m = manager();
    await expect(m.open({ sandboxId: 'a', basePath: 'base.img' })).rejects.toMatchObject({
      code: 'REQUEST_INVALID',
    });
    await expect(m.open({ sandboxId: 'a/b', basePath: image })).rejects.toMatchObject({
      code: 'REQUEST_INVALID',
    });
    await expect(m.open({ sandboxId: 'a', buildId: newBuildId() })).rejects.toMatchObject({ field: 'build_id' });
    await m.open({ sandboxId: 'a', basePath: image });
    await expect(m.open({ sandboxId: 'a', basePath: image })).rejects.toMatchObject({ code: 'DEVICE_EXISTS' });
    await m.close('a');
    await expect(m.close('a')).rejects.toMatchObject({ code: 'DEVICE_NOT_FOUND' });
    await m.shutdown();
  });
});

describe('checkpoint and pause exports over local builds', () => {
  const BS = 4096;
  let cacheDir: string;
  let baseId: string;
  let baseBytes: Buffer;

  beforeEach(async () => {
    cacheDir = join(dir, 'cache');
    baseId = newBuildId();
    baseBytes = randomBytes(SIZE);
    await mkdir(join(cacheDir, 'builds', baseId), { recursive: true });
    await writeFile(join(cacheDir, 'builds', baseId, 'rootfs.ext4'), baseBytes);
  });

  function buildManager(): DeviceManager {
    return new DeviceManager({
      dataDir: join(dir, 'data'),
      nbdDir: join(dir, 'nbd'),
      builds: new BuildStore({ cacheDir, owner: 'block-server' }),
      logger,
      releaseTimeoutMs: 1000,
    });
  }

  /** Commits an exported diff as a local build the way the orchestrator does: diff + merged header. */
  async function commit(id: string, parentMappings: BuildMapping[], diffMappings: BuildMapping[]) {
    const mappings = mergeMappings(parentMappings, diffMappings);
    validateMappings(mappings, SIZE, BS);
    const header = {
      metadata: { version: 3, blockSize: BS, size: SIZE, generation: 1, buildId: id, baseBuildId: baseId },
      mappings,
    };
    await writeFile(join(cacheDir, 'builds', id, 'rootfs.ext4.header'), encodeHeader(header));
    return mappings;
  }

  const fill = (blocks: number, byte: number) => Buffer.alloc(blocks * BS, byte);
  const blocksOf = (mappings: BuildMapping[]) =>
    mappings.flatMap((m) => Array.from({ length: m.length / BS }, (_, i) => m.offset / BS + i));

  it('a checkpoint restarts disk tracking: the next pause holds only later blocks, deduplicated against the checkpoint, and reads back byte-exact', async () => {
    const m = buildManager();
    const device = await m.open({ sandboxId: 'cp-1', buildId: baseId });
    await device.overlay.writeAt(fill(10, 0x11), 0); // 0..9
    await device.overlay.writeAt(fill(10, 0x22), 20 * BS); // 20..29
    await device.overlay.writeAt(Buffer.from(baseBytes.subarray(60 * BS, 62 * BS)), 60 * BS); // identical to the base

    const cpId = newBuildId();
    const cp = await m.export('cp-1', cpId, join(cacheDir, 'builds', cpId, 'rootfs.ext4'), {
      keepServing: true,
      parentBuildId: baseId,
      dedup: true,
    });
    expect(cp).toMatchObject({ storedBlocks: 20, dedupedBlocks: 2, zeroBlocks: 0 });
    const cpMappings = await commit(cpId, baseMappings(SIZE, baseId), cp.mappings);
    expect(device.checkpointBuildId).toBe(cpId);

    // After the checkpoint: new blocks, blocks 0..4 rewritten as the checkpoint holds them (but not
    // as the base does), 20..21 written back to the base's bytes (which the checkpoint does not hold).
    await device.overlay.writeAt(fill(5, 0x33), 40 * BS); // 40..44
    await device.overlay.writeAt(fill(5, 0x11), 0); // 0..4
    await device.overlay.writeAt(Buffer.from(baseBytes.subarray(20 * BS, 22 * BS)), 20 * BS);
    await device.overlay.zeroAt(50 * BS, BS);
    const expected = Buffer.alloc(SIZE);
    await device.overlay.readAt(expected, 0);

    const pauseId = newBuildId();
    await mkdir(join(cacheDir, 'builds', pauseId));
    const paused = await m.export('cp-1', pauseId, join(cacheDir, 'builds', pauseId, 'rootfs.ext4'), {
      parentBuildId: cpId,
      dedup: true,
    });
    // Only blocks written after the checkpoint; 5..9 and 22..29 (before it) are not exported again.
    expect(paused).toMatchObject({ storedBlocks: 7, dedupedBlocks: 5, zeroBlocks: 1, diffSize: 7 * BS });
    expect(blocksOf(paused.mappings)).toEqual([20, 21, 40, 41, 42, 43, 44, 50]);
    await commit(pauseId, cpMappings, paused.mappings);
    await m.shutdown();

    // Read back through the layered stack: the new build over the checkpoint over the base.
    const store = new BuildStore({ cacheDir, owner: 'reader' });
    const { file } = await store.openBuildFile(pauseId, 'rootfs.ext4');
    const readBack = Buffer.alloc(SIZE);
    await file.readAt(readBack, 0);
    expect(readBack.equals(expected)).toBe(true);
    // The deduplicated blocks still point at the checkpoint's layer.
    expect(file.readSpans(0, 5 * BS).map((s) => s.buildId)).toEqual([cpId]);
    await file.close();
    await store.close();
    expect(openFds(process.pid).filter((t) => t.startsWith(`${dir}/`))).toEqual([]);
  });

  it('over a parent that is not the last checkpoint (its commit failed) the export holds every change since open', async () => {
    const m = buildManager();
    const device = await m.open({ sandboxId: 'cp-2', buildId: baseId });
    await device.overlay.writeAt(fill(4, 0x44), 0); // 0..3
    const cpId = newBuildId();
    await m.export('cp-2', cpId, join(dir, 'cp', 'rootfs.ext4'), { keepServing: true, parentBuildId: baseId });
    await device.overlay.writeAt(fill(1, 0x55), 8 * BS);
    // Without a named parent, dedup against the opened build could be wrong now: refused.
    await expect(m.export('cp-2', newBuildId(), join(dir, 'x', 'rootfs.ext4'), { dedup: true })).rejects.toMatchObject({
      code: 'REQUEST_INVALID',
      field: 'parent_build_id',
    });
    // The orchestrator still merges over the base (the checkpoint was never committed).
    const again = await m.export('cp-2', newBuildId(), join(dir, 'p', 'rootfs.ext4'), { parentBuildId: baseId });
    expect(blocksOf(again.mappings)).toEqual([0, 1, 2, 3, 8]);
    await m.shutdown();
  });

  it('a block-server restart keeps the checkpoint and what changed since: the export over it holds only those, exact', async () => {
    const first = buildManager();
    const device = await first.open({ sandboxId: 'cp-4', buildId: baseId });
    await device.overlay.writeAt(fill(6, 0x66), 10 * BS); // 10..15, before the checkpoint
    const cpId = newBuildId();
    const cp = await first.export('cp-4', cpId, join(cacheDir, 'builds', cpId, 'rootfs.ext4'), {
      keepServing: true,
      parentBuildId: baseId,
      dedup: true,
    });
    const cpMappings = await commit(cpId, baseMappings(SIZE, baseId), cp.mappings);
    await device.overlay.writeAt(fill(1, 0x77), 30 * BS);
    await device.overlay.flush();
    await first.shutdown();

    const second = buildManager();
    expect((await second.restore()).reopened).toEqual(['cp-4']);
    const pauseId = newBuildId();
    const paused = await second.export('cp-4', pauseId, join(cacheDir, 'builds', pauseId, 'rootfs.ext4'), {
      parentBuildId: cpId,
      dedup: true,
    });
    // 10..15 (before the checkpoint) are not exported again.
    expect(paused).toMatchObject({ storedBlocks: 1, dedupedBlocks: 0, diffSize: BS });
    expect(blocksOf(paused.mappings)).toEqual([30]);
    await commit(pauseId, cpMappings, paused.mappings);
    await second.shutdown();
    const store = new BuildStore({ cacheDir, owner: 'reader' });
    const { file } = await store.openBuildFile(pauseId, 'rootfs.ext4');
    const expected = Buffer.from(baseBytes);
    expected.fill(0x66, 10 * BS, 16 * BS);
    expected.fill(0x77, 30 * BS, 31 * BS);
    const readBack = Buffer.alloc(SIZE);
    await file.readAt(readBack, 0);
    expect(readBack.equals(expected)).toBe(true);
    await file.close();
    await store.close();
  });

  it('a parent build that cannot be read: exported without dedup, still complete', async () => {
    const m = buildManager();
    const device = await m.open({ sandboxId: 'cp-3', buildId: baseId });
    await device.overlay.writeAt(Buffer.from(baseBytes.subarray(0, 2 * BS)), 0);
    const result = await m.export('cp-3', newBuildId(), join(dir, 'p', 'rootfs.ext4'), {
      parentBuildId: newBuildId(),
      dedup: true,
    });
    expect(result).toMatchObject({ storedBlocks: 2, dedupedBlocks: 0 });
    await m.shutdown();
    expect(openFds(process.pid).filter((t) => t.startsWith(`${dir}/`))).toEqual([]);
  });
});
