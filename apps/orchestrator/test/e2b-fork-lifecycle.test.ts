import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { missingPieces, NodeUnderTest } from './node-under-test.js';
import { sandboxConfig } from './node-driver.js';

/*
 * The end-to-end lifecycle with the VMM double in E2B's Firecracker-fork mode (uffd
 * write-protect, WP_ASYNC): the uffd-server tracks written pages itself and the pause exports
 * exactly those. orchestrator-e2e.test.ts runs the same chain with the double's default,
 * upstream Firecracker (no write-protect: the written pages come from Firecracker's Diff).
 */

const missing = missingPieces();
if (missing) console.warn(`E2B-fork lifecycle suite skipped: missing ${missing}`);

let node: NodeUnderTest;

beforeAll(async () => {
  if (missing) return;
  // The orchestrator (and so every VMM it starts) inherits this test process's environment;
  // vitest runs each test file in its own process.
  process.env['SBX_VMM_SIM_E2B_FORK_WRITE_PROTECT'] = 'async';
  node = await NodeUnderTest.start({ tag: 'f' });
}, 180_000);

afterAll(async () => {
  await node?.stop();
  delete process.env['SBX_VMM_SIM_E2B_FORK_WRITE_PROTECT'];
}, 120_000);

async function create(id: string, buildId = ''): Promise<string> {
  await unary(
    node.client,
    node.client.create,
    {
      sandbox: sandboxConfig(id, { buildId, snapshot: buildId !== '' }),
      startTime: new Date(),
      endTime: new Date(Date.now() + 3_600_000),
    },
    120_000,
  );
  const record = (await node.footprint())['dns']!.find((r) => r.startsWith(`${id}=`));
  return record?.split('=')[1] ?? '';
}

function pausedMemoryDiffs(id: string): { tracking: string; pages: number }[] {
  return node
    .logs('orchestrator')
    .filter((l) => l.includes('"msg":"sandbox paused"') && l.includes(`"sandboxId":"${id}"`))
    .map((l) => (JSON.parse(l) as { memoryDiff: { tracking: string; pages: number } }).memoryDiff);
}

describe.skipIf(missing !== undefined)('orchestrator end to end, VMM double as E2B’s Firecracker fork', () => {
  it('create, write, pause, resume byte for byte through three generations, diffs from uffd write-protect', async () => {
    const id = 'fork-1';
    let ip = await create(id);
    const writes: { offset: number; data: Buffer }[] = [];
    for (let gen = 1; gen <= 3; gen++) {
      const batch = [
        { offset: gen * 1024 * 1024, data: randomBytes(64 * 1024) },
        { offset: 12345, data: randomBytes(3000) },
      ];
      for (const w of batch) await node.writeMemory(ip, w.offset, w.data);
      writes.push(...batch);
      const disk = randomBytes(8192);
      await node.writeDisk(ip, gen * 65536, disk);
      const buildId = crypto.randomUUID();
      await unary(node.client, node.client.pause, { sandboxId: id, templateId: 'base', buildId }, 120_000);
      ip = await create(id, buildId);
      // Every write so far, the latest one winning where they overlap.
      const memory = new Map<number, Buffer>();
      for (const w of writes) memory.set(w.offset, w.data);
      for (const [offset, data] of memory)
        expect((await node.readMemory(ip, offset, data.length)).equals(data)).toBe(true);
      expect((await node.readDisk(ip, gen * 65536, disk.length)).equals(disk)).toBe(true);
    }
    const diffs = pausedMemoryDiffs(id);
    expect(diffs).toHaveLength(3);
    for (const d of diffs) {
      expect(d.tracking).toBe('wp-async');
      // 16 + 1 pages written by the guest and the page the VMM writes at load.
      expect(d.pages).toBeGreaterThanOrEqual(17);
      expect(d.pages).toBeLessThanOrEqual(20);
    }
    await unary(node.client, node.client.delete, { sandboxId: id }, 60_000);
  });

  it('uffd-server SIGKILL and start: the pages written before it stay tracked (page tables), the pause exports them', async () => {
    const id = 'fork-restart';
    const ip = await create(id);
    const before = { offset: 2 * 1024 * 1024, data: randomBytes(64 * 1024) };
    await node.writeMemory(ip, before.offset, before.data);
    // Read-only pages served before the kill: present, not written, so not in the diff.
    await node.readMemory(ip, 5 * 1024 * 1024, 64 * 1024);

    await node.restartService('uffd-server', 'SIGKILL');
    const after = { offset: 7 * 1024 * 1024, data: randomBytes(32 * 1024) };
    await node.writeMemory(ip, after.offset, after.data);

    const buildId = crypto.randomUUID();
    await unary(node.client, node.client.pause, { sandboxId: id, templateId: 'base', buildId }, 120_000);
    const ip2 = await create(id, buildId);
    for (const w of [before, after])
      expect((await node.readMemory(ip2, w.offset, w.data.length)).equals(w.data)).toBe(true);
    const [diff] = pausedMemoryDiffs(id);
    expect(diff!.tracking).toBe('wp-async');
    // 16 + 8 written pages and the VMM's load write; the 16 pages only read stay out.
    expect(diff!.pages).toBeGreaterThanOrEqual(24);
    expect(diff!.pages).toBeLessThanOrEqual(28);
    await unary(node.client, node.client.delete, { sandboxId: id }, 60_000);
  });
});
