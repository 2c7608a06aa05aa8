import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { newBuildId } from '#storage';
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
