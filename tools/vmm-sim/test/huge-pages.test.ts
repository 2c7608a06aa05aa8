import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { reserveHugePages, type HugePageReservation } from '#test-kit';
import { fileExists, ServiceProcess } from '#test-kit';
import { unary } from '#grpc';
import { UffdExportDiffRequest } from '#proto/sbx/uffd';
import { startUffdServer } from './peer-services.js';
import { httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// 2 MiB guest pages: the test reserves the hugetlb pages it needs (vm.nr_hugepages, as root)
// and puts the setting back, so it runs on every machine (real Firecracker restored such a
// guest through our uffd-server once pages were reserved, issue 18).
const MEM_MIB = 64;
const HUGE = 2 * 1024 * 1024;
// One VM at a time holds the guest memory, plus headroom.
const PAGES = MEM_MIB / 2 + 2;

let dir = '';
let reservation: HugePageReservation | undefined;
beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-huge-'));
  reservation = reserveHugePages(PAGES);
});
afterAll(() => {
  reservation?.release();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

/** The last snapshot of the first test, for the second. */
let latest: { snap: string; mem: string; memory: Buffer } | undefined;

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

describe('2 MiB guest pages (upstream Firecracker mode)', () => {
  it('cold boots on hugetlb memory, loads it through the uffd-server, pauses (Diff) and resumes byte-exact', async () => {
    writeFileSync(join(dir, 'vmlinux'), 'no kernel');
    const a = await VmmSimProcess.start(join(dir, 'a.sock'), ['--guest-listen', `127.0.0.1:${pickGuestPort()}`]);
    try {
      await a.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
      await a.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB, huge_pages: '2M' });
      await a.ok('PUT', '/actions', { action_type: 'InstanceStart' });
      await a.ok('PATCH', '/vm', { state: 'Paused' });
      await a.ok('PUT', '/snapshot/create', { snapshot_path: join(dir, 's0'), mem_file_path: join(dir, 'm0') });
    } finally {
      await a.stop();
    }
    const memory = Buffer.from(readFileSync(join(dir, 'm0')));
    let parent = { snap: join(dir, 's0'), mem: join(dir, 'm0') };
    for (let generation = 1; generation <= 2; generation++) {
      const uffdSock = join(dir, `uffd-${generation}.sock`);
      const uffd = await ServiceProcess.start({
        args: ['uffd-server', 'serve-file', '--memfile', parent.mem, '--socket', uffdSock, '--page-size', String(HUGE)],
        ready: fileExists(uffdSock),
      });
      const port = pickGuestPort();
      const b = await VmmSimProcess.start(join(dir, `b-${generation}.sock`), ['--guest-listen', `127.0.0.1:${port}`]);
      const guest = { host: '127.0.0.1', port };
      try {
        await b.ok('PUT', '/snapshot/load', {
          snapshot_path: parent.snap,
          mem_backend: { backend_type: 'Uffd', backend_path: uffdSock },
          enable_diff_snapshots: true,
          resume_vm: true,
        });
        expect((await b.ok('GET', '/machine-config')).body).toMatchObject({ huge_pages: '2M' });
        const hash = await httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM_MIB << 20}`);
        expect((hash.body as { sha256: string }).sha256).toBe(sha256(memory));
        // A write in the middle of one huge page and one across two.
        for (const [offset, length] of [
          [5 * HUGE + 1000, 3000],
          [9 * HUGE - 100, 300],
        ] as const) {
          const data = randomBytes(length);
          const r = await httpRequest(guest, 'POST', '/_test/memory/write', {
            offset,
            dataBase64: data.toString('base64'),
          });
          expect(r.status).toBe(204);
          data.copy(memory, offset);
        }
        await b.ok('PATCH', '/vm', { state: 'Paused' });
        const next = { snap: join(dir, `s${generation}`), mem: join(dir, `m${generation}`) };
        copyFileSync(parent.mem, next.mem);
        await b.ok('PUT', '/snapshot/create', {
          snapshot_type: 'Diff',
          snapshot_path: next.snap,
          mem_file_path: next.mem,
        });
        expect(sha256(readFileSync(next.mem))).toBe(sha256(memory));
        parent = next;
      } finally {
        await b.stop('SIGKILL');
        await uffd.stop('SIGKILL');
      }
    }
    latest = { ...parent, memory };
    const file = await VmmSimProcess.start(join(dir, 'c.sock'), ['--guest-listen', `127.0.0.1:${pickGuestPort()}`]);
    try {
      // Firecracker maps no hugetlbfs snapshot from a file: only the uffd backend restores it.
      const refused = await file.api('PUT', '/snapshot/load', {
        snapshot_path: parent.snap,
        mem_file_path: parent.mem,
      });
      expect(refused.status).toBe(400);
    } finally {
      await file.stop('SIGKILL');
    }
  });

  it('pauses through the uffd-server service: the diff is the 2 MiB pages in the Diff snapshot, merged it reads back exactly', async () => {
    expect(latest).toBeDefined();
    const { snap, mem } = latest!;
    const memory = Buffer.from(latest!.memory);
    const { service, client } = await startUffdServer(dir);
    const port = pickGuestPort();
    const vm = await VmmSimProcess.start(join(dir, 'svc.sock'), ['--guest-listen', `127.0.0.1:${port}`]);
    const guest = { host: '127.0.0.1', port };
    try {
      const socketPath = join(dir, 'svc-uffd.sock');
      await unary(client, client.prepare, {
        sandboxId: 'huge',
        socketPath,
        buildId: '',
        pageSize: HUGE,
        prefetchBytes: 0,
        memfilePath: mem,
      });
      await vm.ok('PUT', '/snapshot/load', {
        snapshot_path: snap,
        mem_backend: { backend_type: 'Uffd', backend_path: socketPath },
        enable_diff_snapshots: true,
        resume_vm: true,
      });
      // Read all, write into huge pages 3 and 20.
      const hash = await httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM_MIB << 20}`);
      expect((hash.body as { sha256: string }).sha256).toBe(sha256(memory));
      for (const offset of [3 * HUGE + 77, 20 * HUGE + HUGE - 4096]) {
        const data = randomBytes(4096);
        await httpRequest(guest, 'POST', '/_test/memory/write', { offset, dataBase64: data.toString('base64') });
        data.copy(memory, offset);
      }
      await vm.ok('PATCH', '/vm', { state: 'Paused' });
      await unary(client, client.stopSourcing, { sandboxId: 'huge' });
      const paused = { snapshot_path: join(dir, 'svc.snap'), mem_file_path: join(dir, 'svc.diff-snap') };
      await vm.ok('PUT', '/snapshot/create', { snapshot_type: 'Diff', ...paused });
      // fromPartial: fields this test does not care about keep their defaults.
      const exported = await unary(
        client,
        client.exportDiff,
        UffdExportDiffRequest.fromPartial({
          sandboxId: 'huge',
          newBuildId: randomUUID(),
          diffPath: join(dir, 'svc.diff'),
          memfilePath: paused.mem_file_path,
          vmmDirtyLog: true,
        }),
      );
      expect(exported.tracking).toBe('vmm-dirty-log');
      expect(exported.pageSize).toBe(HUGE);
      // Pages 3 and 20, and page 0 (the VMM's write at load, unless it is all zeros).
      const expectedPages = [0, 3, 20].filter((p) => memory.subarray(p * HUGE, (p + 1) * HUGE).some((b) => b !== 0));
      expect(Number(exported.dirtyPages)).toBe(expectedPages.length);
      // Merged over the parent (as the orchestrator's header merge does), the bytes are the guest's.
      const merged = Buffer.from(readFileSync(mem));
      const diff = readFileSync(join(dir, 'svc.diff'));
      for (const m of exported.mappings) {
        if (m.buildId === '00000000-0000-0000-0000-000000000000') merged.fill(0, m.offset, m.offset + m.length);
        else diff.copy(merged, m.offset, m.buildStorageOffset, m.buildStorageOffset + m.length);
      }
      expect(sha256(merged)).toBe(sha256(memory));
      await unary(client, client.stop, { sandboxId: 'huge' });
    } finally {
      await vm.stop('SIGKILL');
      client.close();
      await service.stop('SIGTERM');
    }
  });
});
