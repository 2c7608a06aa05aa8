import { runCommand } from './command-runner.js';
import type { SlotLayout, SlotSpec } from './slot-layout.js';

/**
 * Which sandbox holds a slot is written on the slot itself, as the ifalias of its host veth:
 * it lives exactly as long as the slot, survives a restart or crash of the agent, and needs no
 * state file. A restarted agent reads it to adopt slots that are handed out but have no VMM
 * running in them yet, with the sandbox id the orchestrator knows them by.
 */
const OWNER_PREFIX = 'sbx-sandbox:';

/** Marks `spec` as held by `sandboxId`; an empty id clears the mark (the slot is ready again). */
export async function markSlotOwner(spec: SlotSpec, sandboxId: string): Promise<void> {
  const alias = sandboxId ? `${OWNER_PREFIX}${sandboxId}` : '';
  await runCommand('ip', ['link', 'set', 'dev', spec.hostVeth, 'alias', alias], '', spec.namespace);
}

/** The marked slots of the agent's namespace, by index, with the sandbox holding each. */
export async function readSlotOwners(layout: SlotLayout): Promise<Map<number, string>> {
  const links = JSON.parse((await runCommand('ip', ['-j', 'link', 'show'])) || '[]') as Array<{
    ifname?: string;
    ifalias?: string;
  }>;
  const owners = new Map<number, string>();
  for (const link of links) {
    const idx = link.ifname ? layout.indexOfHostVeth(link.ifname) : undefined;
    if (idx !== undefined && link.ifalias?.startsWith(OWNER_PREFIX)) {
      owners.set(idx, link.ifalias.slice(OWNER_PREFIX.length));
    }
  }
  return owners;
}
