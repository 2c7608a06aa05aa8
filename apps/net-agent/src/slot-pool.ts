import type { Logger } from '#logging';
import type { SlotLayout, SlotSpec } from './slot-layout.js';
import type { SlotNetwork } from './slot-network.js';
import type { ReservedSlot, SlotReservation } from './slot-reservation.js';
import { TypedError } from '#service-kit';
import { poolSlotAbandoned, type SlotOwner } from './slot-owner.js';

export class SlotPoolExhausted extends TypedError {
  readonly code = 'SLOT_POOL_EXHAUSTED';
  constructor(
    readonly waitedMs: number,
    readonly lastError: string | undefined,
  ) {
    super(`no ready network slot after ${waitedMs} ms` + (lastError ? `; slot creation is failing: ${lastError}` : ''));
  }
}

export class SlotNotInUse extends TypedError {
  readonly code = 'SLOT_NOT_IN_USE';
  constructor(readonly idx: number) {
    super(`slot ${idx} is not in use by any sandbox`);
  }
}

export class SlotNotOwned extends TypedError {
  readonly code = 'SLOT_NOT_OWNED';
  constructor(
    readonly idx: number,
    readonly sandboxId: string,
    readonly owner: string,
  ) {
    super(`slot ${idx} belongs to sandbox ${owner}, not ${sandboxId}`);
  }
}

export class PoolStopped extends TypedError {
  readonly code = 'POOL_STOPPED';
  constructor() {
    super('the slot pool is shutting down');
  }
}

export interface PoolSlot {
  spec: SlotSpec;
  reserved: ReservedSlot;
  /** Empty while ready, and for slots adopted at reconcile whose sandbox is unknown. */
  sandboxId: string;
  /** When it was handed out for a pooled VMM (NetAcquireRequest.pooled), epoch ms. */
  pooledAt?: number;
}

export interface SlotPoolOptions {
  network: Pick<SlotNetwork, 'createMany' | 'removeMany'>;
  reservation: SlotReservation;
  layout: SlotLayout;
  newSize: number;
  reusedSize: number;
  batch: number;
  backoffMinMs: number;
  backoffMaxMs: number;
  acquireTimeoutMs: number;
  logger: Logger;
  /** Called after each created batch with its size and duration (for metrics). */
  onCreated?: (count: number, ms: number) => void;
  /** Records on the slot which sandbox holds it ('' when it is ready again), for a restarted agent. */
  markOwner?: (spec: SlotSpec, owner: SlotOwner) => Promise<void>;
  /** Which of `specs` have a process in their namespace; without it, shutdown keeps pooled slots. */
  namespacesInUse?: (specs: SlotSpec[]) => Promise<Set<number>>;
  /** A pooled slot without a process is freed at shutdown only once handed out this long ago. */
  pooledGraceMs?: number;
  /** How long shutdown watches pooled slots for their VMMs to end (all services stop together). */
  pooledStopWaitMs?: number;
  /** Puts back what a slot given back for reuse lost (the tap, after a VMM SIGKILL); throws when it cannot. */
  repair?: (spec: SlotSpec) => Promise<string[]>;
}

export interface PoolStats {
  readyNew: number;
  readyReused: number;
  inUse: number;
  created: number;
  removed: number;
  createErrors: number;
  removeErrors: number;
  pendingReleases: number;
  lastError: string | undefined;
}

interface Waiter {
  sandboxId: string;
  pooled: boolean;
  resolve(slot: PoolSlot): void;
  reject(err: Error): void;
  timer: NodeJS.Timeout | undefined;
}

/**
 * Ready slots (new ones made by a background refill, reused ones given back) so that Acquire
 * is a synchronous pop whenever one is ready. The refill creates batches of slots and backs
 * off exponentially while creation or reservation fails; Acquire then fails with the reason.
 */
export class SlotPool {
  private readonly readyNew: PoolSlot[] = [];
  private readonly readyReused: PoolSlot[] = [];
  private readonly inUse = new Map<number, PoolSlot>();
  private readonly waiters: Waiter[] = [];
  /** Reservations whose release failed (store down): retried until they go through. */
  private readonly pendingReleases: ReservedSlot[] = [];
  private retryingReleases = 0;
  private creating = 0;
  private stopped = false;
  /** Ends the refill loop's idle wait (a slot was taken, a waiter arrived, shutdown). */
  private wake: (() => void) | undefined;
  /** Ends a backoff sleep early: only shutdown does. */
  private interruptSleep: (() => void) | undefined;
  private loop: Promise<void> | undefined;
  private counters = { created: 0, removed: 0, createErrors: 0, removeErrors: 0 };
  private lastError: string | undefined;
  private removeQueue: Array<{ slot: PoolSlot; done: (err?: Error) => void }> = [];
  private removeScheduled = false;

  constructor(private readonly options: SlotPoolOptions) {}

  start(): void {
    this.loop ??= this.refillLoop();
  }

  /** Slots found in use at reconcile: kept as in use, with whatever sandbox id is known. */
  adopt(slots: PoolSlot[]): void {
    for (const slot of slots) this.inUse.set(slot.spec.idx, slot);
  }

  acquire(sandboxId: string, pooled = false): Promise<PoolSlot> {
    if (this.stopped) return Promise.reject(new PoolStopped());
    const slot = this.readyReused.pop() ?? this.readyNew.shift();
    if (slot) {
      this.kick();
      return Promise.resolve(this.handOut(slot, sandboxId, pooled));
    }
    this.kick();
    return new Promise((resolve, reject) => {
      const waiter: Waiter = { sandboxId, pooled, resolve, reject, timer: undefined };
      const started = Date.now();
      waiter.timer = setTimeout(() => {
        this.dropWaiter(waiter);
        reject(new SlotPoolExhausted(Date.now() - started, this.lastError));
      }, this.options.acquireTimeoutMs);
      this.waiters.push(waiter);
    });
  }

  /** Synchronous variant for callers that must not wait: undefined when nothing is ready. */
  tryAcquire(sandboxId: string, pooled = false): PoolSlot | undefined {
    if (this.stopped) throw new PoolStopped();
    const slot = this.readyReused.pop() ?? this.readyNew.shift();
    this.kick();
    return slot ? this.handOut(slot, sandboxId, pooled) : undefined;
  }

  /**
   * Gives a slot back. With `reuse` it goes to the reused pool while there is room; otherwise
   * its network is removed and its reservation released before this resolves.
   */
  async release(idx: number, sandboxId: string, reuse: boolean): Promise<void> {
    const slot = this.inUse.get(idx);
    if (!slot) throw new SlotNotInUse(idx);
    if (sandboxId && slot.sandboxId && slot.sandboxId !== sandboxId)
      throw new SlotNotOwned(idx, sandboxId, slot.sandboxId);
    this.inUse.delete(idx);
    slot.sandboxId = '';
    slot.pooledAt = undefined;
    if (reuse && !this.stopped && this.readyReused.length < this.options.reusedSize) {
      // Checked again after the wait: a shutdown meanwhile has already emptied the ready pool.
      if (!(await this.reusable(slot)) || this.stopped) {
        await this.remove(slot);
        return;
      }
      const waiter = this.waiters.shift();
      if (waiter) this.deliver(waiter, slot);
      else this.readyReused.push(slot);
      return;
    }
    await this.remove(slot);
  }

  list(): PoolSlot[] {
    return [...this.inUse.values()].sort((a, b) => a.spec.idx - b.spec.idx);
  }

  stats(): PoolStats {
    return {
      readyNew: this.readyNew.length,
      readyReused: this.readyReused.length,
      inUse: this.inUse.size,
      ...this.counters,
      pendingReleases: this.pendingReleases.length + this.retryingReleases,
      lastError: this.lastError,
    };
  }

  /**
   * Stops refilling and removes the ready slots. Slots in use stay as they are (namespace,
   * links, rules, reservation, owner mark), so their sandboxes keep their network and the next
   * run of the agent adopts them; except a pooled VMM's slot left without a process (see
   * freeAbandonedPoolSlots).
   */
  async shutdown(): Promise<void> {
    this.stopped = true;
    for (const waiter of this.waiters.splice(0)) {
      clearTimeout(waiter.timer);
      waiter.reject(new PoolStopped());
    }
    this.kick();
    this.interruptSleep?.();
    await this.loop;
    const all = [...this.readyNew.splice(0), ...this.readyReused.splice(0), ...(await this.freeAbandonedPoolSlots())];
    if (this.inUse.size) {
      this.options.logger.info(
        { slots: [...this.inUse.keys()].slice(0, 50), count: this.inUse.size },
        'slots in use left to their sandboxes, for the next run to adopt',
      );
    }
    const results = await Promise.allSettled(all.map((slot) => this.remove(slot)));
    await this.retryPendingReleases();
    const settled = await this.options.reservation.settle?.().catch(() => 0);
    if (settled) this.options.logger.info({ count: settled }, 'reservations whose create had timed out released');
    const failed = results.filter((r) => r.status === 'rejected').length;
    if (failed || this.pendingReleases.length) {
      throw new Error(
        `shutdown left ${failed} slot(s) not removed and ${this.pendingReleases.length} reservation(s) not released`,
      );
    }
  }

  /**
   * When every service stops at once (Nomad stopping the node, Ctrl-C), the orchestrator kills
   * its waiting VMMs but its Release cannot reach this agent any more: without this their slots
   * (and reservations) would stay until the next orchestrator start, forever on a drained node.
   * Watches the pooled slots in use for up to pooledStopWaitMs and takes out of use those
   * abandoned (poolSlotAbandoned); one whose VMM lives on (a sandbox took it) is kept.
   */
  private async freeAbandonedPoolSlots(): Promise<PoolSlot[]> {
    const { namespacesInUse, pooledGraceMs = 5000, pooledStopWaitMs = 5000, logger } = this.options;
    if (!namespacesInUse) return [];
    const deadline = Date.now() + pooledStopWaitMs;
    const seenBusy = new Set<number>();
    const freed: PoolSlot[] = [];
    for (;;) {
      const pooled = [...this.inUse.values()].filter((s) => s.pooledAt !== undefined);
      if (!pooled.length) break;
      const busy = await namespacesInUse(pooled.map((s) => s.spec)).catch((err: unknown) => {
        logger.warn({ err }, 'reading which pooled slots have a process failed: they are kept');
        return undefined;
      });
      if (!busy) break;
      const now = Date.now();
      let left = pooled.length;
      for (const slot of pooled) {
        const idx = slot.spec.idx;
        if (busy.has(idx)) seenBusy.add(idx);
        const owner = { sandboxId: slot.sandboxId, pooledAt: slot.pooledAt };
        if (
          poolSlotAbandoned(owner, { busy: busy.has(idx), seenBusy: seenBusy.has(idx), now, graceMs: pooledGraceMs })
        ) {
          this.inUse.delete(idx);
          freed.push(slot);
          left--;
          logger.info({ slot: idx, sandboxId: slot.sandboxId }, 'pooled VMM gone: its slot is freed at stop');
        }
      }
      // The last look is at or past the deadline: a slot handed out just before the stop has
      // then had the whole wait to get past its grace.
      if (!left || now >= deadline) break;
      await new Promise((resolve) => setTimeout(resolve, Math.min(100, deadline - now)));
    }
    return freed;
  }

  private handOut(slot: PoolSlot, sandboxId: string, pooled: boolean): PoolSlot {
    slot.sandboxId = sandboxId;
    slot.pooledAt = pooled ? Date.now() : undefined;
    this.inUse.set(slot.spec.idx, slot);
    // Off the acquire path: a mark a moment late costs only the window before a VMM runs in
    // the slot, which the in-use scan covers from then on.
    this.options
      .markOwner?.(slot.spec, { sandboxId, pooledAt: slot.pooledAt })
      .catch((err: unknown) =>
        this.options.logger.warn({ err, slot: slot.spec.idx, sandboxId }, 'marking the slot owner failed'),
      );
    return slot;
  }

  /** A slot goes back to the ready pool only whole: what it lost is put back, or it is removed. */
  private async reusable(slot: PoolSlot): Promise<boolean> {
    try {
      const fixed = (await this.options.repair?.(slot.spec)) ?? [];
      if (fixed.length)
        this.options.logger.warn({ slot: slot.spec.idx, fixed }, 'slot given back incomplete: repaired');
      await this.options.markOwner?.(slot.spec, { sandboxId: '' });
      return true;
    } catch (err) {
      this.options.logger.warn({ err, slot: slot.spec.idx }, 'slot given back cannot be repaired: removing it');
      return false;
    }
  }

  private deliver(waiter: Waiter, slot: PoolSlot): void {
    clearTimeout(waiter.timer);
    waiter.resolve(this.handOut(slot, waiter.sandboxId, waiter.pooled));
  }

  private dropWaiter(waiter: Waiter): void {
    const i = this.waiters.indexOf(waiter);
    if (i >= 0) this.waiters.splice(i, 1);
  }

  private kick(): void {
    const wake = this.wake;
    this.wake = undefined;
    wake?.();
  }

  private async refillLoop(): Promise<void> {
    const { batch, backoffMinMs, backoffMaxMs, logger } = this.options;
    let backoff = backoffMinMs;
    while (!this.stopped) {
      if (this.pendingReleases.length) {
        await this.retryPendingReleases();
        if (this.pendingReleases.length) this.lastError = 'reservation store unavailable for releases';
      }
      const want = this.options.newSize + this.waiters.length - this.readyNew.length - this.creating;
      if (want <= 0) {
        // Idle; with releases still owed to the store, come back after a backoff to retry them.
        await this.idle(this.pendingReleases.length ? backoff : undefined);
        if (this.pendingReleases.length) backoff = Math.min(backoff * 2, backoffMaxMs);
        continue;
      }
      const n = Math.min(want, batch);
      try {
        await this.createBatch(n);
        backoff = backoffMinMs;
        this.lastError = undefined;
      } catch (err) {
        this.counters.createErrors++;
        this.lastError = (err as Error).message;
        logger.error({ err, retryInMs: backoff }, 'slot pool refill failed');
        await this.sleep(backoff);
        backoff = Math.min(backoff * 2, backoffMaxMs);
      }
    }
  }

  private async createBatch(n: number): Promise<void> {
    const { reservation, layout, network } = this.options;
    this.creating += n;
    const reserved: ReservedSlot[] = [];
    try {
      const results = await Promise.allSettled(Array.from({ length: n }, () => reservation.reserve()));
      for (const r of results) if (r.status === 'fulfilled') reserved.push(r.value);
      const failure = results.find((r): r is PromiseRejectedResult => r.status === 'rejected');
      if (!reserved.length) throw failure?.reason ?? new Error('reservation returned nothing');
      const specs = reserved.map((r) => layout.slot(r.idx));
      const started = performance.now();
      try {
        await network.createMany(specs);
      } catch (err) {
        await this.releaseReservations(reserved);
        throw err;
      }
      const ms = performance.now() - started;
      this.options.onCreated?.(specs.length, ms);
      this.options.logger.debug({ slots: specs.length, ms: Math.round(ms) }, 'slot batch created');
      this.counters.created += specs.length;
      if (!failure) this.lastError = undefined;
      for (let i = 0; i < specs.length; i++) {
        const slot: PoolSlot = { spec: specs[i]!, reserved: reserved[i]!, sandboxId: '' };
        if (this.stopped) {
          this.readyNew.push(slot);
          continue;
        }
        const waiter = this.waiters.shift();
        if (waiter) this.deliver(waiter, slot);
        else this.readyNew.push(slot);
      }
      // Some reservations failed while others worked: report it so the loop backs off.
      if (failure) throw failure.reason;
    } finally {
      this.creating -= n;
    }
  }

  /** Removes a slot's network (batched with other removals of the same tick), then its reservation. */
  private remove(slot: PoolSlot): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      this.removeQueue.push({ slot, done: (err) => (err ? reject(err) : resolve()) });
      if (!this.removeScheduled) {
        this.removeScheduled = true;
        setImmediate(() => void this.flushRemovals());
      }
    });
  }

  private async flushRemovals(): Promise<void> {
    this.removeScheduled = false;
    const batch = this.removeQueue.splice(0);
    if (!batch.length) return;
    try {
      await this.options.network.removeMany(batch.map((b) => b.slot.spec));
    } catch (err) {
      this.counters.removeErrors += batch.length;
      this.options.logger.error({ err, slots: batch.map((b) => b.slot.spec.idx) }, 'slot removal failed');
      // Keep the reservation: the index must not be handed out while its namespace may linger.
      for (const b of batch) b.done(err as Error);
      return;
    }
    this.counters.removed += batch.length;
    await this.releaseReservations(batch.map((b) => b.slot.reserved));
    for (const b of batch) b.done();
  }

  private async releaseReservations(reserved: ReservedSlot[]): Promise<void> {
    await Promise.all(
      reserved.map(async (r) => {
        try {
          await this.options.reservation.release(r);
        } catch (err) {
          if ((err as { code?: string }).code === 'RESERVATION_UNAVAILABLE') {
            this.pendingReleases.push(r);
            this.kick();
          }
          this.options.logger.warn({ err, slot: r.idx }, 'releasing the slot reservation failed');
        }
      }),
    );
  }

  private async retryPendingReleases(): Promise<void> {
    const pending = this.pendingReleases.splice(0);
    // Still owed until the store answers: stats must not show them as settled meanwhile.
    this.retryingReleases += pending.length;
    try {
      await this.releaseReservations(pending);
    } finally {
      this.retryingReleases -= pending.length;
    }
  }

  private idle(ms: number | undefined): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = ms === undefined ? undefined : setTimeout(() => this.kick(), ms);
      this.wake = () => {
        clearTimeout(timer);
        resolve();
      };
      if (this.stopped) this.kick();
    });
  }

  private sleep(ms: number): Promise<void> {
    return new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        this.interruptSleep = undefined;
        resolve();
      }, ms);
      // A shutdown must not wait out a long backoff.
      this.interruptSleep = () => {
        clearTimeout(timer);
        resolve();
      };
    });
  }
}
