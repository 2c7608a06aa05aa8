import { createHash, randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeAll, afterAll, describe, expect, it } from 'vitest';
import { fileExists, ServiceProcess } from '#test-kit';
import { startNbdExport } from './peer-services.js';
import { httpBytes, httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// Must-show: the double against a running uffd-server and block-server, no orchestrator.
// A template is cold-booted from a rootfs image; a second VM loads it with its memory served
// page by page by `uffd-server serve-file` and its rootfs through `block-server serve` (NBD),
// writes known memory and disk data through the guest agent, snapshots; a third VM loads that
// snapshot (memory again through the uffd-server) and reads everything back byte for byte.

const MEM_MIB = 32;
const MEM = MEM_MIB * 1024 * 1024;
const DISK = 16 * 1024 * 1024;

let dir: string;
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-roundtrip-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  const rootfs = Buffer.alloc(DISK);
  randomBytes(1024 * 1024).copy(rootfs, 0);
  writeFileSync(join(dir, 'rootfs.ext4'), rootfs);
});

afterEach(async () => {
  for (const step of cleanup.splice(0).reverse()) await step().catch(() => undefined);
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function vmm(extra: string[] = []): Promise<{ vm: VmmSimProcess; guest: { host: string; port: number } }> {
  const guestPort = pickGuestPort();
  const vm = await VmmSimProcess.start(join(dir, `fc-${guestPort}.sock`), [
    '--guest-listen',
    `127.0.0.1:${guestPort}`,
    ...extra,
  ]);
  cleanup.push(() => vm.stop('SIGKILL'));
  return { vm, guest: { host: '127.0.0.1', port: guestPort } };
}

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

describe.each([
  { name: 'anonymous memory', flags: [] as string[] },
  { name: 'memfd shared with the uffd-server', flags: ['--share-memfd'] },
  { name: 'E2B-fork synchronous write-protect', flags: ['--e2b-fork-write-protect', 'sync'] },
])('memory and disk round trip through uffd-server and block-server ($name)', ({ name, flags }) => {
  it('reads back every byte written before the snapshot', async () => {
    const tag = name.split(' ')[0] ?? 'vm';
    const link = join(dir, `rootfs-${tag}.link`);
    // 1. Template: cold boot from the rootfs image (the drive path is what the snapfile records).
    symlinkSync(join(dir, 'rootfs.ext4'), link);
    const a = await vmm();
    await a.vm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
    await a.vm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
    await a.vm.ok('PUT', '/drives/rootfs', {
      drive_id: 'rootfs',
      path_on_host: link,
      is_root_device: true,
      is_read_only: false,
    });
    await a.vm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
    await a.vm.ok('PATCH', '/vm', { state: 'Paused' });
    const snap0 = { snapshot_path: join(dir, `${tag}-0.snap`), mem_file_path: join(dir, `${tag}-0.mem`) };
    await a.vm.ok('PUT', '/snapshot/create', snap0);
    expect(await a.vm.stop()).toBe(0);
    const memory = Buffer.from(readFileSync(snap0.mem_file_path));
    const disk = Buffer.from(readFileSync(join(dir, 'rootfs.ext4')));

    // 2. The rootfs now comes from the block-server: the recorded path points at its NBD socket,
    //    as the orchestrator's private mount namespace makes it point at the sandbox's device.
    const nbdSock = join(dir, `${tag}-nbd.sock`);
    const block = await startNbdExport(join(dir, 'rootfs.ext4'), nbdSock, ['--overlay', join(dir, `${tag}-overlay`)]);
    cleanup.push(() => block.stop('SIGTERM'));
    unlinkSync(link);
    symlinkSync(nbdSock, link);

    const uffd1Sock = join(dir, `${tag}-uffd1.sock`);
    const uffd1 = await ServiceProcess.start({
      args: ['uffd-server', 'serve-file', '--memfile', snap0.mem_file_path, '--socket', uffd1Sock],
      ready: fileExists(uffd1Sock),
    });
    cleanup.push(() => uffd1.stop('SIGKILL'));

    const b = await vmm(flags);
    await b.vm.ok('PUT', '/snapshot/load', {
      snapshot_path: snap0.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: uffd1Sock },
      enable_diff_snapshots: true,
      resume_vm: true,
    });
    await b.vm.ok('PUT', '/mmds', { instanceID: `sbx-${tag}`, envID: 'base' });
    // Every byte of the template's memory arrives through page faults the uffd-server serves.
    const templateHash = await httpRequest(b.guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM}`);
    expect((templateHash.body as { sha256: string }).sha256).toBe(sha256(memory));

    const writes: { offset: number; data: Buffer }[] = [
      { offset: 0, data: randomBytes(100) },
      { offset: 4096 - 50, data: randomBytes(200) }, // across a page boundary
      { offset: 7 * 1024 * 1024 + 12345, data: randomBytes(3 * 4096) },
      { offset: MEM - 4096, data: randomBytes(4096) },
    ];
    for (const w of writes) {
      const r = await httpRequest(b.guest, 'POST', '/_test/memory/write', {
        offset: w.offset,
        dataBase64: w.data.toString('base64'),
      });
      expect(r.status).toBe(204);
      w.data.copy(memory, w.offset);
    }
    const diskWrites = [
      { offset: 0, data: randomBytes(512) },
      { offset: 3 * 1024 * 1024 + 100, data: randomBytes(70_000) },
      { offset: DISK - 4096, data: randomBytes(4096) },
    ];
    for (const w of diskWrites) {
      const r = await httpRequest(b.guest, 'POST', '/_test/disk/write', {
        offset: w.offset,
        dataBase64: w.data.toString('base64'),
      });
      expect(r.status).toBe(204);
      w.data.copy(disk, w.offset);
    }
    expect((await httpRequest(b.guest, 'GET', '/_test/mmds')).body).toEqual({
      instanceID: `sbx-${tag}`,
      envID: 'base',
    });

    await b.vm.ok('PATCH', '/vm', { state: 'Paused' });
    const snap1 = {
      snapshot_type: 'Full',
      snapshot_path: join(dir, `${tag}-1.snap`),
      mem_file_path: join(dir, `${tag}-1.mem`),
    };
    await b.vm.ok('PUT', '/snapshot/create', snap1);
    expect(sha256(readFileSync(snap1.mem_file_path))).toBe(sha256(memory));
    expect(await b.vm.stop()).toBe(0);
    // serve-file ends on its own when the VMM goes away.
    expect(await uffd1.exited).toBe(0);

    // 3. A second instance from that snapshot, memory again through the uffd-server.
    const uffd2Sock = join(dir, `${tag}-uffd2.sock`);
    const uffd2 = await ServiceProcess.start({
      args: ['uffd-server', 'serve-file', '--memfile', snap1.mem_file_path, '--socket', uffd2Sock],
      ready: fileExists(uffd2Sock),
    });
    cleanup.push(() => uffd2.stop('SIGKILL'));
    const c = await vmm(flags);
    await c.vm.ok('PUT', '/snapshot/load', {
      snapshot_path: snap1.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: uffd2Sock },
      resume_vm: true,
    });
    for (const w of writes) {
      const got = await httpBytes(
        c.guest.host,
        c.guest.port,
        `/_test/memory/read?offset=${w.offset}&length=${w.data.length}`,
      );
      expect(got.equals(w.data)).toBe(true);
    }
    const memHash = await httpRequest(c.guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM}`);
    expect((memHash.body as { sha256: string }).sha256).toBe(sha256(memory));
    for (const w of diskWrites) {
      const got = await httpBytes(
        c.guest.host,
        c.guest.port,
        `/_test/disk/read?offset=${w.offset}&length=${w.data.length}`,
      );
      expect(got.equals(w.data)).toBe(true);
    }
    const diskHash = await httpRequest(c.guest, 'GET', `/_test/disk/hash?offset=0&length=${DISK}`);
    expect((diskHash.body as { sha256: string }).sha256).toBe(sha256(disk));
    // The base image under the block-server's overlay is never modified.
    expect(readFileSync(join(dir, 'rootfs.ext4')).subarray(0, 512).equals(disk.subarray(0, 512))).toBe(false);
    expect(await c.vm.stop()).toBe(0);
    expect(await uffd2.exited).toBe(0);
  });
});
