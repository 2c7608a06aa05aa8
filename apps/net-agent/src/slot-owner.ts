import { runCommand } from './command-runner.js';
import type { SlotLayout, SlotSpec } from './slot-layout.js';

/**
 * Which sandbox holds a slot is written on the slot itself, as the ifalias of its host veth:
 * it lives exactly as long as the slot, survives a restart or crash of the agent, and needs no
 * state file. A restarted agent reads it to adopt slots that are handed out but have no VMM
 * running in them yet, with the sandbox id the orchestrator knows them by.
 *
 * A slot acquired for a VMM started ahead (the orchestrator's VMM pool) is marked with its own
 * prefix and the time it was handed out: `sbx-pool:<ms>:<id>`. Such a slot whose namespace holds
 * no process is freed by a stopping or starting agent (pool-slots.ts), as its holder's Release
 * may never come.
 */
const OWNER_PREFIX = 'sbx-sandbox:';
const POOL_PREFIX = 'sbx-pool:';

export interface SlotOwner {
  sandboxId: string;
  /** When the slot was handed out to a pooled VMM (epoch ms); undefined for a sandbox's slot. */
  pooledAt?: number;
}

/** Marks `spec` as held by `owner`; an empty id clears the mark (the slot is ready again). */
export async function markSlotOwner(spec: SlotSpec, owner: SlotOwner): Promise<void> {
  await runCommand('ip', ['link', 'set', 'dev', spec.hostVeth, 'alias', ownerAlias(owner)], '', spec.namespace);
}

export function ownerAlias(owner: SlotOwner): string {
  if (!owner.sandboxId) return '';
  if (owner.pooledAt === undefined) return `${OWNER_PREFIX}${owner.sandboxId}`;
  return `${POOL_PREFIX}${Math.round(owner.pooledAt)}:${owner.sandboxId}`;
}

export function parseOwnerAlias(alias: string | undefined): SlotOwner | undefined {
  if (alias?.startsWith(OWNER_PREFIX)) return { sandboxId: alias.slice(OWNER_PREFIX.length) };
  const m = alias?.startsWith(POOL_PREFIX) ? /^(\d+):(.+)$/.exec(alias.slice(POOL_PREFIX.length)) : null;
  return m ? { sandboxId: m[2]!, pooledAt: Number(m[1]) } : undefined;
}

/** The marked slots of the agent's namespace, by index, with the sandbox holding each. */
export async function readSlotOwners(layout: SlotLayout): Promise<Map<number, SlotOwner>> {
  const links = JSON.parse((await runCommand('ip', ['-j', 'link', 'show'])) || '[]') as Array<{
    ifname?: string;
    ifalias?: string;
  }>;
  const owners = new Map<number, SlotOwner>();
  for (const link of links) {
    const idx = link.ifname ? layout.indexOfHostVeth(link.ifname) : undefined;
    const owner = parseOwnerAlias(link.ifalias);
    if (idx !== undefined && owner) owners.set(idx, owner);
  }
  return owners;
}

/**
 * A pooled VMM's slot nobody will give back: no process in its namespace, and either one was
 * seen there and has gone (the VMM ended) or it was handed out more than `graceMs` ago (time
 * enough to start the VMM). A fresh one without a process yet is kept: its VMM may be starting,
 * and freeing it would let the index go to another sandbox while the pool still counts on it.
 */
export function poolSlotAbandoned(
  owner: SlotOwner | undefined,
  use: { busy: boolean; seenBusy?: boolean; now: number; graceMs: number },
): boolean {
  if (owner?.pooledAt === undefined || use.busy) return false;
  return use.seenBusy === true || use.now - owner.pooledAt >= use.graceMs;
}
