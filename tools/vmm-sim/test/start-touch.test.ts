import { randomBytes } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { fileExists, ServiceProcess } from '#test-kit';
import type { StartTouchReport } from '../src/envd-server.js';
import { parseStartTouch } from '../src/start-touch.js';
import { httpRequest, pickGuestPort, VmmSimProcess } from './vmm-sim-process.js';

// The double's start at resume (SBX_SIM_START_TOUCH): /init faults the working set in through
// the uffd peer before it answers. Served one page per fault (`uffd-server serve-file
// --prefetch-bytes 0`), exactly the touched pages become present, and the bytes the guest
// loaded are the memory file's.

const MEM_MIB = 64;
const MEM = MEM_MIB * 1024 * 1024;
const PAGE = 4096;

let dir: string;
const cleanup: (() => Promise<unknown>)[] = [];

beforeAll(() => {
  dir = mkdtempSync(join(tmpdir(), 'vmm-sim-start-touch-'));
  writeFileSync(join(dir, 'vmlinux'), 'no kernel');
});

afterEach(async () => {
  for (const step of cleanup.splice(0).reverse()) await step().catch(() => undefined);
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));

async function vmm(): Promise<{ vm: VmmSimProcess; guest: { host: string; port: number } }> {
  const port = pickGuestPort();
  const vm = await VmmSimProcess.start(join(dir, `fc-${port}.sock`), ['--guest-listen', `127.0.0.1:${port}`]);
  cleanup.push(() => vm.stop('SIGKILL'));
  return { vm, guest: { host: '127.0.0.1', port } };
}

/** A snapshot of a booted 64 MiB guest whose memory file is then made random (every page differs). */
async function snapshot(): Promise<{ snap: string; mem: Buffer; memPath: string }> {
  const a = await vmm();
  await a.vm.ok('PUT', '/boot-source', { kernel_image_path: join(dir, 'vmlinux') });
  await a.vm.ok('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
  await a.vm.ok('PUT', '/actions', { action_type: 'InstanceStart' });
  await a.vm.ok('PATCH', '/vm', { state: 'Paused' });
  const snap = join(dir, 'base.snap');
  const memPath = join(dir, 'base.mem');
  await a.vm.ok('PUT', '/snapshot/create', { snapshot_path: snap, mem_file_path: memPath });
  expect(await a.vm.stop()).toBe(0);
  const mem = randomBytes(MEM);
  writeFileSync(memPath, mem);
  return { snap, mem, memPath };
}

/** h = h * 31 + byte over the first byte of each page of the runs, in order (the double's checksum). */
function checksum(mem: Buffer, runs: Array<[number, number]>): number {
  let h = 0;
  for (const [offset, length] of runs)
    for (let at = offset; at < offset + length; at += PAGE) h = (Math.imul(h, 31) + mem[at]!) >>> 0;
  return h;
}

describe('touch at resume (SBX_SIM_START_TOUCH)', () => {
  it('faults exactly the working set in before /init answers, once per VMM process; a bad spec is a 400', async () => {
    const { snap, mem, memPath } = await snapshot();
    const sock = join(dir, 'uffd.sock');
    const uffd = await ServiceProcess.start({
      args: ['uffd-server', 'serve-file', '--memfile', memPath, '--socket', sock, '--prefetch-bytes', '0'],
      ready: fileExists(sock),
    });
    cleanup.push(() => uffd.stop('SIGKILL'));
    const b = await vmm();
    await b.vm.ok('PUT', '/snapshot/load', {
      snapshot_path: snap,
      mem_backend: { backend_type: 'Uffd', backend_path: sock },
      resume_vm: true,
    });
    expect((await httpRequest(b.guest, 'GET', '/_test/start')).body).toEqual({ touch: null });

    const bad = await httpRequest(b.guest, 'POST', '/init', { envVars: { SBX_SIM_START_TOUCH: '40:256-512' } });
    expect(bad.status).toBe(400);
    expect(bad.text).toContain("more than half of the guest's 64 MiB");

    const spec = '8:64-512:3';
    const init = await httpRequest(b.guest, 'POST', '/init', { envVars: { SBX_SIM_START_TOUCH: spec } });
    expect(init.status).toBe(204);
    const { runs, bytes } = parseStartTouch(spec, MEM, PAGE);
    const touch = (await httpRequest(b.guest, 'GET', '/_test/start')).body as { touch: StartTouchReport };
    expect(touch.touch).toMatchObject({
      spec,
      bytes: 8 * 1024 * 1024,
      pages: bytes / PAGE,
      runs: runs.length,
      checksum: checksum(mem, runs),
    });
    // One page per fault: what became present is the working set, no more, no less.
    expect(touch.touch.residentAfter - touch.touch.residentBefore).toBe(bytes);

    // The same VMM process does not start again: a second /init finds the start done.
    expect((await httpRequest(b.guest, 'POST', '/init', { envVars: {} })).status).toBe(204);
    expect((await httpRequest(b.guest, 'GET', '/_test/start')).body).toEqual(touch);
    // The env var is the guest's, kept for its next snapshot, like any /init env var.
    expect(
      ((await httpRequest(b.guest, 'GET', '/_test/env')).body as Record<string, string>)['SBX_SIM_START_TOUCH'],
    ).toBe(spec);
    expect(readFileSync(memPath).equals(mem)).toBe(true);
  });
});
