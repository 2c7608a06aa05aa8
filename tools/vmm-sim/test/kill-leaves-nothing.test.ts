import { mkdtempSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { UffdServerClient } from '#proto/sbx/uffd';
import { eventually, ServiceProcess } from '#test-kit';
import { holdings, type Holdings } from './holdings.js';
import { startNbdExport, startUffdServer } from './peer-services.js';
import { httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// Must-show: killing the VMM at any point leaves nothing on the uffd-server and block-server
// side. Both run as they do on a node (uffd-server as the gRPC service, the sandbox prepared
// over its control socket; block-server serving the rootfs over NBD); the double is killed
// with SIGKILL at several points of a sandbox's life, and the peers' fds and mappings are
// compared with what they held before.

const MEM_MIB = 32;
let dir: string;
let uffdServer: ServiceProcess;
let blockServer: ServiceProcess;
let client: UffdServerClient;
let snap0: { snapshot_path: string; mem_file_path: string };
let uffdBaseline: Holdings;
let blockBaseline: Holdings;
let seq = 0;
const vmms: VmmSimProcess[] = [];

const fdsOf = (h: Holdings, kind: RegExp) => h.fds.filter((f) => kind.test(f));

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-kill-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  writeFileSync(join(dir, 'rootfs.ext4'), Buffer.alloc(8 * 1024 * 1024, 0x11));
  const link = join(dir, 'rootfs.link');
  symlinkSync(join(dir, 'rootfs.ext4'), link);
  const template = await VmmSimProcess.start(join(dir, 'template.sock'), [
    '--guest-listen',
    `127.0.0.1:${pickGuestPort()}`,
  ]);
  await template.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
  await template.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
  await template.ok('PUT', '/drives/rootfs', {
    drive_id: 'rootfs',
    path_on_host: link,
    is_root_device: true,
    is_read_only: false,
  });
  await template.ok('PUT', '/actions', { action_type: 'InstanceStart' });
  await template.ok('PATCH', '/vm', { state: 'Paused' });
  snap0 = { snapshot_path: join(dir, 'template.snap'), mem_file_path: join(dir, 'template.mem') };
  await template.ok('PUT', '/snapshot/create', snap0);
  await template.stop();

  const nbdSock = join(dir, 'nbd.sock');
  blockServer = await startNbdExport(join(dir, 'rootfs.ext4'), nbdSock);
  rmSync(link);
  symlinkSync(nbdSock, link);

  ({ service: uffdServer, client } = await startUffdServer(dir));
  await unary(client, client.list, {});
  uffdBaseline = holdings(uffdServer.pid);
  blockBaseline = holdings(blockServer.pid);
}, 60_000);

afterEach(async () => {
  await Promise.all(vmms.splice(0).map((v) => v.stop('SIGKILL')));
});

afterAll(async () => {
  client?.close();
  await uffdServer?.stop('SIGTERM');
  await blockServer?.stop('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

async function sandbox(
  flags: string[],
): Promise<{ id: string; vmm: VmmSimProcess; guest: { host: string; port: number } }> {
  const id = `kill-${++seq}`;
  const socketPath = join(dir, `${id}-uffd.sock`);
  await unary(client, client.prepare, {
    sandboxId: id,
    socketPath,
    buildId: '',
    pageSize: 4096,
    prefetchBytes: 0,
    memfilePath: snap0.mem_file_path,
  });
  const guestPort = pickGuestPort();
  const vmm = await VmmSimProcess.start(join(dir, `${id}-fc.sock`), [
    '--guest-listen',
    `127.0.0.1:${guestPort}`,
    ...flags,
  ]);
  await vmm.ok('PUT', '/snapshot/load', {
    snapshot_path: snap0.snapshot_path,
    mem_backend: { backend_type: 'Uffd', backend_path: socketPath },
    enable_diff_snapshots: true,
    resume_vm: false,
  });
  return { id, vmm, guest: { host: '127.0.0.1', port: guestPort } };
}

async function expectPeersClean(id: string, vmm: VmmSimProcess): Promise<void> {
  await vmm.exited;
  // The uffd-server sees its peer go away on its own: serving ends, the uffd and the
  // handshake connection are closed before anyone tells it anything.
  const state = await eventually(
    async () => {
      const s = await unary(client, client.stats, { sandboxId: id });
      return s.state === 'peer-gone' || s.state === 'failed' ? s.state : false;
    },
    { what: 'uffd-server to notice the VMM is gone' },
  );
  expect(state).toBe('peer-gone');
  const afterPeer = holdings(uffdServer.pid);
  expect(fdsOf(afterPeer, /userfaultfd/)).toEqual([]);
  expect(fdsOf(afterPeer, /^socket:/).length).toBe(fdsOf(uffdBaseline, /^socket:/).length);
  // What remains is what an export would need; the orchestrator's Stop releases it.
  await unary(client, client.stop, { sandboxId: id });
  await eventually(() => expect(holdings(uffdServer.pid)).toEqual(uffdBaseline));
  // The block-server drops the dead NBD connection.
  await eventually(() => expect(holdings(blockServer.pid)).toEqual(blockBaseline));
}

describe('killing the VMM leaves nothing on the uffd-server and block-server side', () => {
  it('SIGKILL right after the snapshot load (handshake taken, VM paused)', async () => {
    const { id, vmm } = await sandbox([]);
    expect(fdsOf(holdings(uffdServer.pid), /userfaultfd/).length).toBe(1);
    await vmm.stop('SIGKILL');
    await expectPeersClean(id, vmm);
  });

  it('SIGKILL while the guest is faulting memory in (memfd shared)', async () => {
    const { id, vmm, guest } = await sandbox(['--share-memfd']);
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    const hashing = httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM_MIB << 20}`).catch(
      () => undefined,
    );
    await eventually(
      async () => {
        const s = await unary(client, client.stats, { sandboxId: id });
        return Number(s.faults) > 0;
      },
      { what: 'faults to be served' },
    );
    // While serving, the peers hold what the comparison must see go: the memfd, the uffd,
    // the handshake connection; the NBD connection.
    const serving = holdings(uffdServer.pid);
    expect(fdsOf(serving, /memfd:guest_mem/).length).toBe(1);
    expect(fdsOf(holdings(blockServer.pid), /^socket:/).length).toBe(fdsOf(blockBaseline, /^socket:/).length + 1);
    await vmm.stop('SIGKILL');
    await hashing;
    await expectPeersClean(id, vmm);
  });

  it('SIGKILL with disk writes in flight', async () => {
    const { id, vmm, guest } = await sandbox([]);
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    const writes = Array.from({ length: 16 }, (_, i) =>
      httpRequest(guest, 'POST', '/_test/disk/write', { offset: i * 65536, pattern: 'ab', length: 65536 }).catch(
        () => undefined,
      ),
    );
    await new Promise((r) => setTimeout(r, 20));
    await vmm.stop('SIGKILL');
    await Promise.all(writes);
    await expectPeersClean(id, vmm);
  });

  it('SIGKILL in the middle of a snapshot create', async () => {
    const { id, vmm, guest } = await sandbox(['--share-memfd']);
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    await httpRequest(guest, 'POST', '/_test/memory/write', { offset: 4096, pattern: '01020304', length: 65536 });
    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    const creating = vmm
      .api('PUT', '/snapshot/create', { snapshot_path: join(dir, `${id}.snap`), mem_file_path: join(dir, `${id}.mem`) })
      .catch(() => undefined);
    await new Promise((r) => setTimeout(r, 30));
    await vmm.stop('SIGKILL');
    await creating;
    await expectPeersClean(id, vmm);
  });

  it('SIGTERM while serving: the VMM stops cleanly and the peers clean up the same way', async () => {
    const { id, vmm, guest } = await sandbox([]);
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    expect((await httpRequest(guest, 'GET', '/health')).status).toBe(204);
    expect(await vmm.stop('SIGTERM')).toBe(0);
    await expectPeersClean(id, vmm);
  });
});
