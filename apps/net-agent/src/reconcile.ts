import type { Logger } from '#logging';
import type { PoolSlot } from './slot-pool.js';
import type { SlotLayout, SlotSpec } from './slot-layout.js';
import type { SlotNetwork } from './slot-network.js';
import type { ReservedSlot, SlotReservation } from './slot-reservation.js';
import { poolSlotAbandoned, readSlotOwners } from './slot-owner.js';

export interface ReconcileResult {
  /** Slots a sandbox holds (marked with its id, or a process runs in the namespace): kept, as in use. */
  adopted: PoolSlot[];
  /** Adopted slots that had lost a piece, and what was put back. */
  repaired: Array<{ idx: number; fixed: string[] }>;
  /** Leftover slots (namespace and/or host veth) removed from the node. */
  removed: number;
  /** Reservations of this node that no slot backs any more, released. */
  released: number;
  ms: number;
}

/**
 * Start-up clean-up after a crashed run. Everything on the node that follows our naming and
 * that no process uses is removed in one batch (one `ip -batch`, one group delete: seconds for
 * thousands, where removing them one by one took E2B 20-30 minutes, e2b-dev/infra#3615);
 * reservations held for this node without a live slot are released; slots a sandbox holds (its
 * id on the slot, or a process in its namespace) are adopted with their reservation, and what
 * they lost (a veth, the tap, rules) is put back.
 */
export async function reconcile(options: {
  network: SlotNetwork;
  reservation: SlotReservation;
  layout: SlotLayout;
  logger: Logger;
  /** Puts back what an adopted slot lost; without it, slots are adopted as found. */
  repair?: (spec: SlotSpec) => Promise<string[]>;
  /** A pooled VMM's slot without a process is kept only while handed out less than this ago. */
  pooledGraceMs?: number;
}): Promise<ReconcileResult> {
  const { network, reservation, layout, logger } = options;
  const started = performance.now();
  const scan = await network.scan(true);
  const owners = await readSlotOwners(layout);
  const held = new Map((await reservation.held()).map((r) => [r.idx, r]));

  const adopted: PoolSlot[] = [];
  const repaired: Array<{ idx: number; fixed: string[] }> = [];
  const holding = new Set(scan.inUse);
  const now = Date.now();
  for (const [idx, owner] of owners) {
    if (!scan.namespaces.has(idx)) continue;
    // A pooled VMM's slot with no process left: its VMM is gone and nobody will give it back.
    const use = { busy: scan.inUse.has(idx), now, graceMs: options.pooledGraceMs ?? 5000 };
    if (poolSlotAbandoned(owner, use)) {
      logger.info({ slot: idx, sandboxId: owner.sandboxId }, 'pooled VMM gone: its slot is removed, not adopted');
      continue;
    }
    holding.add(idx);
  }
  for (const idx of [...holding].sort((a, b) => a - b)) {
    let reserved: ReservedSlot | undefined = held.get(idx);
    if (!reserved && (await reservation.claim(idx))) reserved = { idx, key: reservation.keyOf(idx) };
    if (!reserved) {
      logger.error({ slot: idx }, 'slot in use on this node but reserved by someone else: left alone');
      continue;
    }
    const spec = layout.slot(idx);
    try {
      const fixed = (await options.repair?.(spec)) ?? [];
      if (fixed.length) {
        repaired.push({ idx, fixed });
        logger.warn(
          { slot: idx, sandboxId: owners.get(idx)?.sandboxId, fixed },
          'adopted slot was incomplete: repaired',
        );
      }
    } catch (err) {
      logger.error({ err, slot: idx, sandboxId: owners.get(idx)?.sandboxId }, 'adopted slot could not be repaired');
    }
    const owner = owners.get(idx);
    adopted.push({ spec, reserved, sandboxId: owner?.sandboxId ?? '', pooledAt: owner?.pooledAt });
  }
  const keep = new Set(adopted.map((s) => s.spec.idx));
  // Slots in use but not adoptable (reserved elsewhere) are left alone too.
  for (const idx of holding) keep.add(idx);

  const leftovers = new Set<number>();
  for (const idx of scan.namespaces.keys()) if (!keep.has(idx)) leftovers.add(idx);
  for (const idx of scan.hostVeths.keys()) if (!keep.has(idx)) leftovers.add(idx);
  const specs = [...leftovers].sort((a, b) => a - b).map((idx) => layout.slot(idx));
  if (specs.length) await network.removeMany(specs, { hostRules: false });

  const foreign = [...held.values()].filter((r) => !keep.has(r.idx) && r.fromPredecessor === false);
  if (foreign.length) {
    logger.warn(
      { slots: foreign.map((r) => r.idx).slice(0, 50), count: foreign.length },
      'reservations under this node id held by an agent elsewhere (same --node-id twice?): left alone',
    );
  }
  const stale = [...held.values()].filter((r) => !keep.has(r.idx) && r.fromPredecessor !== false);
  let released = 0;
  for (let i = 0; i < stale.length; i += 64) {
    const results = await Promise.allSettled(stale.slice(i, i + 64).map((r) => reservation.release(r)));
    for (const r of results) {
      if (r.status === 'fulfilled') released++;
      else logger.warn({ err: r.reason }, 'releasing a stale reservation failed');
    }
  }
  const result = { adopted, repaired, removed: specs.length, released, ms: Math.round(performance.now() - started) };
  logger.info(
    {
      adopted: adopted.map((s) => s.spec.idx),
      repaired: repaired.map((r) => r.idx),
      removed: result.removed,
      released,
      ms: result.ms,
    },
    'reconciled leftovers',
  );
  return result;
}
