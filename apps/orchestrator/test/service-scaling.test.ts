import { randomBytes } from 'node:crypto';
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { BlockServerClient } from '#proto/sbx/block';
import { UffdServerClient } from '#proto/sbx/uffd';
import { NodeDriver } from './node-driver.js';
import { missingPieces, NodeUnderTest } from './node-under-test.js';

/*
 * issue 9's "independent scaling": two uffd-server and two block-server instances on one node.
 * Sandboxes are placed on the least loaded instance of each, and losing one instance's
 * sandboxes (its devices wiped, or its memory serving gone) fails those only: the sandboxes on
 * the other instances go on reading and writing byte for byte.
 */

const missing = missingPieces();
if (missing) console.warn(`service scaling suite skipped: missing ${missing}`);

let node: NodeUnderTest;
let d: NodeDriver;

beforeAll(async () => {
  if (missing) return;
  d = await NodeDriver.start({ tag: 's', uffdInstances: 2, blockInstances: 2 });
  node = d.node;
}, 180_000);

afterAll(() => d?.stop(), 120_000);

/** Which sandboxes each instance holds, from the instances' own List. */
async function holdings(service: 'uffd' | 'block'): Promise<string[][]> {
  if (service === 'uffd') {
    return Promise.all(
      node.uffdSockets.map(async (s) => {
        const c = dial(UffdServerClient, s);
        try {
          return (await unary(c, c.list, {}, 5000)).sandboxes.map((x) => x.sandboxId).sort();
        } finally {
          c.close();
        }
      }),
    );
  }
  return Promise.all(
    node.blockSockets.map(async (s) => {
      const c = dial(BlockServerClient, s);
      try {
        return (await unary(c, c.list, {}, 5000)).devices.map((x) => x.sandboxId).sort();
      } finally {
        c.close();
      }
    }),
  );
}

interface Guest {
  id: string;
  ip: string;
  mem: Buffer;
  disk: Buffer;
}

async function startGuest(id: string): Promise<Guest> {
  const ip = await d.create(id);
  const g = { id, ip, mem: randomBytes(16 * 1024), disk: randomBytes(32 * 1024) };
  await node.writeMemory(ip, 2 * 1024 * 1024, g.mem);
  await node.writeDisk(ip, 3 * 1024 * 1024, g.disk);
  return g;
}

/** The guest still reads what it wrote and takes new writes to memory and disk. */
async function expectUsable(g: Guest): Promise<void> {
  expect((await node.readMemory(g.ip, 2 * 1024 * 1024, g.mem.length)).equals(g.mem), `${g.id} memory`).toBe(true);
  expect((await node.readDisk(g.ip, 3 * 1024 * 1024, g.disk.length)).equals(g.disk), `${g.id} disk`).toBe(true);
  const more = randomBytes(4096);
  await node.writeMemory(g.ip, 5 * 1024 * 1024, more);
  await node.writeDisk(g.ip, 6 * 1024 * 1024, more);
  expect((await node.readMemory(g.ip, 5 * 1024 * 1024, 4096)).equals(more), `${g.id} new memory`).toBe(true);
  expect((await node.readDisk(g.ip, 6 * 1024 * 1024, 4096)).equals(more), `${g.id} new disk`).toBe(true);
}

describe.skipIf(missing !== undefined)('independent scaling: two uffd-servers, two block-servers', () => {
  it('spreads sandboxes over the instances; losing one block-server fails only its sandboxes, a uffd-server restart keeps its own', async () => {
    const guests: Guest[] = [];
    for (const id of ['sc-0', 'sc-1', 'sc-2', 'sc-3']) guests.push(await startGuest(id));
    const all = guests.map((g) => g.id);
    const uffd = await holdings('uffd');
    const block = await holdings('block');
    expect(
      uffd.map((h) => h.length),
      'uffd-servers each serve two',
    ).toEqual([2, 2]);
    expect(
      block.map((h) => h.length),
      'block-servers each hold two',
    ).toEqual([2, 2]);
    expect(uffd.flat().sort()).toEqual(all);
    expect(block.flat().sort()).toEqual(all);

    // block-server #1 loses its devices (killed, data directory gone, started again).
    const onBlock1 = block[1]!;
    await node.restartService(NodeUnderTest.instanceName('block-server', 1), 'SIGKILL', false);
    await rm(join(node.root, 'block1'), { recursive: true, force: true });
    await node.startService(NodeUnderTest.instanceName('block-server', 1));
    await d.expectFailed(onBlock1, 'block-server');
    const survivors = guests.filter((g) => !onBlock1.includes(g.id));
    expect(await d.listIds()).toEqual(survivors.map((g) => g.id).sort());
    for (const g of survivors) await expectUsable(g);

    // New sandboxes go to the least loaded instances, which are the ones that lost theirs.
    const fresh = [await startGuest('sc-4'), await startGuest('sc-5')];
    expect((await holdings('block')).map((h) => h.length)).toEqual([2, 2]);
    const uffdNow = await holdings('uffd');
    expect(uffdNow.map((h) => h.length)).toEqual([2, 2]);

    // uffd-server #1 restarts: it takes its sandboxes back from their VMMs (pidfd_getfd), so every
    // sandbox keeps running, on the same instances. (An instance that stays down fails only its
    // own sandboxes: service-restart.test.ts.)
    const onUffd1 = uffdNow[1]!;
    expect(onUffd1.length).toBe(2);
    await node.restartService(NodeUnderTest.instanceName('uffd-server', 1), 'SIGTERM');
    const running = [...survivors, ...fresh];
    expect(await d.listIds()).toEqual(running.map((g) => g.id).sort());
    expect((await holdings('uffd'))[1]!.sort()).toEqual([...onUffd1].sort());
    for (const g of running) await expectUsable(g);

    for (const g of running) await d.remove(g.id);
    await d.expectFootprintBack();
  });
});
