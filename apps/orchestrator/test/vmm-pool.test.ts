import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { eventually } from '#test-kit';
import { missingPieces, NodeUnderTest } from './node-under-test.js';
import { sandboxConfig } from './node-driver.js';

/*
 * The VMM pool (vmm-pool.ts) on a whole node: dns, net-agent, block-server, uffd-server, the
 * orchestrator and vmm-sim VMMs as real processes. Creates take a VMM that was started ahead
 * in a slot of its own; nothing of the pool may outlive a delete, a clean stop or a crash.
 */

const missing = missingPieces();
if (missing) console.warn(`vmm pool suite skipped: missing ${missing}`);

const POOL = 2;
let node: NodeUnderTest;

beforeAll(async () => {
  if (missing) return;
  node = await NodeUnderTest.start({ tag: 'p', vmmPoolSize: POOL });
}, 180_000);

afterAll(async () => {
  await node?.stop();
}, 120_000);

async function create(id: string, extra: Partial<SandboxConfig> = {}): Promise<string> {
  await unary(
    node.client,
    node.client.create,
    { sandbox: sandboxConfig(id, extra), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
    120_000,
  );
  const record = (await node.footprint())['dns']!.find((r) => r.startsWith(`${id}=`));
  return record!.split('=')[1]!;
}

const remove = (id: string) => unary(node.client, node.client.delete, { sandboxId: id }, 60_000);

/** The steps of the orchestrator's last 'sandbox created' line for `id`. */
function createSteps(id: string): string[] {
  const line = node
    .logs('orchestrator')
    .reverse()
    .find((l) => l.includes('"sandbox created"') && l.includes(`"sandboxId":"${id}"`));
  return Object.keys((JSON.parse(line!) as { steps: Record<string, number> }).steps);
}

/** What the sandboxes' state files say they hold: a sandbox keeps the socket and slot its pooled VMM came with. */
async function sandboxHoldings(): Promise<{ sockets: string[]; slots: string[] }> {
  const dir = join(node.dataDir, 'sandboxes');
  const states = await Promise.all(
    (await readdir(dir).catch(() => [] as string[])).map(
      async (id) =>
        JSON.parse(await readFile(join(dir, id, 'state.json'), 'utf8').catch(() => '{}')) as {
          vmm?: { apiSocket: string };
          slot?: { idx: number; sandboxId: string };
        },
    ),
  );
  return {
    sockets: states.flatMap((s) => (s.vmm ? [s.vmm.apiSocket] : [])),
    slots: states.flatMap((s) => (s.slot ? [`${s.slot.idx}:${s.slot.sandboxId}`] : [])),
  };
}

/** VMMs waiting in the pool: started by it, held by no sandbox. */
async function pooledVmms(): Promise<string[]> {
  const held = (await sandboxHoldings()).sockets;
  return (await node.vmmProcesses()).filter((s) => s.includes('/vmm-pool-') && !held.includes(s));
}

async function pooledSlots(): Promise<string[]> {
  const held = (await sandboxHoldings()).slots;
  return (await node.footprint())['slotsInUse']!.filter((s) => s.includes(':vmm-pool-') && !held.includes(s));
}

async function poolFull(): Promise<void> {
  // Waiting means listening: a VMM process just started has not made its API socket yet.
  const waiting = async () => {
    const vmms = await pooledVmms();
    return vmms.length === POOL && vmms.every((socket) => existsSync(socket));
  };
  await eventually(async () => (await waiting()) && (await pooledSlots()).length === POOL, {
    timeoutMs: 60_000,
    what: `${POOL} VMMs waiting in the pool on their API sockets, each in a slot`,
  }).catch((err: unknown) => {
    console.warn(
      node
        .logs('orchestrator')
        .filter((l) => !l.includes('vmm-stdout'))
        .slice(-15)
        .join('\n'),
    );
    throw err;
  });
}

describe.skipIf(missing !== undefined)('VMM pool', () => {
  it('a create takes a waiting VMM (slot and rootfs link included); the guest works; the pool refills', async () => {
    await poolFull();
    const waiting = await pooledVmms();
    const ip = await create('pool-a');
    expect(createSteps('pool-a').some((s) => s.startsWith('take pooled vmm'))).toBe(true);
    expect(createSteps('pool-a')).not.toContain('start vmm');
    // Its VMM is one that was waiting: the sandbox's process is one of those sockets.
    const fp = await node.footprint();
    expect(fp['vmmProcesses']!.filter((s) => waiting.includes(s)).length).toBe(POOL);
    // The disk is reached through the rootfs link made in the VMM's own mount namespace.
    const mem = randomBytes(16 * 1024);
    const disk = randomBytes(8192);
    await node.writeMemory(ip, 1024 * 1024, mem);
    await node.writeDisk(ip, 4096, disk);
    expect((await node.readDisk(ip, 4096, disk.length)).equals(disk)).toBe(true);
    // Pause and resume: the resumed sandbox takes a pooled VMM too, and has its bytes.
    const build = crypto.randomUUID();
    await unary(node.client, node.client.pause, { sandboxId: 'pool-a', templateId: 'base', buildId: build }, 120_000);
    await poolFull();
    const ip2 = await create('pool-a', { snapshot: true, buildId: build });
    expect(createSteps('pool-a').some((s) => s.startsWith('take pooled vmm'))).toBe(true);
    expect((await node.readMemory(ip2, 1024 * 1024, mem.length)).equals(mem)).toBe(true);
    expect((await node.readDisk(ip2, 4096, disk.length)).equals(disk)).toBe(true);
    // The VMM's log went to the sandbox's directory with it.
    expect(await readdir(join(node.dataDir, 'sandboxes', 'pool-a'))).toContain('vmm.stdout.log');
    await remove('pool-a');
    await poolFull();
  }, 240_000);

  it('delete leaves nothing behind but a full pool', async () => {
    await create('warm-p');
    await remove('warm-p');
    await poolFull();
    const before = await node.footprint();
    await create('gone-p');
    await remove('gone-p');
    await poolFull();
    const after = await node.footprint();
    for (const key of ['devices', 'uffd', 'dns', 'sandboxDirs']) expect(after[key], key).toEqual(before[key]);
    // A log tail's read holds a file for a moment: the fds settle back.
    await eventually(async () => expect(await node.orchestratorFds()).toEqual(before['orchestratorFds']), {
      timeoutMs: 10_000,
      what: 'the orchestrator fds back to before',
    });
    // The pool's members changed (one was taken): count them instead of naming them.
    for (const key of ['slotsInUse', 'vmmProcesses', 'sockets'])
      expect(after[key]!.length, key).toBe(before[key]!.length);
    expect(await readdir(join(node.dataDir, 'vmm-pool'))).toHaveLength(2 * POOL);
  }, 240_000);

  it('kill -9 of the orchestrator: the sandbox is adopted, the old pool is given back, a new one fills', async () => {
    await poolFull();
    const ip = await create('pool-live');
    const data = randomBytes(8192);
    await node.writeMemory(ip, 2 * 1024 * 1024, data);
    await poolFull();
    const oldPool = await pooledVmms();
    const sandboxVmm = (await sandboxHoldings()).sockets;
    expect(sandboxVmm).toHaveLength(1);
    expect(sandboxVmm[0]).toContain('/vmm-pool-');
    await node.killOrchestrator();
    await node.startOrchestrator();
    expect((await unary(node.client, node.client.list, {}, 10_000)).sandboxes.map((s) => s.config!.sandboxId)).toEqual([
      'pool-live',
    ]);
    await poolFull();
    const vmms = await node.vmmProcesses();
    for (const s of oldPool) expect(vmms).not.toContain(s);
    expect(vmms).toContain(sandboxVmm[0]);
    expect(vmms).toHaveLength(POOL + 1);
    // One slot for the sandbox (still under the pool's owner name it came with) and the pool's.
    expect((await node.footprint())['slotsInUse']).toHaveLength(POOL + 1);
    expect((await node.readMemory(ip, 2 * 1024 * 1024, data.length)).equals(data)).toBe(true);
    await remove('pool-live');
    await poolFull();
  }, 240_000);

  it('a clean stop of the orchestrator leaves no VMM, slot, socket or log file of the pool', async () => {
    await poolFull();
    const orchestrator = node.services.get('orchestrator')!;
    await orchestrator.stop();
    node.services.delete('orchestrator');
    const fp = await node.footprint();
    expect(fp['vmmProcesses']).toEqual([]);
    expect(fp['slotsInUse']).toEqual([]);
    expect(fp['sockets']).toEqual([]);
    expect(await readdir(join(node.dataDir, 'vmm-pool'))).toEqual([]);
    // The next run starts with a full pool again.
    await node.startOrchestrator();
    await poolFull();
  }, 240_000);
});
