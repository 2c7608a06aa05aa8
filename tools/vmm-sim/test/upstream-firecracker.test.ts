import { createHash, randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import {
  MAP_PRIVATE,
  PROT_READ,
  ServeEngine,
  UffdFeature,
  accept,
  close,
  listenUnix,
  mmap,
  munmap,
  receiveWithFds,
  uffdFeaturesOfFd,
  watchReadable,
} from '#native';
import { fileExists, ServiceProcess } from '#test-kit';
import { httpBytes, httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// The double in its default mode must behave as upstream Firecracker v1.16.1 did on this
// machine (issue 18): the uffd it hands over negotiates only UFFD_FEATURE_EVENT_REMOVE, the load
// writes a guest page (near 0xdf000) before it answers, Diff snapshots work with and without
// dirty tracking, and create → pause → resume stays byte-exact.

const MEM_MIB = 16;
const MEM = MEM_MIB << 20;
const PAGE = 4096;
let dir: string;
let template: { snapshot_path: string; mem_file_path: string };
const cleanup: (() => Promise<unknown> | unknown)[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-upstream-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
  const a = await VmmSimProcess.start(join(dir, 'template.sock'), ['--guest-listen', `127.0.0.1:${pickGuestPort()}`]);
  try {
    await a.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
    await a.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
    await a.ok('PUT', '/actions', { action_type: 'InstanceStart' });
    await a.ok('PATCH', '/vm', { state: 'Paused' });
    template = { snapshot_path: join(dir, 'template.snap'), mem_file_path: join(dir, 'template.mem') };
    await a.ok('PUT', '/snapshot/create', template);
  } finally {
    await a.stop();
  }
}, 60_000);

afterEach(async () => {
  for (const step of cleanup.splice(0).reverse()) await step();
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

/**
 * This test process as the uffd handler: takes Firecracker's handshake on a Unix socket and
 * serves every fault from a memory file through the native engine uffd-server uses, one page
 * per fault (no prefetch), so the pages it installed are exactly the pages that faulted.
 */
class TestUffdHandler {
  payload = '';
  uffd = -1;
  engine: ServeEngine | undefined;
  private readonly source: number;
  private listener: number;
  private conn = -1;
  private watches: { close(): void }[] = [];
  readonly handshake: Promise<void>;

  constructor(
    readonly socketPath: string,
    private readonly memfile: string,
  ) {
    const fd = openSync(memfile, 'r');
    this.source = mmap(0, MEM, PROT_READ, MAP_PRIVATE, fd, 0);
    closeSync(fd);
    this.listener = listenUnix(socketPath, { nonBlocking: true });
    this.handshake = new Promise((resolve) => {
      const w = watchReadable(this.listener, () => {
        if (this.conn >= 0) return;
        this.conn = accept(this.listener);
        const msg = receiveWithFds(this.conn, 4096, 4);
        if (!msg) return;
        this.payload = Buffer.from(msg.payload).toString();
        this.uffd = msg.fds[0] ?? -1;
        for (const extra of msg.fds.slice(1)) close(extra);
        const region = (JSON.parse(this.payload) as { base_host_virt_addr: number }[])[0]!;
        this.engine = new ServeEngine({
          uffd: this.uffd,
          peerFd: this.conn,
          peerKind: 'socket',
          sourceAddress: this.source,
          sourceSize: MEM,
          allReady: true,
          prefetchBytes: 0,
          installWriteProtected: false,
          syncWriteProtect: false,
          regions: [{ base: region.base_host_virt_addr, size: MEM, offset: 0, pageSize: PAGE }],
        });
        this.engine.start(1);
        resolve();
      });
      this.watches.push(w);
    });
  }

  /** Memory-file offsets of the pages served so far (each one a fault: no prefetch). */
  servedPages(): number[] {
    const present = this.engine!.copyMap(0, 0, MEM / PAGE);
    return [...present.keys()].filter((p) => present[p] === 1).map((p) => p * PAGE);
  }

  /** The uffd's negotiated features as the kernel shows them (`API:<api>:<features>:<ioctls>`). */
  fdinfoApiLine(): string {
    return /^API:.*$/m.exec(readFileSync(`/proc/self/fdinfo/${this.uffd}`, 'utf8'))?.[0] ?? '';
  }

  close(): void {
    this.engine?.stop();
    this.engine?.destroy();
    for (const w of this.watches) w.close();
    if (this.uffd >= 0) close(this.uffd);
    if (this.conn >= 0) close(this.conn);
    close(this.listener);
    munmap(this.source, MEM);
    rmSync(this.socketPath, { force: true });
  }
}

async function startVmm(extra: string[] = []): Promise<{ vm: VmmSimProcess; guest: { host: string; port: number } }> {
  const port = pickGuestPort();
  const vm = await VmmSimProcess.start(join(dir, `fc-${port}.sock`), ['--guest-listen', `127.0.0.1:${port}`, ...extra]);
  cleanup.push(() => vm.stop('SIGKILL'));
  return { vm, guest: { host: '127.0.0.1', port } };
}

function sha256(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex');
}

async function memoryHash(guest: { host: string; port: number }): Promise<string> {
  return ((await httpRequest(guest, 'GET', `/_test/memory/hash?offset=0&length=${MEM}`)).body as { sha256: string })
    .sha256;
}

async function write(guest: { host: string; port: number }, offset: number, data: Buffer): Promise<void> {
  const r = await httpRequest(guest, 'POST', '/_test/memory/write', { offset, dataBase64: data.toString('base64') });
  expect(r.status).toBe(204);
}

/** Blocks of a file that hold data (a fresh file on ext4/tmpfs: the pages written to it). */
function storedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

describe('vmm-sim default mode is upstream Firecracker v1.16', () => {
  it('negotiates only EVENT_REMOVE and serves a fault near 0xdf000 before the load answers', async () => {
    const handler = new TestUffdHandler(join(dir, 'handler.sock'), template.mem_file_path);
    cleanup.push(() => handler.close());
    const { vm, guest } = await startVmm();
    const load = vm
      .ok('PUT', '/snapshot/load', {
        snapshot_path: template.snapshot_path,
        mem_backend: { backend_type: 'Uffd', backend_path: handler.socketPath },
        resume_vm: true,
      })
      .then(() => handler.servedPages());
    await handler.handshake;
    // Firecracker's message: one region, both page-size spellings, and one fd.
    const regions = JSON.parse(handler.payload) as Record<string, number>[];
    expect(regions).toHaveLength(1);
    expect(Object.keys(regions[0] ?? {})).toEqual([
      'base_host_virt_addr',
      'size',
      'offset',
      'page_size',
      'page_size_kib',
    ]);
    expect(regions[0]).toMatchObject({ size: MEM, offset: 0, page_size: PAGE, page_size_kib: PAGE });
    expect(handler.fdinfoApiLine()).toMatch(/^API:\s*aa:80000008:/);
    expect(uffdFeaturesOfFd(handler.uffd) & 0x7fffffff).toBe(UffdFeature.EVENT_REMOVE);

    // The load could only answer after the one page it writes was served.
    expect(await load).toEqual([0xdf000]);
    // No write-protect: the write after the copy is no fault of ours, and the guest reads on.
    expect(await memoryHash(guest)).toBe(sha256(readFileSync(template.mem_file_path)));
    expect(handler.engine!.stats()).toMatchObject({ faults: MEM / PAGE, wpFaults: 0 });
  });

  it('keeps E2B-fork write-protect behind --e2b-fork-write-protect', async () => {
    const handler = new TestUffdHandler(join(dir, 'fork.sock'), template.mem_file_path);
    cleanup.push(() => handler.close());
    const { vm } = await startVmm(['--e2b-fork-write-protect', 'async']);
    const load = vm.ok('PUT', '/snapshot/load', {
      snapshot_path: template.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: handler.socketPath },
    });
    await handler.handshake;
    const features = uffdFeaturesOfFd(handler.uffd);
    expect(features & UffdFeature.PAGEFAULT_FLAG_WP).not.toBe(0);
    expect(features & UffdFeature.WP_ASYNC).not.toBe(0);
    await load;
    const old = await VmmSimProcess.start(join(dir, 'old-flag.sock'), ['--uffd-write-protect', 'async']).catch(
      (err: Error) => err,
    );
    expect(old).toBeInstanceOf(Error);
    expect((old as Error).message).toMatch(/--uffd-write-protect is now --e2b-fork-write-protect/);
  });

  it.each([
    { tracking: false, what: 'every page present in memory' },
    { tracking: true, what: 'only the pages written since load (dirty log)' },
  ])('writes a Diff snapshot of $what (enable_diff_snapshots $tracking)', async ({ tracking }) => {
    const uffdSock = join(dir, `diff-${tracking}.sock`);
    const uffd = await ServiceProcess.start({
      args: [
        'uffd-server',
        'serve-file',
        '--memfile',
        template.mem_file_path,
        '--socket',
        uffdSock,
        '--prefetch-bytes',
        '0',
      ],
      ready: fileExists(uffdSock),
    });
    cleanup.push(() => uffd.stop('SIGKILL'));
    const { vm, guest } = await startVmm();
    await vm.ok('PUT', '/snapshot/load', {
      snapshot_path: template.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: uffdSock },
      enable_diff_snapshots: tracking,
      resume_vm: true,
    });
    expect((await vm.ok('GET', '/machine-config')).body).toMatchObject({ track_dirty_pages: tracking });
    // Read the first quarter (present, not written), then write three scattered pages.
    const quarter = MEM / 4;
    const read = await httpBytes(guest.host, guest.port, `/_test/memory/read?offset=0&length=${quarter}`);
    const written = [3, 700, 3000].map((page) => ({ page, data: randomBytes(PAGE) }));
    for (const w of written) await write(guest, w.page * PAGE, w.data);
    await vm.ok('PATCH', '/vm', { state: 'Paused' });
    const diff = {
      snapshot_type: 'Diff',
      snapshot_path: join(dir, `d-${tracking}.snap`),
      mem_file_path: join(dir, `d-${tracking}.mem`),
    };
    await vm.ok('PUT', '/snapshot/create', diff);
    const file = readFileSync(diff.mem_file_path);
    expect(file.length).toBe(MEM);
    for (const w of written) expect(file.subarray(w.page * PAGE, (w.page + 1) * PAGE).equals(w.data)).toBe(true);
    // The page the VMM itself wrote during the load (0xdf000, inside the quarter read) is in both.
    const loadPage = 0xdf000 / PAGE;
    if (tracking) {
      expect(storedBytes(diff.mem_file_path)).toBe((written.length + 1) * PAGE);
      expect(
        file
          .subarray(loadPage * PAGE, (loadPage + 1) * PAGE)
          .equals(read.subarray(loadPage * PAGE, (loadPage + 1) * PAGE)),
      ).toBe(true);
      expect(file.subarray(PAGE, 2 * PAGE).every((b) => b === 0)).toBe(true);
    } else {
      // The quarter read (pages 3 and 700 written inside it) and page 3000, byte for byte.
      expect(storedBytes(diff.mem_file_path)).toBe(quarter + PAGE);
      const expected = Buffer.from(read);
      for (const w of written) if (w.page * PAGE < quarter) w.data.copy(expected, w.page * PAGE);
      expect(file.subarray(0, quarter).equals(expected)).toBe(true);
    }
    // A second Diff holds only what changed since the first (both modes restart their log).
    await vm.ok('PATCH', '/vm', { state: 'Resumed' });
    const again = randomBytes(PAGE);
    await write(guest, 9 * PAGE, again);
    await vm.ok('PATCH', '/vm', { state: 'Paused' });
    const diff2 = {
      ...diff,
      snapshot_path: join(dir, `d2-${tracking}.snap`),
      mem_file_path: join(dir, `d2-${tracking}.mem`),
    };
    await vm.ok('PUT', '/snapshot/create', diff2);
    if (tracking) expect(storedBytes(diff2.mem_file_path)).toBe(PAGE);
    expect(
      readFileSync(diff2.mem_file_path)
        .subarray(9 * PAGE, 10 * PAGE)
        .equals(again),
    ).toBe(true);
  });

  it('carries memory byte-exact through create → pause → resume → pause → resume (Diff onto the parent)', async () => {
    const memory = Buffer.from(readFileSync(template.mem_file_path));
    let parent = template;
    for (let generation = 1; generation <= 2; generation++) {
      const uffdSock = join(dir, `chain-${generation}.sock`);
      const uffd = await ServiceProcess.start({
        args: ['uffd-server', 'serve-file', '--memfile', parent.mem_file_path, '--socket', uffdSock],
        ready: fileExists(uffdSock),
      });
      cleanup.push(() => uffd.stop('SIGKILL'));
      const { vm, guest } = await startVmm();
      await vm.ok('PUT', '/snapshot/load', {
        snapshot_path: parent.snapshot_path,
        mem_backend: { backend_type: 'Uffd', backend_path: uffdSock },
        enable_diff_snapshots: true,
        resume_vm: true,
      });
      expect(await memoryHash(guest)).toBe(sha256(memory));
      const writes = [
        { offset: generation * 12345, data: randomBytes(5000) },
        { offset: MEM - PAGE - 17 * generation, data: randomBytes(17 * generation) },
      ];
      for (const w of writes) {
        await write(guest, w.offset, w.data);
        w.data.copy(memory, w.offset);
      }
      await vm.ok('PATCH', '/vm', { state: 'Paused' });
      // Firecracker's diff-onto-base: the Diff lands on a copy of the parent's memory file.
      const next = {
        snapshot_path: join(dir, `chain-${generation}.snap`),
        mem_file_path: join(dir, `chain-${generation}.mem`),
      };
      copyFileSync(parent.mem_file_path, next.mem_file_path);
      await vm.ok('PUT', '/snapshot/create', { snapshot_type: 'Diff', ...next });
      expect(sha256(readFileSync(next.mem_file_path))).toBe(sha256(memory));
      await vm.stop();
      parent = next;
    }
    const uffdSock = join(dir, 'chain-last.sock');
    const uffd = await ServiceProcess.start({
      args: ['uffd-server', 'serve-file', '--memfile', parent.mem_file_path, '--socket', uffdSock],
      ready: fileExists(uffdSock),
    });
    cleanup.push(() => uffd.stop('SIGKILL'));
    const { vm, guest } = await startVmm();
    await vm.ok('PUT', '/snapshot/load', {
      snapshot_path: parent.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: uffdSock },
      resume_vm: true,
    });
    expect(await memoryHash(guest)).toBe(sha256(memory));
  });
});
