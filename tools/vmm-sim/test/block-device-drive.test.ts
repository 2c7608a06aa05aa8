import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { httpBytes, httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// The drive as a real block device, the path Firecracker takes with /dev/nbdX where the kernel
// has NBD. This machine has no NBD module, so a loop device over an image file stands in; the
// test attaches it and detaches it again.

const dir = mkdtempSync(join(tmpdir(), 'vmm-sim-blockdev-'));
let loop: string | undefined;
let canLoop = true;
try {
  execFileSync('losetup', ['--version']);
} catch {
  canLoop = false;
  console.warn('vmm-sim block-device test skipped: losetup is not available');
}

afterAll(() => {
  if (loop) execFileSync('losetup', ['-d', loop]);
  rmSync(dir, { recursive: true, force: true });
});

describe('drive on a block device', () => {
  it.skipIf(!canLoop)('reads and writes the device, sized from sysfs, and flushes it', async () => {
    const image = join(dir, 'disk.img');
    const original = randomBytes(16 * 1024 * 1024);
    writeFileSync(image, original);
    loop = execFileSync('losetup', ['--find', '--show', image], { encoding: 'utf8' }).trim();
    writeFileSync(join(dir, 'vmlinux'), 'no kernel');
    const port = pickGuestPort();
    const vmm = await VmmSimProcess.start(join(dir, 'fc.sock'), ['--guest-listen', `127.0.0.1:${port}`]);
    try {
      await vmm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
      await vmm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 8 });
      await vmm.ok('PUT', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: loop, is_root_device: true });
      await vmm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
      const guest = { host: '127.0.0.1', port };
      expect(
        (await httpBytes(guest.host, guest.port, '/_test/disk/read?offset=4096&length=4096')).equals(
          original.subarray(4096, 8192),
        ),
      ).toBe(true);
      const data = randomBytes(8192);
      expect(
        (
          await httpRequest(guest, 'POST', '/_test/disk/write', {
            offset: 1 << 20,
            dataBase64: data.toString('base64'),
          })
        ).status,
      ).toBe(204);
      // Past the end of the 16 MiB device: the size came from the device, not from stat.
      expect((await httpRequest(guest, 'GET', `/_test/disk/read?offset=${16 << 20}&length=1`)).status).toBe(400);
      await vmm.ok('PATCH', '/vm', { state: 'Paused' });
      expect(await vmm.stop()).toBe(0);
      execFileSync('losetup', ['-d', loop]);
      loop = undefined;
      const after = readFileSync(image);
      expect(after.subarray(1 << 20, (1 << 20) + 8192).equals(data)).toBe(true);
      expect(after.subarray(0, 1 << 20).equals(original.subarray(0, 1 << 20))).toBe(true);
    } finally {
      await vmm.stop('SIGKILL');
    }
  });
});
