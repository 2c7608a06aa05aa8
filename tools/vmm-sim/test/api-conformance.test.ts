import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { bootImagePage, bootSeed } from '../src/boot-image.js';
import { decodeSnapfile } from '../src/snapfile.js';
import { holdings as holdingsOf } from './holdings.js';
import { httpRequest, VmmSimProcess, pickGuestPort } from './vmm-sim-process.js';

// Sequences and messages from Firecracker's API (rpc_interface.rs, persist.rs) and its
// integration tests (tests/integration_tests/functional/test_snapshot_basic.py:
// test_negative_snapshot_create, test_negative_postload_api, test_negative_snapshot_permissions).

const PRE_BOOT = 'The requested operation is not supported before starting the microVM.';
const POST_BOOT = 'The requested operation is not supported after starting the microVM.';

let dir: string;
const procs: VmmSimProcess[] = [];

async function start(extra: string[] = []): Promise<{ vmm: VmmSimProcess; guestPort: number }> {
  const guestPort = pickGuestPort();
  const vmm = await VmmSimProcess.start(join(dir, `api-${guestPort}.sock`), [
    '--guest-listen',
    `127.0.0.1:${guestPort}`,
    '--level',
    'Warn',
    '--no-seccomp',
    ...extra,
  ]);
  procs.push(vmm);
  return { vmm, guestPort };
}

/** The VMM's memfd-backed guest memory, as its mappings and fds show it. */
function guestMemfd(pid: number): string[] {
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.includes('memfd:guest_mem'));
  return [...maps, ...holdingsOf(pid).fds.filter((f) => f.includes('memfd:guest_mem'))];
}

function fault(reply: { body: unknown }): string {
  return (reply.body as { fault_message?: string }).fault_message ?? '';
}

async function coldBoot(vmm: VmmSimProcess, memSizeMib: number, trackDirtyPages = false): Promise<void> {
  await vmm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux'), boot_args: 'console=ttyS0' });
  await vmm.ok('PUT', '/machine-config', {
    vcpu_count: 2,
    mem_size_mib: memSizeMib,
    track_dirty_pages: trackDirtyPages,
  });
  await vmm.ok('PUT', '/drives/rootfs', {
    drive_id: 'rootfs',
    path_on_host: join(dir, 'rootfs.ext4'),
    is_root_device: true,
    is_read_only: false,
  });
  await vmm.ok('PUT', '/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'tap0' });
  await vmm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
}

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-api-'));
  writeFileSync(join(dir, 'vmlinux'), 'not a kernel: the double never runs one');
  writeFileSync(join(dir, 'rootfs.ext4'), Buffer.alloc(4 * 1024 * 1024));
});

afterEach(async () => {
  await Promise.all(procs.splice(0).map((p) => p.stop('SIGKILL')));
});

afterAll(() => {
  rmSync(dir, { recursive: true, force: true });
});

describe('vmm-sim API conformance', () => {
  it('reports instance info, and refuses runtime actions before boot', async () => {
    const { vmm } = await start(['--id', 'sbx_42']);
    const info = await vmm.api('GET', '/');
    expect(info.status).toBe(200);
    expect(info.body).toMatchObject({ app_name: 'Firecracker', id: 'sbx_42', state: 'Not started' });
    for (const [method, path, body] of [
      ['PATCH', '/vm', { state: 'Resumed' }],
      ['PATCH', '/vm', { state: 'Paused' }],
      ['PUT', '/snapshot/create', { snapshot_path: join(dir, 's'), mem_file_path: join(dir, 'm') }],
    ] as const) {
      const reply = await vmm.api(method, path, body);
      expect(reply.status).toBe(400);
      expect(fault(reply)).toBe(PRE_BOOT);
    }
    const frozen = await vmm.api('PATCH', '/vm', '{"state":"Frozen"}');
    expect(fault(frozen)).toBe(
      'An error occurred when deserializing the json body of a request: unknown variant `Frozen`, expected `Paused` or `Resumed` at line 1 column 17.',
    );
    expect(fault(await vmm.api('PATCH', '/vm', '{}'))).toBe(
      'An error occurred when deserializing the json body of a request: missing field `state` at line 1 column 2.',
    );
    // GET /vm/config lists every device kind Firecracker v1.16 has, configured or not.
    expect(Object.keys((await vmm.ok('GET', '/vm/config')).body as object)).toEqual([
      'balloon',
      'drives',
      'boot-source',
      'cpu-config',
      'logger',
      'machine-config',
      'metrics',
      'mmds-config',
      'network-interfaces',
      'vsock',
      'entropy',
      'pmem',
      'memory-hotplug',
    ]);
    const unknown = await vmm.api('GET', '/nothing-here');
    expect(unknown.status).toBe(400);
    expect(fault(unknown)).toBe('Invalid request method and/or path: GET nothing-here.');
    const badJson = await vmm.api('PUT', '/actions', '{"action_type": ');
    expect(badJson.status).toBe(400);
    expect(fault(badJson)).toMatch(/^An error occurred when deserializing the json body of a request: /);
  });

  it('keeps serving after garbage, half requests and clients that vanish on the API socket', async () => {
    const { vmm } = await start();
    const { connect } = await import('node:net');
    const { randomBytes } = await import('node:crypto');
    const junk = [
      randomBytes(300),
      Buffer.from('PUT /snapshot/load HTTP/1.1\r\nContent-Length: 500\r\n\r\n{"snapshot_path":'),
      Buffer.from('GET / HTTP/1.1\r\nContent-Length: -7\r\n\r\n'),
      Buffer.from('\r\n\r\n\r\n'),
    ];
    for (let i = 0; i < 40; i++) {
      const bytes = junk[i % junk.length] ?? Buffer.alloc(0);
      await new Promise<void>((resolve) => {
        const sock = connect(vmm.apiSock, () => {
          sock.write(bytes);
          setTimeout(() => sock.destroy(), 5);
        });
        sock.on('error', () => undefined);
        sock.on('close', () => resolve());
      });
    }
    const info = await vmm.api('GET', '/');
    expect(info.status).toBe(200);
    expect(info.body).toMatchObject({ state: 'Not started' });
    expect(vmm.service.running).toBe(true);
  });

  it('keeps MMDS: GET before PUT is {}, PATCH needs a PUT first, PATCH merges', async () => {
    const { vmm } = await start();
    expect((await vmm.api('GET', '/mmds')).body).toEqual({});
    const early = await vmm.api('PATCH', '/mmds', { a: 1 });
    expect(early.status).toBe(400);
    expect(fault(early)).toBe('MMDS error: The MMDS data store is not initialized.');
    const meta = { instanceID: 'sbx-1', envID: 'base', address: 'logs:1', traceID: 'tr', teamID: 'team' };
    expect((await vmm.api('PUT', '/mmds', meta)).status).toBe(204);
    expect((await vmm.api('GET', '/mmds')).body).toEqual(meta);
    expect((await vmm.api('PATCH', '/mmds', { traceID: null, teamID: 't2' })).status).toBe(204);
    expect((await vmm.api('GET', '/mmds')).body).toEqual({
      instanceID: 'sbx-1',
      envID: 'base',
      address: 'logs:1',
      teamID: 't2',
    });
    const huge = await vmm.api('PUT', '/mmds', { key: 'X'.repeat(60_000) });
    expect(huge.status).toBe(400);
    expect(fault(huge)).toMatch(/larger than the limit of 51200 bytes/);
  });

  it('refuses a snapshot load once boot resources are configured, and a start without a kernel', async () => {
    const { vmm } = await start();
    const noKernel = await vmm.api('PUT', '/actions', { action_type: 'InstanceStart' });
    expect(fault(noKernel)).toBe('Start microvm error: Cannot start microvm without kernel configuration.');
    const missing = await vmm.api('PUT', '/boot-source', { kernel_image_path: join(dir, 'no-such-kernel') });
    expect(missing.status).toBe(400);
    expect(fault(missing)).toBe(
      'Boot source error: The kernel file cannot be opened: No such file or directory (os error 2)',
    );
    await vmm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 16 });
    const load = await vmm.api('PUT', '/snapshot/load', {
      snapshot_path: join(dir, 'x'),
      mem_backend: { backend_type: 'File', backend_path: join(dir, 'y') },
    });
    expect(load.status).toBe(400);
    expect(fault(load)).toBe(
      'Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.',
    );
    const badVcpus = await vmm.api('PUT', '/machine-config', { vcpu_count: 3, mem_size_mib: 16, smt: true });
    expect(fault(badVcpus)).toMatch(/^Machine config error: The vCPU number is invalid/);
    expect((await vmm.api('GET', '/')).body).toMatchObject({ state: 'Not started' });
  });

  it('cold boots, refuses snapshots while running and boot config after start, and snapshots when paused', async () => {
    const { vmm, guestPort } = await start();
    await coldBoot(vmm, 16);
    expect((await vmm.api('GET', '/')).body).toMatchObject({ state: 'Running' });
    expect((await vmm.api('GET', '/machine-config')).body).toEqual({
      vcpu_count: 2,
      mem_size_mib: 16,
      smt: false,
      track_dirty_pages: false,
      huge_pages: 'None',
    });
    const snap = { snapshot_path: join(dir, 'cold.snap'), mem_file_path: join(dir, 'cold.mem') };
    const running = await vmm.api('PUT', '/snapshot/create', { ...snap, snapshot_type: 'Full' });
    expect(running.status).toBe(400);
    expect(fault(running)).toMatch(/save\/restore unavailable while running/);
    for (const [method, path, body] of [
      ['PUT', '/actions', { action_type: 'InstanceStart' }],
      ['PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') }],
      ['PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 16 }],
      ['PUT', '/snapshot/load', { snapshot_path: snap.snapshot_path, mem_file_path: snap.mem_file_path }],
    ] as const) {
      expect(fault(await vmm.api(method, path, body))).toBe(POST_BOOT);
    }
    const guest = { host: '127.0.0.1', port: guestPort };
    expect((await httpRequest(guest, 'GET', '/health')).status).toBe(204);
    expect((await httpRequest(guest, 'POST', '/init', { envVars: { FOO: 'bar' } })).status).toBe(204);
    const metrics = (await httpRequest(guest, 'GET', '/metrics')).body as Record<string, number>;
    expect(metrics).toMatchObject({ cpu_count: 2, mem_total_mib: 16, mem_used_mib: 16 });
    expect(Object.keys(metrics).sort()).toEqual(['cpu_count', 'cpu_used_pct', 'mem_total_mib', 'mem_used_mib', 'ts']);

    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    expect((await vmm.api('GET', '/')).body).toMatchObject({ state: 'Paused' });
    // Firecracker ≥ 1.13 takes a Diff without dirty tracking too: every page present in memory.
    const diffPaths = { snapshot_path: join(dir, 'cold-diff.snap'), mem_file_path: join(dir, 'cold-diff.mem') };
    await vmm.ok('PUT', '/snapshot/create', { ...diffPaths, snapshot_type: 'Diff' });
    await vmm.ok('PUT', '/snapshot/create', { ...snap, snapshot_type: 'Full' });
    expect(readFileSync(diffPaths.mem_file_path).equals(readFileSync(snap.mem_file_path))).toBe(true);
    const snapfile = decodeSnapfile(readFileSync(snap.snapshot_path));
    expect(snapfile).toMatchObject({ memSizeMib: 16, vcpuCount: 2, envVars: { FOO: 'bar' } });
    expect(snapfile.drives[0]).toMatchObject({ driveId: 'rootfs', pathOnHost: join(dir, 'rootfs.ext4') });
    expect(snapfile.networkInterfaces[0]).toMatchObject({ ifaceId: 'eth0', hostDevName: 'tap0' });
    // The memory file is the boot image, byte for byte, as the test predicts it.
    const mem = readFileSync(snap.mem_file_path);
    expect(mem.length).toBe(16 * 1024 * 1024);
    // Zero pages are left as holes (they read back as the zeros they are).
    expect(statSync(snap.mem_file_path).blocks * 512).toBeLessThan(15 * 1024 * 1024);
    const seed = bootSeed({ vcpuCount: 2, memSizeMib: 16 });
    const page = new Uint8Array(4096);
    for (let i = 0; i < 4096; i += 97) {
      bootImagePage(seed, i, page);
      expect(mem.subarray(i * 4096, (i + 1) * 4096).equals(page)).toBe(true);
    }
  });

  it('writes only the pages written since the last diff snapshot', async () => {
    const { vmm, guestPort } = await start();
    await coldBoot(vmm, 8, true);
    const guest = { host: '127.0.0.1', port: guestPort };
    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    const first = { snapshot_type: 'Diff', snapshot_path: join(dir, 'd1.snap'), mem_file_path: join(dir, 'd1.mem') };
    await vmm.ok('PUT', '/snapshot/create', first);
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    expect(
      (
        await httpRequest(guest, 'POST', '/_test/memory/write', {
          offset: 5 * 4096 + 100,
          pattern: 'c0ffee',
          length: 30,
        })
      ).status,
    ).toBe(204);
    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    const second = { snapshot_type: 'Diff', snapshot_path: join(dir, 'd2.snap'), mem_file_path: join(dir, 'd2.mem') };
    await vmm.ok('PUT', '/snapshot/create', second);
    const seed = bootSeed({ vcpuCount: 2, memSizeMib: 8 });
    const page = new Uint8Array(4096);
    // The first diff after boot holds every page (all were written by the boot).
    const d1 = readFileSync(first.mem_file_path);
    bootImagePage(seed, 9, page);
    expect(d1.subarray(9 * 4096, 10 * 4096).equals(page)).toBe(true);
    // The second holds page 5 only: the rest of the file is holes.
    const d2 = readFileSync(second.mem_file_path);
    expect(d2.length).toBe(8 * 1024 * 1024);
    expect(statSync(second.mem_file_path).blocks * 512).toBeLessThanOrEqual(8192);
    bootImagePage(seed, 5, page);
    Buffer.from(page.buffer, page.byteOffset, page.length).fill(Buffer.from('c0ffee', 'hex'), 100, 130);
    expect(d2.subarray(5 * 4096, 6 * 4096).equals(page)).toBe(true);
    bootImagePage(seed, 9, page);
    expect(page.some((b) => b !== 0)).toBe(true);
    expect(d2.subarray(9 * 4096, 10 * 4096).every((b) => b === 0)).toBe(true);
  });

  it('loads a snapshot with the File backend, paused until resumed, with the same memory and disk', async () => {
    const a = await start();
    await coldBoot(a.vmm, 16);
    const guestA = { host: '127.0.0.1', port: a.guestPort };
    await httpRequest(guestA, 'POST', '/_test/memory/write', {
      offset: 1234567,
      dataBase64: Buffer.from('hello guest memory').toString('base64'),
    });
    await httpRequest(guestA, 'POST', '/_test/disk/write', { offset: 8192, pattern: '5a', length: 4096 });
    const before = (await httpRequest(guestA, 'GET', `/_test/memory/hash?offset=0&length=${16 << 20}`)).body;
    await a.vmm.ok('PATCH', '/vm', { state: 'Paused' });
    const snap = { snapshot_path: join(dir, 'file.snap'), mem_file_path: join(dir, 'file.mem') };
    await a.vmm.ok('PUT', '/snapshot/create', snap);
    expect(await a.vmm.stop()).toBe(0);

    const b = await start();
    await b.vmm.ok('PUT', '/snapshot/load', {
      snapshot_path: snap.snapshot_path,
      mem_backend: { backend_type: 'File', backend_path: snap.mem_file_path },
      enable_diff_snapshots: false,
      resume_vm: false,
    });
    expect((await b.vmm.api('GET', '/')).body).toMatchObject({ state: 'Paused' });
    await b.vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    const guestB = { host: '127.0.0.1', port: b.guestPort };
    expect((await httpRequest(guestB, 'GET', `/_test/memory/hash?offset=0&length=${16 << 20}`)).body).toEqual(before);
    const disk = await httpRequest(guestB, 'GET', '/_test/disk/hash?offset=8192&length=4096');
    expect((disk.body as { sha256: string }).sha256).toBe(
      (await import('node:crypto')).createHash('sha256').update(Buffer.alloc(4096, 0x5a)).digest('hex'),
    );
  });

  it('holds guest requests while paused and answers them after resume', async () => {
    const { vmm, guestPort } = await start();
    await coldBoot(vmm, 8);
    const guest = { host: '127.0.0.1', port: guestPort };
    await vmm.ok('PATCH', '/vm', { state: 'Paused' });
    // A frozen guest does not answer; the request is still there when it thaws.
    await expect(httpRequest(guest, 'GET', '/health', undefined, 500)).rejects.toThrow(/timed out/);
    const held = httpRequest(guest, 'GET', '/_test/memory/hash?offset=0&length=4096');
    await vmm.ok('PATCH', '/vm', { state: 'Resumed' });
    expect((await held).status).toBe(200);
    expect((await httpRequest(guest, 'GET', '/health')).status).toBe(204);
    const noDrive = await httpRequest(guest, 'GET', '/_test/disk/hash?offset=0&length=1&drive=nope');
    expect(noDrive.status).toBe(400);
    const pastEnd = await httpRequest(guest, 'GET', `/_test/memory/read?offset=${8 << 20}&length=1`);
    expect(pastEnd.status).toBe(400);
    expect(
      (await httpRequest(guest, 'POST', '/_test/memory/write', { offset: 0, pattern: 'xyz', length: 3 })).status,
    ).toBe(400);
  });

  it('gives back everything a failed start took, and can start afterwards', async () => {
    // With --share-memfd the guest memory is a memfd: its mapping and fd are easy to spot.
    const { vmm } = await start(['--share-memfd']);
    const { createServer } = await import('node:net');
    // A drive that is an NBD socket whose server hangs up at once: the start fails after the
    // guest memory (64 MiB, a vCPU thread) was already set up.
    const sockPath = join(dir, 'hangup-nbd.sock');
    const hangup = createServer((c) => c.destroy());
    await new Promise<void>((r) => hangup.listen(sockPath, r));
    try {
      const before = holdingsOf(vmm.pid);
      await vmm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
      await vmm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64 });
      await vmm.ok('PUT', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: sockPath, is_root_device: true });
      const failed = await vmm.api('PUT', '/actions', { action_type: 'InstanceStart' });
      expect(failed.status).toBe(400);
      expect(fault(failed)).toMatch(/^Start microvm error: .*VirtioBlock: Error manipulating the backing file: /);
      expect(guestMemfd(vmm.pid)).toEqual([]);
      expect(holdingsOf(vmm.pid).fds.length).toBeLessThanOrEqual(before.fds.length);
      expect((await vmm.api('GET', '/')).body).toMatchObject({ state: 'Not started' });
      await vmm.ok('PUT', '/drives/rootfs', {
        drive_id: 'rootfs',
        path_on_host: join(dir, 'rootfs.ext4'),
        is_root_device: true,
      });
      await vmm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
      expect((await vmm.api('GET', '/')).body).toMatchObject({ state: 'Running' });
      expect(guestMemfd(vmm.pid).length).toBe(2);
    } finally {
      hangup.close();
    }
  });

  it('treats a failed load as fatal: answers 400, then exits', async () => {
    const { vmm } = await start();
    const reply = await vmm.api('PUT', '/snapshot/load', {
      snapshot_path: join(dir, 'no-such.snap'),
      mem_backend: { backend_type: 'Uffd', backend_path: join(dir, 'no-such.sock') },
    });
    expect(reply.status).toBe(400);
    expect(fault(reply)).toBe(
      'Load snapshot error: Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: No such file or directory (os error 2)',
    );
    expect(await vmm.exited).toBe(1);
  });

  it('names the uffd socket it could not reach', async () => {
    const a = await start();
    await coldBoot(a.vmm, 8);
    await a.vmm.ok('PATCH', '/vm', { state: 'Paused' });
    const snap = { snapshot_path: join(dir, 'u.snap'), mem_file_path: join(dir, 'u.mem') };
    await a.vmm.ok('PUT', '/snapshot/create', snap);
    const { vmm } = await start();
    const reply = await vmm.api('PUT', '/snapshot/load', {
      snapshot_path: snap.snapshot_path,
      mem_backend: { backend_type: 'Uffd', backend_path: join(dir, 'nobody-listens.sock') },
    });
    expect(fault(reply)).toMatch(
      /^Load snapshot error: Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from uffd: Failed to connect to UDS Unix stream: /,
    );
    expect(await vmm.exited).toBe(1);
  });
});
