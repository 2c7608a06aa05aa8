import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { eventually } from '#test-kit';
import { MemorySlotReservation } from './memory-slot-reservation.js';
import { loadNetAgentConfig } from './net-agent-config.js';
import { PoolStopped, SlotNotInUse, SlotNotOwned, SlotPool, SlotPoolExhausted } from './slot-pool.js';
import { SlotLayout, type SlotSpec } from './slot-layout.js';
import type { SlotOwner } from './slot-owner.js';
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
    // The slot in use stays with its sandbox.
    expect([...net.live.keys()]).toEqual([slot!.spec.idx]);
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
    expect([...net.live.keys()]).toEqual([taken[1]!.spec.idx]);
  });

  it('marks each slot with its sandbox, and reuses a given-back slot only once it is whole again', async () => {
    const net = new FakeNetwork();
    const marks = new Map<number, string>();
    let broken = new Set<number>();
    const pool = makePool(net, undefined, {
      markOwner: async (spec: SlotSpec, owner: SlotOwner) => void marks.set(spec.idx, owner.sandboxId),
      repair: async (spec: SlotSpec) => {
        if (broken.has(spec.idx)) throw new Error('tap cannot be made');
        return [];
      },
    });
    pool.start();
    const a = await pool.acquire('a');
    const b = await pool.acquire('b');
    await until(() => marks.get(a.spec.idx) === 'a' && marks.get(b.spec.idx) === 'b');
    await pool.release(a.spec.idx, 'a', true);
    expect(marks.get(a.spec.idx)).toBe('');
    broken = new Set([b.spec.idx]);
    await pool.release(b.spec.idx, 'b', true);
    // The whole one is ready again; the one that could not be repaired is gone.
    expect(pool.stats().readyReused).toBe(1);
    expect(net.live.has(a.spec.idx)).toBe(true);
    expect(net.live.has(b.spec.idx)).toBe(false);
    await pool.shutdown();
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

  it('shutdown removes the ready slots, leaves the ones in use to their sandboxes, and refuses new work', async () => {
    const net = new FakeNetwork();
    const reservation = new MemorySlotReservation(1, 64);
    const pool = makePool(net, reservation);
    pool.start();
    const used = await pool.acquire('a');
    await until(() => pool.stats().readyNew === 4);
    await pool.shutdown();
    expect([...net.live.keys()]).toEqual([used.spec.idx]);
    expect((await reservation.held()).map((r) => r.idx)).toEqual([used.spec.idx]);
    expect(pool.list().map((s) => s.sandboxId)).toEqual(['a']);
    await expect(pool.acquire('late')).rejects.toBeInstanceOf(PoolStopped);
  });

  it("shutdown frees a pooled VMM's slot once its VMM is gone, keeps one a VMM still runs in and a fresh one still empty", async () => {
    const net = new FakeNetwork();
    const reservation = new MemorySlotReservation(1, 64);
    // Namespaces with a process: the VMM in `ended` exits once shutdown has looked twice.
    const busy = new Set<number>();
    let looks = 0;
    let ended = -1;
    const pool = makePool(net, reservation, {
      newSize: 5,
      pooledGraceMs: 60_000,
      pooledStopWaitMs: 2000,
      namespacesInUse: async () => {
        if (++looks === 2) busy.delete(ended);
        return new Set(busy);
      },
    });
    pool.start();
    const sandbox = await pool.acquire('sbx-a');
    const taken = await pool.acquire('vmm-pool-taken', true);
    const waiting = await pool.acquire('vmm-pool-waiting', true);
    const fresh = await pool.acquire('vmm-pool-fresh', true);
    ended = waiting.spec.idx;
    for (const s of [taken, waiting]) busy.add(s.spec.idx);
    await pool.shutdown();
    // The waiting VMM ended during the stop: slot and reservation gone. A sandbox runs in the
    // taken one; the fresh one (handed out less than the grace ago) may be about to get its VMM.
    const kept = [sandbox, taken, fresh].map((s) => s.spec.idx).sort((a, b) => a - b);
    expect([...net.live.keys()].sort((a, b) => a - b)).toEqual(kept);
    expect((await reservation.held()).map((r) => r.idx).sort((a, b) => a - b)).toEqual(kept);
    expect(pool.list().map((s) => s.sandboxId)).toEqual(
      [sandbox, taken, fresh].sort((a, b) => a.spec.idx - b.spec.idx).map((s) => s.sandboxId),
    );
  });

  it('shutdown frees a pooled slot past its grace that never had a process, and marks pooled slots apart', async () => {
    const net = new FakeNetwork();
    const reservation = new MemorySlotReservation(1, 64);
    const marks = new Map<number, SlotOwner>();
    const pool = makePool(net, reservation, {
      newSize: 2,
      pooledGraceMs: 0,
      namespacesInUse: async () => new Set<number>(),
      markOwner: async (spec: SlotSpec, owner: SlotOwner) => void marks.set(spec.idx, owner),
    });
    pool.start();
    const plain = await pool.acquire('sbx-b');
    const pooled = await pool.acquire('vmm-pool-x', true);
    await until(() => marks.size === 2);
    expect(marks.get(plain.spec.idx)).toEqual({ sandboxId: 'sbx-b', pooledAt: undefined });
    expect(marks.get(pooled.spec.idx)?.pooledAt).toBeGreaterThan(0);
    await pool.shutdown();
    // A sandbox's slot without a process stays: its VMM may not have started yet.
    expect([...net.live.keys()]).toEqual([plain.spec.idx]);
    expect((await reservation.held()).map((r) => r.idx)).toEqual([plain.spec.idx]);
  });
});
