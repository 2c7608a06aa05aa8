import { mkdir, mkdtemp, rm, unlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { NbdDevicePool } from './nbd-device-pool.js';

// A fake /sys tree with the files the kernel's nbd driver exposes, so the release rules can be
// checked on a machine without the module.
let sysfs: string;
async function device(index: number, files: { pid?: string; size?: string; inflight?: string; holders?: string[] }) {
  const dir = join(sysfs, 'block', `nbd${index}`);
  await rm(dir, { recursive: true, force: true });
  await mkdir(join(dir, 'holders'), { recursive: true });
  await writeFile(join(dir, 'size'), (files.size ?? '0') + '\n');
  await writeFile(join(dir, 'inflight'), (files.inflight ?? '       0        0') + '\n');
  if (files.pid) await writeFile(join(dir, 'pid'), files.pid + '\n');
  for (const h of files.holders ?? []) await writeFile(join(dir, 'holders', h), '');
}

beforeEach(async () => {
  sysfs = await mkdtemp(join(tmpdir(), 'fake-sysfs-'));
  await mkdir(join(sysfs, 'module/nbd/parameters'), { recursive: true });
  await writeFile(join(sysfs, 'module/nbd/parameters/nbds_max'), '5\n');
});
afterEach(async () => {
  await rm(sysfs, { recursive: true, force: true });
});

describe('NbdDevicePool release check', () => {
  it('never hands out a device with a pid, a size, requests in flight or holders', async () => {
    await device(0, { pid: '1234' });
    await device(1, { size: '2097152' });
    await device(2, { inflight: '       0        3' });
    await device(3, { holders: ['dm-0'] });
    await device(4, {});
    const pool = await NbdDevicePool.open({ sysfs });
    expect(pool.maxDevices).toBe(5);
    expect(await pool.busyReason(0)).toMatch(/pid 1234/);
    expect(await pool.busyReason(1)).toMatch(/size/);
    expect(await pool.busyReason(2)).toMatch(/in flight/);
    expect(await pool.busyReason(3)).toMatch(/dm-0/);
    expect(await pool.acquire()).toBe(4);
    await expect(pool.acquire()).rejects.toMatchObject({ code: 'NO_FREE_NBD_DEVICE' });
  });

  it('concurrent acquires get different devices; a netlink-connected device is busy', async () => {
    for (let i = 0; i < 5; i++) await device(i, {});
    const pool = await NbdDevicePool.open({ sysfs, connected: (i) => i === 0 });
    const got = await Promise.all([pool.acquire(), pool.acquire(), pool.acquire()]);
    expect(new Set(got).size).toBe(3);
    expect(got).not.toContain(0);
  });

  it('release refuses while the kernel still uses the device and succeeds once it is drained', async () => {
    await device(0, {});
    const pool = await NbdDevicePool.open({ sysfs });
    expect(await pool.acquire()).toBe(0);
    await device(0, { pid: '99', size: '8' }); // attached and serving
    await expect(pool.release(0)).rejects.toMatchObject({ code: 'NBD_DEVICE_IN_USE', index: 0 });
    expect(pool.inUse).toEqual([0]);
    const released = pool.waitAndRelease(0, 5000, 5);
    await unlink(join(sysfs, 'block/nbd0/pid'));
    await writeFile(join(sysfs, 'block/nbd0/size'), '0\n');
    await released;
    expect(pool.inUse).toEqual([]);
  });
});
