import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { ServiceProcess } from './service-process.js';
import { httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// 2 MiB guest pages need hugetlb pages reserved on the host (vm.nr_hugepages), which is host
// configuration a test must not change.
const MEM_MIB = 64;
const freeHugePages = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
// One VM at a time holds the guest memory; a little headroom for the uffd-server's own copy.
const neededPages = MEM_MIB / 2 + 2;
const hasHugePages = freeHugePages >= neededPages;
if (!hasHugePages) {
  console.warn(
    `vmm-sim huge-pages test skipped: ${freeHugePages} free 2 MiB hugetlb pages, needs ${neededPages} (set vm.nr_hugepages to run it)`,
  );
}

let dir = '';
// Made in the test: vitest runs no hooks for a suite whose tests are all skipped.
afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

describe('2 MiB guest pages', () => {
  it.skipIf(!hasHugePages)(
    'cold boots on hugetlb memory and loads it back through the uffd-server with 2 MiB pages',
    async () => {
      dir = mkdtempSync(join(tmpdir(), 'vmm-sim-huge-'));
      writeFileSync(join(dir, 'vmlinux'), 'no kernel');
      const a = await VmmSimProcess.start(join(dir, 'a.sock'), ['--guest-listen', '127.0.0.1:0']);
      try {
        await a.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
        await a.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB, huge_pages: '2M' });
        await a.ok('PUT', '/actions', { action_type: 'InstanceStart' });
        await a.ok('PATCH', '/vm', { state: 'Paused' });
        await a.ok('PUT', '/snapshot/create', { snapshot_path: join(dir, 's'), mem_file_path: join(dir, 'm') });
      } finally {
        await a.stop();
      }
      const uffdSock = join(dir, 'uffd.sock');
      const uffd = await ServiceProcess.start(
        ['uffd-server', 'serve-file', '--memfile', join(dir, 'm'), '--socket', uffdSock, '--page-size', '2097152'],
        uffdSock,
      );
      const port = pickGuestPort();
      const b = await VmmSimProcess.start(join(dir, 'b.sock'), ['--guest-listen', `127.0.0.1:${port}`]);
      try {
        await b.ok('PUT', '/snapshot/load', {
          snapshot_path: join(dir, 's'),
          mem_backend: { backend_type: 'Uffd', backend_path: uffdSock },
          resume_vm: true,
        });
        const hash = await httpRequest(
          { host: '127.0.0.1', port },
          'GET',
          `/_test/memory/hash?offset=0&length=${MEM_MIB << 20}`,
        );
        expect((hash.body as { sha256: string }).sha256).toBe(
          createHash('sha256')
            .update(readFileSync(join(dir, 'm')))
            .digest('hex'),
        );
        const file = await b.api('PUT', '/snapshot/load', {
          snapshot_path: join(dir, 's'),
          mem_file_path: join(dir, 'm'),
        });
        expect(file.status).toBe(400);
      } finally {
        await b.stop('SIGKILL');
        await uffd.stop('SIGKILL');
      }
    },
  );
});
