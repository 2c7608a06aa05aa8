import { randomBytes, randomUUID } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { UffdServerClient } from '#proto/sbx/uffd';
import { ServiceProcess } from '#test-kit';
import { startUffdServer } from './peer-services.js';
import { httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// The pause sequence of DESIGN.md §3 between the double and the uffd-server service: load
// through the uffd, write, pause, stop sourcing, snapshot, export the memory diff. The write
// tracking the double negotiated on the uffd decides what the uffd-server can know: with
// write-protect (async or sync) the diff is exactly the pages the guest wrote, however much the
// reads and prefetch made present; without it, every present page counts (E2B's behaviour).

const MEM_MIB = 16;
const PAGE = 4096;
let dir: string;
let uffdServer: ServiceProcess;
let client: UffdServerClient;
let snap0: { snapshot_path: string; mem_file_path: string };
const vmms: VmmSimProcess[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-pause-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  const template = await VmmSimProcess.start(join(dir, 'template.sock'), [
    '--guest-listen',
    `127.0.0.1:${pickGuestPort()}`,
  ]);
  vmms.push(template);
  await template.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
  await template.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
  await template.ok('PUT', '/actions', { action_type: 'InstanceStart' });
  await template.ok('PATCH', '/vm', { state: 'Paused' });
  snap0 = { snapshot_path: join(dir, 'template.snap'), mem_file_path: join(dir, 'template.mem') };
  await template.ok('PUT', '/snapshot/create', snap0);
  await template.stop();
  ({ service: uffdServer, client } = await startUffdServer(dir));
}, 60_000);

afterEach(async () => {
  await Promise.all(vmms.splice(0).map((v) => v.stop('SIGKILL')));
});

afterAll(async () => {
  client?.close();
  await uffdServer?.stop('SIGTERM');
  rmSync(dir, { recursive: true, force: true });
});

describe.each([
  // Upstream Firecracker (the double's default): no write-protect; the written pages come from
  // Firecracker's own Diff snapshot (dirty log), so prefetch may run.
  {
    name: 'upstream, Diff dirty log',
    mode: '',
    snapshot: 'Diff',
    vmmDirtyLog: true,
    tracking: 'vmm-dirty-log',
    exact: true,
    memfd: false,
    prefetch: 2 << 20,
  },
  {
    name: 'upstream, Diff dirty log, memfd',
    mode: '',
    snapshot: 'Diff',
    vmmDirtyLog: true,
    tracking: 'vmm-dirty-log',
    exact: true,
    memfd: true,
    prefetch: 2 << 20,
  },
  {
    name: 'upstream, present pages',
    mode: '',
    snapshot: 'Full',
    vmmDirtyLog: false,
    tracking: 'present',
    exact: false,
    memfd: false,
    prefetch: 0,
  },
  {
    name: 'E2B fork async',
    mode: 'async',
    snapshot: 'Full',
    vmmDirtyLog: false,
    tracking: 'wp-async',
    exact: true,
    memfd: true,
    prefetch: 2 << 20,
  },
  {
    name: 'E2B fork sync',
    mode: 'sync',
    snapshot: 'Full',
    vmmDirtyLog: false,
    tracking: 'wp-sync',
    exact: true,
    memfd: false,
    prefetch: 2 << 20,
  },
])('pause and export ($name)', ({ name, mode, snapshot, vmmDirtyLog, tracking, exact, memfd, prefetch }) => {
  it(`exports ${exact ? 'exactly the pages written' : 'every present page'} (${tracking})`, async () => {
    const id = `pause-${name.replace(/[^a-z]+/g, '-')}`;
    const socketPath = join(dir, `${id}.sock`);
    await unary(client, client.prepare, {
      sandboxId: id,
      socketPath,
      buildId: '',
      pageSize: PAGE,
      // 0 is the server's default; 1 byte rounds to no prefetch beyond the faulted page.
      prefetchBytes: prefetch || 1,
      memfilePath: snap0.mem_file_path,
    });
    const guestPort = pickGuestPort();
    const flags = [
      '--guest-listen',
      `127.0.0.1:${guestPort}`,
      ...(mode ? ['--e2b-fork-write-protect', mode] : []),
      ...(memfd ? ['--share-memfd'] : []),
    ];
    const vmm = await VmmSimProcess.start(join(dir, `${id}-fc.sock`), flags);
    vmms.push(vmm);
    await vmm.ok('PUT', '/snapshot/load', {
      snapshot_path: snap0.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: socketPath },
      enable_diff_snapshots: true,
      resume_vm: true,
    });
    const guest = { host: '127.0.0.1', port: guestPort };
    // Read a quarter of memory (present, not written), then write three scattered pages.
    expect((await httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${(MEM_MIB << 20) / 4}`)).status).toBe(
      200,
    );
    const written = [3, 700, 3000].map((page) => ({ page, data: randomBytes(PAGE) }));
    for (const w of written) {
      await httpRequest(guest, 'POST', '/_test/memory/write', {
        offset: w.page * PAGE,
        dataBase64: w.data.toString('base64'),
      });
    }
    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    await unary(client, client.stopSourcing, { sandboxId: id });
    const snap = {
      snapshot_type: snapshot,
      snapshot_path: join(dir, `${id}.snap`),
      mem_file_path: join(dir, `${id}.mem`),
    };
    await vmm.ok('PUT', '/snapshot/create', snap);
    const diffPath = join(dir, `${id}.diff`);
    const exported = await unary(client, client.exportDiff, {
      sandboxId: id,
      newBuildId: randomUUID(),
      diffPath,
      memfilePath: memfd && !vmmDirtyLog ? '' : snap.mem_file_path,
      vmmDirtyLog,
      keepServing: false,
      dedup: false,
      prefetchPath: '',
    });
    expect(exported.tracking).toBe(tracking);
    if (exact) {
      // The guest's three pages and the one the VMM wrote during the load (0xdf000, its
      // contents unchanged), ascending.
      const loadPage = {
        page: 0xdf000 / PAGE,
        data: readFileSync(snap0.mem_file_path).subarray(0xdf000, 0xdf000 + PAGE),
      };
      const expected = [...written, loadPage].sort((a, b) => a.page - b.page);
      expect(Number(exported.dirtyPages)).toBe(expected.length);
      expect(readFileSync(diffPath).equals(Buffer.concat(expected.map((w) => w.data)))).toBe(true);
    } else {
      expect(Number(exported.dirtyPages) + Number(exported.zeroPages)).toBeGreaterThanOrEqual(
        (MEM_MIB << 20) / 4 / PAGE,
      );
    }
    await vmm.stop();
    await unary(client, client.stop, { sandboxId: id });
  });
});
