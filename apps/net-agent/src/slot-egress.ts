/**
 * Installs a sandbox's egress policy in its slot namespace: one `nft -f` transaction, so the
 * old policy holds until the new one holds whole (see egress-policy.ts for why that also cuts
 * connections the new policy forbids).
 */
import { runCommand } from './command-runner.js';
import { egressRuleset, type EgressPolicy } from './egress-policy.js';
import type { SlotSpec } from './slot-layout.js';
import { NETNS_DIR } from './slot-network.js';

export const OPEN_POLICY: EgressPolicy = { denyInternet: false, allow: [], deny: [] };

export async function applyEgress(spec: SlotSpec, policy: EgressPolicy): Promise<void> {
  await runCommand(
    'nsenter',
    [`--net=${NETNS_DIR}/${spec.namespace}`, 'nft', '-f', '-'],
    egressRuleset(spec, policy),
    spec.namespace,
  );
}
