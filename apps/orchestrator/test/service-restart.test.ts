import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, readFile, rmdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { NodeDriver } from './node-driver.js';
import { missingPieces, NodeUnderTest } from './node-under-test.js';

/*
 * issue 9's "independent restarts": with sandboxes running, block-server or uffd-server alone
 * is stopped (SIGTERM, as Nomad would, or SIGKILL) and started again. block-server keeps its
 * devices and the VMM's drive reconnects: the sandbox stays usable, byte for byte. uffd-server
 * takes each sandbox's userfaultfd back from its VMM (which keeps it open, as Firecracker does)
 * and serves on; faults raised while it is down wait. One that stays down has its sandboxes
 * failed (`failed` event) and everything they held given back. Driven through SandboxService;
 * guests reached through vmm-sim's endpoints.
 */

const missing = missingPieces();
if (missing) console.warn(`service restart suite skipped: missing ${missing}`);

let node: NodeUnderTest;
let d: NodeDriver;

beforeAll(async () => {
  if (missing) return;
  d = await NodeDriver.start({ tag: 'r' });
  node = d.node;
}, 180_000);

afterAll(() => d?.stop(), 120_000);

describe.skipIf(missing !== undefined)('independent restarts (all five services + vmm-sim)', () => {
  it('dns SIGKILL and start: running sandboxes get their names back, a paused one does not', async () => {
    const kept = 'dns-kept';
    const paused = 'dns-paused';
    const ip = await d.create(kept);
    const pausedIp = await d.create(paused);
    await node.restartService('dns', 'SIGKILL');
    await d.pause(paused, crypto.randomUUID());
    // dns keeps records in memory: the orchestrator puts back those of running sandboxes.
    const records = await eventually(
      async () => {
        const now = (await node.footprint())['dns']!;
        expect(now).toContain(`${kept}=${ip}`);
        return now;
      },
      { timeoutMs: 20_000, intervalMs: 250 },
    );
    expect(records).not.toContain(`${paused}=${pausedIp}`);
    await d.remove(kept);
    expect((await node.footprint())['dns']).not.toContain(`${kept}=${ip}`);
  });

  it('block-server SIGTERM and start: the sandbox keeps its disk and memory, goes on writing, pauses and resumes', async () => {
    const id = 'blk-term';
    const ip = await d.create(id);
    const disk = randomBytes(64 * 1024);
    const mem = randomBytes(16 * 1024);
    await node.writeDisk(ip, 1024 * 1024, disk);
    await node.writeMemory(ip, 3 * 1024 * 1024, mem);

    await node.restartService('block-server', 'SIGTERM');

    expect((await node.readDisk(ip, 1024 * 1024, disk.length)).equals(disk), 'disk written before').toBe(true);
    const later = randomBytes(32 * 1024);
    await node.writeDisk(ip, 5 * 1024 * 1024, later);
    expect((await node.readDisk(ip, 5 * 1024 * 1024, later.length)).equals(later), 'disk written after').toBe(true);
    expect((await node.readMemory(ip, 3 * 1024 * 1024, mem.length)).equals(mem), 'memory').toBe(true);
    expect(await d.listIds()).toContain(id);

    // The restarted block-server exports the reopened device: the pause captures both writes.
    const buildId = crypto.randomUUID();
    await d.pause(id, buildId);
    const ip2 = await d.create(id, { snapshot: true, buildId });
    expect((await node.readDisk(ip2, 1024 * 1024, disk.length)).equals(disk)).toBe(true);
    expect((await node.readDisk(ip2, 5 * 1024 * 1024, later.length)).equals(later)).toBe(true);
    expect((await node.readMemory(ip2, 3 * 1024 * 1024, mem.length)).equals(mem)).toBe(true);
    await d.remove(id);
    expect(await d.eventTypes(id)).toEqual(['created', 'paused', 'resumed', 'killed']);
    await d.expectFootprintBack();
  });

  it('block-server SIGKILL: a read sent while it is down completes once it is back; flushed writes survive', async () => {
    const ids = ['blk-kill-1', 'blk-kill-2'];
    const ips = await Promise.all(ids.map((id) => d.create(id)));
    const data = ids.map(() => randomBytes(48 * 1024));
    await Promise.all(ips.map((ip, i) => node.writeDisk(ip, 2 * 1024 * 1024, data[i]!)));

    await node.restartService('block-server', 'SIGKILL', false);
    // Sent into the outage: the drive waits for the server, as the kernel's nbd client would.
    const waiting = node.readDisk(ips[0]!, 2 * 1024 * 1024, data[0]!.length);
    // The VMM says so when a request finds the connection gone; only then is the read waiting.
    const vmmLog = join(node.dataDir, 'sandboxes', ids[0]!, 'vmm.stdout.log');
    await eventually(async () => (await readFile(vmmLog, 'utf8')).includes('NBD connection lost; reconnecting'), {
      timeoutMs: 20_000,
      what: 'the drive to wait for block-server',
    });
    await node.startService('block-server');

    expect((await waiting).equals(data[0]!), 'read sent during the outage').toBe(true);
    for (const [i, ip] of ips.entries()) {
      expect((await node.readDisk(ip, 2 * 1024 * 1024, data[i]!.length)).equals(data[i]!), ids[i]).toBe(true);
      const more = randomBytes(8192);
      await node.writeDisk(ip, 7 * 1024 * 1024, more);
      expect((await node.readDisk(ip, 7 * 1024 * 1024, more.length)).equals(more)).toBe(true);
    }
    expect(await d.listIds()).toEqual(expect.arrayContaining(ids));
    for (const id of ids) {
      await d.remove(id);
      expect(await d.eventTypes(id)).toEqual(['created', 'killed']);
    }
    await d.expectFootprintBack();
  });

  it('uffd-server SIGTERM and start: its sandboxes are taken back and served on; new ones run', async () => {
    const ids = ['mem-term-1', 'mem-term-2'];
    const ips = await Promise.all(ids.map((id) => d.create(id)));
    const before = ips.map(() => randomBytes(4096));
    await Promise.all(ips.map((ip, i) => node.writeMemory(ip, 0, before[i]!)));

    await node.restartService('uffd-server', 'SIGTERM');
    for (const [i, ip] of ips.entries()) {
      // A page never touched before the restart: its fault is served by the new process.
      const after = randomBytes(8192);
      await node.writeMemory(ip, 9 * 1024 * 1024, after);
      expect((await node.readMemory(ip, 0, 4096)).equals(before[i]!), 'written before').toBe(true);
      expect((await node.readMemory(ip, 9 * 1024 * 1024, after.length)).equals(after), 'written after').toBe(true);
    }
    expect(node.logs('uffd-server').join('\n')).toMatch(/sandbox taken back after a restart/);
    await Promise.all(ids.map((id) => d.remove(id)));
    for (const id of ids) expect(await d.eventTypes(id)).toEqual(['created', 'killed']);
    await d.expectFootprintBack();

    const ip = await d.create('mem-after');
    const mem = randomBytes(8192);
    await node.writeMemory(ip, 6 * 1024 * 1024, mem);
    expect((await node.readMemory(ip, 6 * 1024 * 1024, mem.length)).equals(mem)).toBe(true);
    await d.remove('mem-after');
  });

  it('orchestrator killed the way Nomad stops a task (every process in its cgroup): VMMs, in cgroups of their own, live on and are adopted', async ({
    skip,
  }) => {
    const mount = (await readFile('/proc/mounts', 'utf8'))
      .split('\n')
      .map((l) => l.split(' '))
      .find((f) => f[2] === 'cgroup2')?.[1];
    if (!mount) skip('no cgroup v2 mount');
    // Nomad runs each task in a cgroup of its own and stops it by killing everything in it.
    const task = join(mount!, `sbx-test-task-${process.pid}`);
    await mkdir(task);
    try {
      await writeFile(join(task, 'cgroup.procs'), String(await node.orchestratorPid()));
      const id = 'cg-kept';
      const vmmsBefore = new Set((await node.vmmPids()).map((p) => p.pid));
      const ip = await d.create(id);
      const vmm = (await node.vmmPids()).find((p) => !vmmsBefore.has(p.pid))!.pid;
      const mem = randomBytes(16 * 1024);
      await node.writeMemory(ip, 2 * 1024 * 1024, mem);
      const vmmCgroup = (await readFile(`/proc/${vmm}/cgroup`, 'utf8')).split('\n').find((l) => l.startsWith('0::'));
      expect(vmmCgroup).toMatch(/^0::\/sbx-vmm\//);

      await writeFile(join(task, 'cgroup.kill'), '1');
      await eventually(async () => expect((await readFile(join(task, 'cgroup.procs'), 'utf8')).trim()).toBe(''), {
        timeoutMs: 10_000,
      });
      expect(() => process.kill(vmm, 0), 'the VMM outlives the orchestrator task').not.toThrow();

      await node.killOrchestrator();
      await node.startOrchestrator();
      expect(await d.listIds()).toContain(id);
      expect((await node.readMemory(ip, 2 * 1024 * 1024, mem.length)).equals(mem), 'memory').toBe(true);
      await d.remove(id);
      await d.expectFootprintBack();
      // The VMM's own cgroup went with it.
      expect(existsSync(join(mount!, vmmCgroup!.slice(3)))).toBe(false);
    } finally {
      // Whatever a failed run left in the task's cgroup goes back to the root one, so it can go.
      for (const pid of (await readFile(join(task, 'cgroup.procs'), 'utf8').catch(() => '')).split('\n')) {
        if (pid) await writeFile(join(mount!, 'cgroup.procs'), pid).catch(() => undefined);
      }
      await rmdir(task).catch(() => undefined);
    }
  });

  it('net-agent SIGTERM and start, then SIGKILL and start: the sandbox keeps its network, stays usable, and is removed cleanly', async () => {
    const id = 'net-kept';
    const ip = await d.create(id);
    const mem = randomBytes(16 * 1024);
    // Reached at its host IP: through the slot's veth, NAT rules and the guest link.
    await node.writeMemory(ip, 1024 * 1024, mem);
    for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
      await node.restartService('net-agent', signal);
      expect((await node.readMemory(ip, 1024 * 1024, mem.length)).equals(mem), `after net-agent ${signal}`).toBe(true);
      expect(await d.listIds()).toContain(id);
      expect((await node.footprint())['slotsInUse']!.some((s) => s.endsWith(`:${id}`))).toBe(true);
    }
    await d.remove(id);
    await d.expectFootprintBack();
  });

  it('uffd-server SIGKILL under a sandbox that keeps touching memory, then start: it carries on; its pause resumes byte-exact', async () => {
    const id = 'mem-kill-back';
    const ip = await d.create(id);
    const chunk = 64 * 1024;
    // Each write lands on pages not served yet (256 KiB apart), so each one faults.
    const written: Array<{ offset: number; data: Buffer }> = [];
    let killed: Promise<void> | undefined;
    for (let i = 0; i < 16; i++) {
      const w = { offset: 4 * 1024 * 1024 + i * 256 * 1024, data: randomBytes(chunk) };
      // Writes 4.. are sent while the uffd-server is dead or starting: their faults wait.
      if (i === 4) killed = node.restartService('uffd-server', 'SIGKILL');
      await node.writeMemory(ip, w.offset, w.data);
      written.push(w);
    }
    await killed;
    for (const w of written)
      expect((await node.readMemory(ip, w.offset, chunk)).equals(w.data), `@${w.offset}`).toBe(true);
    expect(await d.listIds()).toContain(id);

    // The next pause exports a diff from the new process (default mode: the VMM's Diff snapshot).
    const buildId = crypto.randomUUID();
    await d.pause(id, buildId);
    const ip2 = await d.create(id, { snapshot: true, buildId });
    for (const w of written)
      expect((await node.readMemory(ip2, w.offset, chunk)).equals(w.data), `@${w.offset}`).toBe(true);
    await d.remove(id);
    expect(await d.eventTypes(id)).toEqual(['created', 'paused', 'resumed', 'killed']);
    await d.expectFootprintBack();
  });

  it('uffd-server SIGKILL, still down: its sandboxes are failed and cleaned up without it', async () => {
    const id = 'mem-kill';
    const ip = await d.create(id);
    await node.writeMemory(ip, 0, randomBytes(4096));

    await node.restartService('uffd-server', 'SIGKILL', false);
    await d.expectFailed([id], 'uffd-server');
    expect(await d.eventTypes(id)).toEqual(['created', 'failed']);
    // The VMM is gone while the uffd-server still is (the footprint needs it to answer).
    expect(await node.vmmProcesses()).toEqual(d.baseline['vmmProcesses']);

    await node.startService('uffd-server');
    await d.expectFootprintBack();
  });
});
