import { mkdtempSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { eventually } from '#test-kit';
import { startNbdExport, startUffdServer } from './peer-services.js';
import { httpRequest, pickGuestPort, VmmSimProcess } from './vmm-sim-process.js';

// A VMM whose peers died under it (the uffd-server and block-server stopped at the same moment
// as everything else, e.g. a Ctrl-C that reached every process) must still end on SIGTERM: its
// vCPU is frozen in a page fault nobody will serve, and its NBD drive has nobody to talk to.

const MEM_MIB = 16;
let dir: string;
let snap0: { snapshot_path: string; mem_file_path: string };

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-orphan-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  writeFileSync(join(dir, 'rootfs.ext4'), Buffer.alloc(4 * 1024 * 1024, 0x11));
  // The snapfile records this path; the loaded VM below finds the NBD socket there instead.
  symlinkSync(join(dir, 'rootfs.ext4'), join(dir, 'rootfs.link'));
  const template = await VmmSimProcess.start(join(dir, 'template.sock'), [
    '--guest-listen',
    `127.0.0.1:${pickGuestPort()}`,
  ]);
  await template.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
  await template.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
  await template.ok('PUT', '/drives/rootfs', {
    drive_id: 'rootfs',
    path_on_host: join(dir, 'rootfs.link'),
    is_root_device: true,
    is_read_only: false,
  });
  await template.ok('PUT', '/actions', { action_type: 'InstanceStart' });
  await template.ok('PATCH', '/vm', { state: 'Paused' });
  snap0 = { snapshot_path: join(dir, 'template.snap'), mem_file_path: join(dir, 'template.mem') };
  await template.ok('PUT', '/snapshot/create', snap0);
  await template.stop();
}, 60_000);

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

/** The kernel functions the process's threads sleep in. */
function threadWaits(pid: number): string[] {
  return readdirSync(`/proc/${pid}/task`).map((t) => readFileSync(`/proc/${pid}/task/${t}/wchan`, 'utf8'));
}

describe('vmm-sim whose peers are gone', () => {
  it('ends on SIGTERM with its vCPU frozen in a fault and its NBD server gone', async () => {
    const nbdSock = join(dir, 'nbd.sock');
    const blockServer = await startNbdExport(join(dir, 'rootfs.ext4'), nbdSock);
    const { service: uffdServer, client } = await startUffdServer(dir);
    rmSync(join(dir, 'rootfs.link'));
    symlinkSync(nbdSock, join(dir, 'rootfs.link'));
    let vmm: VmmSimProcess | undefined;
    try {
      const socketPath = join(dir, 'orphan-uffd.sock');
      await unary(client, client.prepare, {
        sandboxId: 'orphan',
        socketPath,
        buildId: '',
        pageSize: 4096,
        prefetchBytes: 0,
        memfilePath: snap0.mem_file_path,
      });
      client.close();
      const guest = { host: '127.0.0.1', port: pickGuestPort() };
      vmm = await VmmSimProcess.start(join(dir, 'orphan-fc.sock'), ['--guest-listen', `${guest.host}:${guest.port}`]);
      await vmm.ok('PUT', '/snapshot/load', {
        snapshot_path: snap0.snapshot_path,
        mem_backend: { backend_type: 'Uffd', backend_path: socketPath },
        enable_diff_snapshots: true,
        resume_vm: true,
      });
      expect((await httpRequest(guest, 'GET', '/health')).status).toBe(204);
      await uffdServer.stop('SIGKILL');
      await blockServer.stop('SIGKILL');
      // Touching every page now freezes the vCPU in the first fault nobody serves.
      const hashing = httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM_MIB << 20}`).catch(
        (err: Error) => err,
      );
      const pid = vmm.pid;
      await eventually(() => threadWaits(pid).some((w) => w.includes('userfault')), {
        what: 'the vCPU to wait in a userfault',
      });
      await vmm.stop('SIGTERM');
      await hashing;
      expect(() => process.kill(pid, 0)).toThrow();
    } finally {
      await vmm?.stop('SIGKILL');
      await uffdServer.stop('SIGKILL');
      await blockServer.stop('SIGKILL');
    }
  }, 60_000);
});
