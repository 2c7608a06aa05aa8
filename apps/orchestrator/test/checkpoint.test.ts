import { randomBytes, randomUUID } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { UffdServerClient } from '#proto/sbx/uffd';
import { decodeHeader } from '#storage';
import { NodeDriver } from './node-driver.js';
import { missingPieces } from './node-under-test.js';

/*
 * Checkpoint over a whole node (real uffd-server, block-server, net-agent, dns, the VMM double):
 * the sandbox keeps running on the same VMM with its memory and disk as they were, the build is
 * in the bucket when the call answers, it resumes byte-exact as another sandbox, and the next
 * checkpoint holds only what changed since the last one.
 */

const missing = missingPieces();
const MiB = 1 << 20;

describe.skipIf(missing !== undefined)('Checkpoint', () => {
  let d: NodeDriver;

  beforeAll(async () => {
    d = await NodeDriver.start({ tag: 'ckpt', sampleMemoryMb: 16 });
  }, 240_000);

  afterAll(async () => {
    await d?.stop();
  }, 120_000);

  const checkpoint = (sandboxId: string, buildId: string) =>
    unary(d.node.client, d.node.client.checkpoint, { sandboxId, buildId }, 120_000);

  async function faultsOf(sandboxId: string): Promise<number> {
    const c = dial(UffdServerClient, d.node.sockets.uffd);
    try {
      return (await unary(c, c.stats, { sandboxId }, 5000)).faults;
    } finally {
      c.close();
    }
  }

  /** Guest memory the build itself stores (its own layer), from its header in the node's build cache. */
  async function ownMemory(buildId: string) {
    const header = decodeHeader(await readFile(join(d.node.cacheDir, 'builds', buildId, 'memfile.header')));
    const own = header.mappings.filter((m) => m.buildId === buildId);
    const holds = (from: number, length: number) =>
      own.some((m) => m.offset < from + length && from < m.offset + m.length);
    return { bytes: own.reduce((n, m) => n + m.length, 0), holds };
  }

  /** Disk bytes the build itself stores (its own rootfs layer), from its header in the node's build cache. */
  async function ownDisk(buildId: string) {
    const header = decodeHeader(await readFile(join(d.node.cacheDir, 'builds', buildId, 'rootfs.ext4.header')));
    const own = header.mappings.filter((m) => m.buildId === buildId);
    const holds = (from: number, length: number) =>
      own.some((m) => m.offset <= from && from + length <= m.offset + m.length);
    return { bytes: own.reduce((n, m) => n + m.length, 0), holds };
  }

  /**
   * The rootfs export's counts from the orchestrator's pause/checkpoint log line. With dedup the
   * stored bytes are the same whether or not a checkpoint restarted disk tracking (blocks written
   * before it are found equal to it); what shows the restart is that they are not even compared.
   */
  function diskDiffLogged(sandboxId: string, buildId: string): { blocks: number; dedupedBlocks: number } | undefined {
    for (const line of d.node.logs('orchestrator')) {
      if (!line.includes(buildId) || !line.includes('"diskDiff"')) continue;
      const entry = JSON.parse(line) as { sandboxId?: string; buildId?: string; diskDiff?: Record<string, number> };
      if (entry.sandboxId === sandboxId && entry.buildId === buildId && entry.diskDiff) {
        return { blocks: entry.diskDiff['blocks']!, dedupedBlocks: entry.diskDiff['dedupedBlocks']! };
      }
    }
    return undefined;
  }

  it('keeps the sandbox running as it was; the uploaded build resumes byte-exact elsewhere', async () => {
    const ip = await d.create('ck-1');
    const memory = randomBytes(256 * 1024);
    const disk = randomBytes(64 * 1024);
    await d.node.writeMemory(ip, 4 * MiB, memory);
    await d.node.writeDisk(ip, 2 * MiB, disk);
    const diskEarly = randomBytes(16 * 1024); // written once, before the first checkpoint only
    await d.node.writeDisk(ip, 6 * MiB, diskEarly);
    const vmms = (await d.node.footprint())['vmmProcesses'];
    const faults = await faultsOf('ck-1');
    expect(faults).toBeGreaterThan(0);

    const first = randomUUID();
    await checkpoint('ck-1', first);

    // Uploaded when the call answers: the snapfile (written last) is in the bucket, with the
    // faults recorded since the resume (memfile.prefetch, as E2B records it at checkpoint).
    expect((await readdir(join(d.node.bucket, first))).sort()).toEqual(
      ['memfile', 'memfile.header', 'memfile.prefetch', 'rootfs.ext4', 'rootfs.ext4.header', 'snapfile'].sort(),
    );
    // The same sandbox on the same VMM process, memory and disk unchanged, counters going on.
    expect(await d.listIds()).toContain('ck-1');
    expect((await d.node.footprint())['vmmProcesses']).toEqual(vmms);
    expect((await d.node.readMemory(ip, 4 * MiB, memory.length)).equals(memory)).toBe(true);
    expect((await d.node.readDisk(ip, 2 * MiB, disk.length)).equals(disk)).toBe(true);
    expect(await faultsOf('ck-1')).toBeGreaterThanOrEqual(faults);
    expect(await d.eventTypes('ck-1')).toContain('checkpointed');

    // Written after the checkpoint: in the running sandbox only.
    const later = randomBytes(128 * 1024);
    await d.node.writeMemory(ip, 8 * MiB, later);
    await d.node.writeDisk(ip, 2 * MiB, Buffer.alloc(disk.length, 7));

    const copyIp = await d.create('ck-copy', { buildId: first, snapshot: true });
    expect((await d.node.readMemory(copyIp, 4 * MiB, memory.length)).equals(memory)).toBe(true);
    expect((await d.node.readDisk(copyIp, 2 * MiB, disk.length)).equals(disk)).toBe(true);
    expect((await d.node.readMemory(copyIp, 8 * MiB, later.length)).equals(later)).toBe(false);

    // Dirty tracking restarted: the second checkpoint stores what was written since the first
    // (the 128 KiB at 8 MiB, and the few pages the guest touches on its own), not the 256 KiB before.
    const second = randomUUID();
    await checkpoint('ck-1', second);
    const own = await ownMemory(second);
    expect(own.holds(8 * MiB, later.length)).toBe(true);
    expect(own.holds(4 * MiB, memory.length)).toBe(false);
    expect(own.bytes).toBeLessThan(memory.length + later.length);
    // Disk tracking restarted too: exactly the 64 KiB rewritten since the first checkpoint.
    const disk2 = await ownDisk(second);
    expect(disk2.bytes).toBe(disk.length);
    expect(disk2.holds(2 * MiB, disk.length)).toBe(true);
    expect(diskDiffLogged('ck-1', second)).toEqual({ blocks: disk.length / 4096, dedupedBlocks: 0 });
    const copy2Ip = await d.create('ck-copy2', { buildId: second, snapshot: true });
    expect((await d.node.readMemory(copy2Ip, 4 * MiB, memory.length)).equals(memory)).toBe(true);
    expect((await d.node.readMemory(copy2Ip, 8 * MiB, later.length)).equals(later)).toBe(true);

    // Pause after checkpoints: a diff over the last one, still exact; its disk diff holds
    // exactly what was written since the second checkpoint.
    const diskLater = randomBytes(8 * 1024);
    await d.node.writeDisk(ip, 3 * MiB, diskLater);
    const paused = randomUUID();
    await d.pause('ck-1', paused);
    const pausedDisk = await ownDisk(paused);
    expect(pausedDisk.bytes).toBe(diskLater.length);
    expect(pausedDisk.holds(3 * MiB, diskLater.length)).toBe(true);
    expect(diskDiffLogged('ck-1', paused)).toEqual({ blocks: diskLater.length / 4096, dedupedBlocks: 0 });
    const resumedIp = await d.create('ck-1', { buildId: paused, snapshot: true });
    expect((await d.node.readMemory(resumedIp, 4 * MiB, memory.length)).equals(memory)).toBe(true);
    expect((await d.node.readMemory(resumedIp, 8 * MiB, later.length)).equals(later)).toBe(true);
    expect((await d.node.readDisk(resumedIp, 2 * MiB, disk.length)).equals(Buffer.alloc(disk.length, 7))).toBe(true);
    expect((await d.node.readDisk(resumedIp, 3 * MiB, diskLater.length)).equals(diskLater)).toBe(true);
    expect((await d.node.readDisk(resumedIp, 6 * MiB, diskEarly.length)).equals(diskEarly)).toBe(true);

    for (const id of ['ck-1', 'ck-copy', 'ck-copy2']) await d.remove(id);
    await d.expectFootprintBack();
  }, 300_000);

  it('a pause that rewrites what its parent holds leaves those pages and disk blocks to the parent', async () => {
    const ip = await d.create('dd-1');
    const same = randomBytes(512 * 1024);
    await d.node.writeMemory(ip, 4 * MiB, same);
    const sameDisk = randomBytes(256 * 1024);
    await d.node.writeDisk(ip, 2 * MiB, sameDisk);
    const parent = randomUUID();
    await d.pause('dd-1', parent);
    const resumedIp = await d.create('dd-1', { buildId: parent, snapshot: true });
    await d.node.writeMemory(resumedIp, 4 * MiB, same); // identical bytes: written, not changed
    const changed = randomBytes(64 * 1024);
    await d.node.writeMemory(resumedIp, 8 * MiB, changed);
    await d.node.writeDisk(resumedIp, 2 * MiB, sameDisk); // identical disk bytes too
    const changedBlock = randomBytes(4096);
    await d.node.writeDisk(resumedIp, 5 * MiB, changedBlock);
    const child = randomUUID();
    await d.pause('dd-1', child);
    // Only the changed 4 KiB block is stored; the rewritten 256 KiB stay with the parent.
    const childDisk = await ownDisk(child);
    expect(childDisk.bytes).toBe(changedBlock.length);
    expect(childDisk.holds(5 * MiB, changedBlock.length)).toBe(true);
    expect(diskDiffLogged('dd-1', child)).toEqual({ blocks: 1, dedupedBlocks: sameDisk.length / 4096 });
    const own = await ownMemory(child);
    expect(own.holds(4 * MiB, same.length)).toBe(false);
    expect(own.holds(8 * MiB, changed.length)).toBe(true);
    const againIp = await d.create('dd-1', { buildId: child, snapshot: true });
    expect((await d.node.readMemory(againIp, 4 * MiB, same.length)).equals(same)).toBe(true);
    expect((await d.node.readMemory(againIp, 8 * MiB, changed.length)).equals(changed)).toBe(true);
    expect((await d.node.readDisk(againIp, 2 * MiB, sameDisk.length)).equals(sameDisk)).toBe(true);
    expect((await d.node.readDisk(againIp, 5 * MiB, changedBlock.length)).equals(changedBlock)).toBe(true);
    await d.remove('dd-1');
    await d.expectFootprintBack();
  }, 180_000);

  it('refuses a checkpoint of an unknown sandbox and into an existing build', async () => {
    const unknown = await checkpoint('ck-ghost', randomUUID()).catch((e: ServiceError) => e);
    expect((unknown as ServiceError).code).toBe(status.NOT_FOUND);
    await d.create('ck-2');
    const build = randomUUID();
    await checkpoint('ck-2', build);
    const again = await checkpoint('ck-2', build).catch((e: ServiceError) => e);
    expect((again as ServiceError).code).toBe(status.ALREADY_EXISTS);
    expect(await d.listIds()).toContain('ck-2');
    await d.remove('ck-2');
    await d.expectFootprintBack();
  }, 120_000);
});
