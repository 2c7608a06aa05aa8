/**
 * A sandbox's egress policy as E2B's API carries it (`allow_internet_access`, `network.egress`),
 * turned into what net-agent applies in the sandbox's slot: CIDR rules in the slot's packet
 * filter, domain rules through its egress proxy. Entries are checked by net-agent
 * (INVALID_ARGUMENT naming the entry).
 */
import type { SandboxNetworkEgressConfig } from '#proto/orchestrator';
import type { NetEgressPolicy } from '#proto/sbx/net';

/** Undefined when the sandbox asks for nothing beyond the always-denied ranges. */
export function netEgressPolicy(
  allowInternetAccess: boolean | undefined,
  egress: SandboxNetworkEgressConfig | undefined,
): NetEgressPolicy | undefined {
  const policy: NetEgressPolicy = {
    denyInternet: allowInternetAccess === false,
    allowedCidrs: egress?.allowedCidrs ?? [],
    deniedCidrs: egress?.deniedCidrs ?? [],
    allowedDomains: egress?.allowedDomains ?? [],
  };
  const empty = policy.allowedCidrs.length + policy.deniedCidrs.length + policy.allowedDomains.length === 0;
  return empty && !policy.denyInternet ? undefined : policy;
}
