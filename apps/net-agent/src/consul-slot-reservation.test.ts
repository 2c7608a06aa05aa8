import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConsulKvDouble } from '../test/consul-kv-double.js';
import { ConsulSlotReservation, createConsulClient } from './consul-slot-reservation.js';
import { ReservationUnavailable, SlotAlreadyReleased, SlotReallocated, SlotsExhausted } from './slot-reservation.js';

// A real agent when CONSUL_HTTP_ADDR is set; otherwise the KV test double (no Consul binary here).
const realConsul = process.env['CONSUL_HTTP_ADDR'];
if (!realConsul) console.warn('CONSUL_HTTP_ADDR not set: Consul KV tests run against ConsulKvDouble (a test double)');

const prefix = `sbx-net-test-${process.pid}-${Date.now()}/`;
let double: ConsulKvDouble | undefined;
let address = realConsul ?? '';
const opened: ConsulSlotReservation[] = [];

function reservation(nodeId: string, count: number, first = 1, addr = address): ConsulSlotReservation {
  const r = new ConsulSlotReservation({ address: addr, prefix, nodeId, first, count, timeoutMs: 1000 });
  opened.push(r);
  return r;
}

async function keysUnder(sub: string): Promise<string[]> {
  if (double) return double.keys(prefix + sub);
  const consul = createConsulClient(address);
  try {
    return await consul.kv.keys(prefix + sub);
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return [];
    throw err;
  } finally {
    consul.destroy();
  }
}

beforeAll(async () => {
  if (!realConsul) {
    double = new ConsulKvDouble(0);
    address = await double.start();
  }
});

afterAll(async () => {
  for (const r of opened) r.close();
  if (double) await double.stop();
  else {
    const consul = createConsulClient(address);
    await consul.kv.del({ key: prefix, recurse: true }).catch(() => undefined);
    consul.destroy();
  }
});

describe(`ConsulSlotReservation (${realConsul ? 'real Consul' : 'ConsulKvDouble, a test double'})`, () => {
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

  it('a release never deletes a key someone re-created after it was read (delete-CAS)', async () => {
    const r = reservation('node-cas', 10);
    const slot = await r.reserve();
    // Simulate the key being released and re-taken by another holder between read and delete:
    // the stored ModifyIndex changes, so a delete-CAS with a stale index must fail.
    const consul = createConsulClient(address);
    const before = await consul.kv.get(slot.key);
    expect(before).toBeTruthy();
    await consul.kv.set(slot.key, 'someone else');
    // The client returns `undefined` for Consul's `false` body: anything but true is a refusal.
    expect(await consul.kv.del({ key: slot.key, cas: before!.ModifyIndex })).not.toBe(true);
    expect(await keysUnder('node-cas/')).toEqual([slot.key]);
    consul.destroy();
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
  });
});

// The outage is simulated by stopping a double: a real agent cannot be stopped from a test.
describe('ConsulSlotReservation during a Consul outage (ConsulKvDouble, a test double)', () => {
  it('fails with a clear error naming the store and recovers when Consul is back', async () => {
    const outage = new ConsulKvDouble(0);
    const addr = await outage.start();
    try {
      const r = reservation('node-outage', 10, 1, addr);
      const slot = await r.reserve();
      await outage.stop();
      const err = await r.reserve().catch((e: unknown) => e);
      expect(err).toBeInstanceOf(ReservationUnavailable);
      expect((err as Error).message).toContain(addr);
      expect((err as Error).message).toMatch(/ECONNREFUSED|socket hang up|connect/);
      await expect(r.release(slot)).rejects.toBeInstanceOf(ReservationUnavailable);
      await outage.start();
      await r.release(slot);
      const again = await r.reserve();
      expect(outage.keys(`${prefix}node-outage/`)).toEqual([again.key]);
    } finally {
      await outage.stop();
    }
  });

  it('keeps a slot whose create landed though its answer was lost (no orphan key)', async () => {
    const lossy = new ConsulKvDouble(0);
    const addr = await lossy.start();
    try {
      const r = reservation('node-lossy', 10, 1, addr);
      lossy.loseAnswersToWrites = 1;
      const slot = await r.reserve();
      expect(lossy.keys(`${prefix}node-lossy/`)).toEqual([slot.key]);
      await r.release(slot);
      expect(lossy.keys(`${prefix}node-lossy/`)).toEqual([]);
    } finally {
      await lossy.stop();
    }
  });

  it('two releases of one slot racing: exactly one frees it, the other gets a typed error', async () => {
    const r = reservation('node-realloc', 10);
    const slot = await r.reserve();
    const other = reservation('node-realloc', 10);
    const releases = await Promise.allSettled([r.release(slot), other.release(slot)]);
    const errors = releases.flatMap((x) => (x.status === 'rejected' ? [x.reason] : []));
    expect(releases.filter((x) => x.status === 'fulfilled')).toHaveLength(1);
    expect(errors).toHaveLength(1);
    expect(errors[0] instanceof SlotAlreadyReleased || errors[0] instanceof SlotReallocated).toBe(true);
  });
});
