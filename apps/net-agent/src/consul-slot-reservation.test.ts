import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { ConsulAgent } from '../../../libs/test-peers/src/consul-agent.js';
import { LossyConsulProxy } from '../test/lossy-consul-proxy.js';
import { ConsulSlotReservation, createConsulClient } from './consul-slot-reservation.js';
import { ReservationUnavailable, SlotAlreadyReleased, SlotsExhausted } from './slot-reservation.js';

// Against a real Consul agent (a test peer, built by scripts/test-peers.sh on first use).
const prefix = `sbx-net-test-${process.pid}/`;
let consul: ConsulAgent;
const opened: ConsulSlotReservation[] = [];

function reservation(nodeId: string, count: number, first = 1, addr = consul.address): ConsulSlotReservation {
  const r = new ConsulSlotReservation({ address: addr, prefix, nodeId, first, count, timeoutMs: 1000 });
  opened.push(r);
  return r;
}

async function keysUnder(sub: string): Promise<string[]> {
  const client = createConsulClient(consul.address);
  try {
    return await client.kv.keys(prefix + sub);
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return [];
    throw err;
  } finally {
    client.destroy();
  }
}

beforeAll(async () => {
  consul = await ConsulAgent.start();
}, 1_800_000);

afterAll(async () => {
  for (const r of opened) r.close();
  await consul?.close();
});

describe('ConsulSlotReservation against a real Consul agent', () => {
  it('takes a slot by creating {nodeId}/{idx} and frees it with a delete-CAS', async () => {
    const r = reservation('node-a', 100);
    const slot = await r.reserve();
    expect(slot.key).toBe(`${prefix}node-a/${slot.idx}`);
    expect(await keysUnder('node-a/')).toEqual([slot.key]);
    await r.release(slot);
    expect(await keysUnder('node-a/')).toEqual([]);
    await expect(r.release(slot)).rejects.toBeInstanceOf(SlotAlreadyReleased);
  });

  it('two agents racing for the same node never get the same slot, and the 21st of 20 fails', async () => {
    const a = reservation('node-race', 20);
    const b = reservation('node-race', 20);
    const results = await Promise.allSettled(Array.from({ length: 21 }, (_, i) => (i % 2 ? a : b).reserve()));
    const won = results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.idx] : []));
    const lost = results.flatMap((r) => (r.status === 'rejected' ? [r.reason] : []));
    expect(won).toHaveLength(20);
    expect(new Set(won).size).toBe(20);
    expect(lost).toHaveLength(1);
    expect(lost[0]).toBeInstanceOf(SlotsExhausted);
    expect((await keysUnder('node-race/')).length).toBe(20);
    expect((await a.held()).map((s) => s.idx).sort((x, y) => x - y)).toEqual(
      Array.from({ length: 20 }, (_, i) => i + 1),
    );
  });

  it('finds the last free slot through the listing fallback when random tries miss', async () => {
    const r = reservation('node-full', 50);
    const taken = [];
    for (let i = 0; i < 49; i++) taken.push(await r.reserve());
    const last = await r.reserve();
    expect(new Set([...taken.map((s) => s.idx), last.idx]).size).toBe(50);
    await expect(r.reserve()).rejects.toBeInstanceOf(SlotsExhausted);
  });

  it('Consul answers a delete-CAS on an absent key with true (why release does not rely on it)', async () => {
    const client = createConsulClient(consul.address);
    try {
      await client.kv.set(`${prefix}absent-probe`, 'x');
      const pair = await client.kv.get(`${prefix}absent-probe`);
      expect(await client.kv.del({ key: `${prefix}absent-probe`, cas: pair!.ModifyIndex })).toBe(true);
      expect(await client.kv.del({ key: `${prefix}absent-probe`, cas: pair!.ModifyIndex })).toBe(true);
    } finally {
      client.destroy();
    }
  });

  it('a release never deletes a key someone re-created after it was read', async () => {
    const r = reservation('node-cas', 10);
    const slot = await r.reserve();
    // The key released and re-taken by another holder between a read and a delete: the stored
    // ModifyIndex changes, so a delete-CAS with the stale index must fail.
    const client = createConsulClient(consul.address);
    const before = await client.kv.get(slot.key);
    expect(before).toBeTruthy();
    await client.kv.set(slot.key, 'someone else');
    // The client returns `undefined` for Consul's `false` body: anything but true is a refusal.
    expect(await client.kv.del({ key: slot.key, cas: before!.ModifyIndex })).not.toBe(true);
    expect(await keysUnder('node-cas/')).toEqual([slot.key]);
    client.destroy();
    // Our own release reads the current index, so it still frees the key it holds.
    await r.release(slot);
    expect(await keysUnder('node-cas/')).toEqual([]);
  });

  it('claims a specific index only when nobody holds it', async () => {
    const a = reservation('node-claim', 10);
    const b = reservation('node-claim', 10);
    expect(await a.claim(7)).toBe(true);
    expect(await b.claim(7)).toBe(false);
    await a.release({ idx: 7, key: a.keyOf(7) });
    expect(await keysUnder('node-claim/')).toEqual([]);
  });

  it('two releases of one slot racing: exactly one frees it, the other gets a typed error', async () => {
    // Repeated: the two reads must both happen before either delete for the race to bite.
    for (let round = 0; round < 20; round++) {
      const r = reservation(`node-realloc-${round}`, 10);
      const other = reservation(`node-realloc-${round}`, 10);
      const slot = await r.reserve();
      const releases = await Promise.allSettled([r.release(slot), other.release(slot)]);
      const errors = releases.flatMap((x) => (x.status === 'rejected' ? [x.reason] : []));
      expect(releases.filter((x) => x.status === 'fulfilled')).toHaveLength(1);
      expect(errors).toHaveLength(1);
      expect(errors[0]).toBeInstanceOf(SlotAlreadyReleased);
      expect(await keysUnder(`node-realloc-${round}/`)).toEqual([]);
    }
  });

  it('a release racing a re-take of the same index fails as SlotReallocated and leaves the new key', async () => {
    const r = reservation('node-retake', 1);
    const slot = await r.reserve();
    const client = createConsulClient(consul.address);
    try {
      // Between our read and our delete the key is released and created again by someone else.
      const pair = await client.kv.get(slot.key);
      await client.kv.del(slot.key);
      await client.kv.set({ key: slot.key, value: 'new holder', cas: 0 });
      const stale = await r['transaction']([
        { KV: { Verb: 'check-index', Key: slot.key, Index: pair!.ModifyIndex } },
        { KV: { Verb: 'delete', Key: slot.key } },
      ]).catch((e: { statusCode?: number }) => e.statusCode);
      expect(stale).toBe(409);
      await expect(reservation('node-retake', 1).claim(slot.idx)).resolves.toBe(false);
      expect((await client.kv.get(slot.key))?.Value).toBe('new holder');
    } finally {
      client.destroy();
    }
  });
});

describe('ConsulSlotReservation through a Consul outage (the real agent stopped and restarted)', () => {
  it('fails with a clear error naming the store and recovers when Consul is back', async () => {
    const r = reservation('node-outage', 10);
    const slot = await r.reserve();
    await consul.stop();
    try {
      const err = await r.reserve().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ReservationUnavailable);
      expect((err as Error).message).toContain(consul.address);
      expect((err as Error).message).toMatch(/ECONNREFUSED|socket hang up|connect/);
      await expect(r.release(slot)).rejects.toBeInstanceOf(ReservationUnavailable);
    } finally {
      await consul.start();
    }
    // The agent kept its data: the reservation is still there and is released now.
    expect(await keysUnder('node-outage/')).toEqual([slot.key]);
    await r.release(slot);
    const again = await r.reserve();
    expect(await keysUnder('node-outage/')).toEqual([again.key]);
  });

  it('keeps a slot whose create landed though its answer was lost (no orphan key)', async () => {
    const proxy = new LossyConsulProxy(consul.address);
    const addr = await proxy.start();
    try {
      const r = reservation('node-lossy', 10, 1, addr);
      proxy.loseAnswersToWrites = 1;
      const slot = await r.reserve();
      expect(proxy.lost).toBe(1);
      expect(await keysUnder('node-lossy/')).toEqual([slot.key]);
      await r.release(slot);
      expect(await keysUnder('node-lossy/')).toEqual([]);
    } finally {
      await proxy.stop();
    }
  });
});

describe('ConsulSlotReservation on a slow store', () => {
  it('gives back, when settled, a create that landed after its timed-out read-back', async () => {
    const proxy = new LossyConsulProxy(consul.address);
    const addr = await proxy.start();
    try {
      const r = reservation('node-late', 10, 1, addr);
      proxy.delayWrites = 1;
      proxy.writeDelayMs = 1500; // past the client's 1000 ms timeout and its read-back
      await expect(r.reserve()).rejects.toBeInstanceOf(ReservationUnavailable);
      await eventually(async () => expect(await keysUnder('node-late/')).toHaveLength(1), { timeoutMs: 10_000 });
      expect(await r.settle()).toBe(1);
      expect(await keysUnder('node-late/')).toEqual([]);
    } finally {
      await proxy.stop();
    }
  });
});
