import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { eventually } from '#test-kit';
import { MemorySlotReservation } from './memory-slot-reservation.js';
import { loadNetAgentConfig } from './net-agent-config.js';
import { PoolStopped, SlotNotInUse, SlotNotOwned, SlotPool, SlotPoolExhausted } from './slot-pool.js';
import { SlotLayout, type SlotSpec } from './slot-layout.js';
import { ReservationUnavailable, type ReservedSlot, type SlotReservation } from './slot-reservation.js';

const layout = new SlotLayout(loadNetAgentConfig({ argv: ['--slot-count', '64'], env: {} }));
const logger = createLogger({ service: 'net-agent-test', level: 'silent' });

/** Stands in for SlotNetwork: records which slots exist, can be made to fail or stall. */
class FakeNetwork {
  readonly live = new Set<number>();
  failCreates = 0;
  createCalls = 0;
  gate: Promise<void> | undefined;
  async createMany(slots: SlotSpec[]): Promise<void> {
    this.createCalls++;
    if (this.gate) await this.gate;
    if (this.failCreates > 0) {
      this.failCreates--;
      throw new Error('nft: simulated failure');
    }
    for (const s of slots) this.live.add(s.idx);
  }
  async removeMany(slots: SlotSpec[]): Promise<void> {
    for (const s of slots) this.live.delete(s.idx);
  }
}

/** A reservation whose store can go down (for the outage path of the pool). */
class FlakyReservation implements SlotReservation {
  readonly kind = 'memory' as const;
  down = false;
  private readonly inner = new MemorySlotReservation(layout.first, 64);
  private check(op: string) {
    if (this.down) throw new ReservationUnavailable('flaky', op, new Error('connect ECONNREFUSED'));
  }
  async reserve() {
    this.check('create-cas');
    return this.inner.reserve();
  }
  async release(slot: ReservedSlot) {
    this.check('delete-cas');
    return this.inner.release(slot);
  }
  claim(idx: number) {
    return this.inner.claim(idx);
  }
  keyOf(idx: number) {
    return this.inner.keyOf(idx);
  }
  held() {
    return this.inner.held();
  }
  close() {}
}

function makePool(network: FakeNetwork, reservation: SlotReservation = new MemorySlotReservation(1, 64), extra = {}) {
  return new SlotPool({
    network,
    reservation,
    layout,
    newSize: 4,
    reusedSize: 2,
    batch: 4,
    backoffMinMs: 5,
    backoffMaxMs: 20,
    acquireTimeoutMs: 200,
    logger,
    ...extra,
  });
}

/** The pool works in the background with millisecond fakes: poll often, give up soon. */
const until = (ok: () => boolean) => eventually(ok, { timeoutMs: 2000, intervalMs: 2 });

describe('SlotPool', () => {
  it('fills to its size and hands out a ready slot without waiting on creation', async () => {
    const net = new FakeNetwork();
    const pool = makePool(net);
    pool.start();
    await until(() => pool.stats().readyNew === 4);
    // Creation now stalls: a ready slot must still come out at once.
    let open!: () => void;
    net.gate = new Promise<void>((r) => (open = r));
    const slot = pool.tryAcquire('a');
    expect(slot?.sandboxId).toBe('a');
    expect(pool.list().map((s) => s.spec.idx)).toEqual([slot!.spec.idx]);
    open();
    await pool.shutdown();
    expect(net.live.size).toBe(0);
  });

  it('reuses given-back slots first, up to the reused size, and removes the rest', async () => {
    const net = new FakeNetwork();
    const pool = makePool(net);
    pool.start();
    await until(() => pool.stats().readyNew === 4);
    const taken = await Promise.all(['a', 'b', 'c'].map((id) => pool.acquire(id)));
    await pool.release(taken[0]!.spec.idx, 'a', true);
    await pool.release(taken[1]!.spec.idx, 'b', true);
    await pool.release(taken[2]!.spec.idx, 'c', true);
    expect(pool.stats().readyReused).toBe(2);
    expect(net.live.has(taken[2]!.spec.idx)).toBe(false);
    expect((await pool.acquire('d')).spec.idx).toBe(taken[1]!.spec.idx);
    await pool.shutdown();
    expect(net.live.size).toBe(0);
  });

  it('checks ownership on release', async () => {
    const net = new FakeNetwork();
    const pool = makePool(net);
    pool.start();
    const slot = await pool.acquire('owner');
    await expect(pool.release(slot.spec.idx, 'other', false)).rejects.toBeInstanceOf(SlotNotOwned);
    await expect(pool.release(63, 'owner', false)).rejects.toBeInstanceOf(SlotNotInUse);
    await pool.release(slot.spec.idx, 'owner', false);
    await pool.shutdown();
  });

  it('backs off while creation fails, says why on Acquire, and recovers', async () => {
    const net = new FakeNetwork();
    net.failCreates = 1000;
    const pool = makePool(net, undefined, { newSize: 1 });
    pool.start();
    const err = await pool.acquire('x').catch((e: unknown) => e);
    expect(err).toBeInstanceOf(SlotPoolExhausted);
    expect((err as Error).message).toContain('simulated failure');
    // Backoff doubles up to 20 ms: far fewer attempts than a tight loop in 200 ms.
    expect(net.createCalls).toBeLessThan(25);
    expect(pool.stats().createErrors).toBeGreaterThan(1);
    net.failCreates = 0;
    const slot = await pool.acquire('y');
    expect(net.live.has(slot.spec.idx)).toBe(true);
    expect(pool.stats().lastError).toBeUndefined();
    await pool.shutdown();
  });

  it('keeps releases owed to a store that is down and settles them when it is back', async () => {
    const net = new FakeNetwork();
    const store = new FlakyReservation();
    const pool = makePool(net, store, { newSize: 1 });
    pool.start();
    const slot = await pool.acquire('a');
    store.down = true;
    await pool.release(slot.spec.idx, 'a', false);
    expect(net.live.has(slot.spec.idx)).toBe(false);
    expect(pool.stats().pendingReleases).toBe(1);
    store.down = false;
    await until(() => pool.stats().pendingReleases === 0);
    expect((await store.held()).map((s) => s.idx)).not.toContain(slot.spec.idx);
    await pool.shutdown();
  });

  it('shutdown removes ready and in-use slots and refuses new work', async () => {
    const net = new FakeNetwork();
    const reservation = new MemorySlotReservation(1, 64);
    const pool = makePool(net, reservation);
    pool.start();
    await pool.acquire('a');
    await until(() => pool.stats().readyNew === 4);
    await pool.shutdown();
    expect(net.live.size).toBe(0);
    expect(await reservation.held()).toEqual([]);
    await expect(pool.acquire('late')).rejects.toBeInstanceOf(PoolStopped);
  });
});
