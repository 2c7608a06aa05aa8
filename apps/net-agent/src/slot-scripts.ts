/**
 * The text of the `ip -batch` and `nft -f` programs that build and tear down slots: pure
 * functions, so every rule a slot gets can be read and tested without touching the kernel.
 */
import type { SlotSpec } from './slot-layout.js';
import { blockSize, formatCidr, parseCidr, parseIpv4, type Cidr } from './ipv4.js';

export interface HostRulesConfig {
  hostTable: string;
  uplink: string;
}

export interface SlotRulesConfig {
  slotTable: string;
  blockedRanges: string[];
  metadataAddress: string;
}

/** Names of the sets in the host table; a slot's host rules are one element in each. */
export const HOST_VETH_SET = 'slot_veths';
export const HOST_IP_SET = 'slot_hosts';

/** In the agent's namespace: the slot namespaces, veth pairs, host addresses and host routes. */
export function hostCreateBatch(slots: SlotSpec[]): string {
  const lines: string[] = [];
  for (const s of slots) {
    lines.push(
      `netns add ${s.namespace}`,
      `link add ${s.hostVeth} type veth peer name ${s.nsVeth} netns ${s.namespace}`,
      `addr add ${s.hostVethIp}/31 dev ${s.hostVeth}`,
      `link set ${s.hostVeth} up`,
      `route add ${s.hostIp}/32 via ${s.nsVethIp} dev ${s.hostVeth}`,
    );
  }
  return lines.join('\n') + '\n';
}

/**
 * In the agent's namespace, run with `ip -force`: the host veths of a batch are put in one
 * interface group and deleted with one `link del group` (one kernel grace period for the batch
 * instead of one per device), then the namespaces are unmounted. Deleting a veth takes its
 * peer, addresses and host route with it.
 */
export function hostRemoveBatch(slots: SlotSpec[], group: number): string {
  const lines: string[] = [];
  for (const s of slots) lines.push(`link set ${s.hostVeth} group ${group}`);
  lines.push(`link del group ${group}`);
  for (const s of slots) lines.push(`netns del ${s.namespace}`);
  return lines.join('\n') + '\n';
}

/** Inside the slot's namespace: loopback, the namespace side of the veth, the tap, the default route. */
export function namespaceBatch(s: SlotSpec): string {
  return [
    'link set lo up',
    `addr add ${s.nsVethIp}/31 dev ${s.nsVeth}`,
    `link set ${s.nsVeth} up`,
    `tuntap add dev ${s.tapName} mode tap`,
    `addr add ${s.tapIp}/${s.tapPrefix} dev ${s.tapName}`,
    `link set ${s.tapName} up`,
    `route add default via ${s.hostVethIp} dev ${s.nsVeth}`,
    '',
  ].join('\n');
}

/**
 * Inside the slot's namespace, one nft transaction: DNAT host IP → guest in from the veth,
 * SNAT guest → host IP out of it, and egress from the tap to private and link-local ranges
 * dropped unless the connection is an established one (replies to what the node opened).
 */
export function namespaceRuleset(s: SlotSpec, config: SlotRulesConfig): string {
  const blocked = normalizeRanges([...config.blockedRanges, config.metadataAddress]).map(formatCidr);
  const t = config.slotTable;
  return [
    `table ip ${t} {`,
    `  chain prerouting {`,
    `    type nat hook prerouting priority dstnat; policy accept;`,
    `    iifname "${s.nsVeth}" ip daddr ${s.hostIp} dnat to ${s.guestIp}`,
    `  }`,
    `  chain postrouting {`,
    `    type nat hook postrouting priority srcnat; policy accept;`,
    `    oifname "${s.nsVeth}" ip saddr ${s.guestIp} snat to ${s.hostIp}`,
    `  }`,
    `  chain forward {`,
    `    type filter hook forward priority filter; policy accept;`,
    `    iifname "${s.tapName}" ct state established,related accept`,
    ...(blocked.length ? [`    iifname "${s.tapName}" ip daddr { ${blocked.join(', ')} } drop`] : []),
    `  }`,
    `}`,
    '',
  ].join('\n');
}

/**
 * The host table, replaced as a whole in one transaction (the `add`/`delete` first makes the
 * replace work whether or not a previous run left the table behind). `present` are slots whose
 * host rules must be in it from the start (slots adopted at reconcile).
 */
export function hostTableRuleset(config: HostRulesConfig, present: SlotSpec[]): string {
  const t = config.hostTable;
  const u = config.uplink;
  const lines = [
    `add table ip ${t}`,
    `delete table ip ${t}`,
    `table ip ${t} {`,
    `  set ${HOST_VETH_SET} { type ifname; }`,
    `  set ${HOST_IP_SET} { type ipv4_addr; }`,
    `  chain forward {`,
    `    type filter hook forward priority filter; policy accept;`,
    `    iifname @${HOST_VETH_SET} oifname "${u}" accept`,
    `    iifname "${u}" oifname @${HOST_VETH_SET} accept`,
    `  }`,
    `  chain postrouting {`,
    `    type nat hook postrouting priority srcnat; policy accept;`,
    `    oifname "${u}" ip saddr @${HOST_IP_SET} masquerade`,
    `  }`,
    `}`,
  ];
  if (present.length) lines.push(hostElements('add', t, present).trimEnd());
  return lines.join('\n') + '\n';
}

/** One transaction adding (or deleting) the host rules of a batch of slots. */
export function hostElements(op: 'add' | 'delete', table: string, slots: SlotSpec[]): string {
  return hostSetElements(
    op,
    table,
    slots.map((s) => s.hostVeth),
    slots.map((s) => s.hostIp),
  );
}

/** The same for explicit element lists; a set with nothing to change gets no line. */
export function hostSetElements(op: 'add' | 'delete', table: string, veths: string[], ips: string[]): string {
  let out = '';
  if (veths.length) out += `${op} element ip ${table} ${HOST_VETH_SET} { ${veths.map((v) => `"${v}"`).join(', ')} }\n`;
  if (ips.length) out += `${op} element ip ${table} ${HOST_IP_SET} { ${ips.join(', ')} }\n`;
  return out;
}

export function hostTableDelete(table: string): string {
  return `add table ip ${table}\ndelete table ip ${table}\n`;
}

/** Sorted, with blocks inside other blocks dropped: nft refuses overlapping elements in one set. */
export function normalizeRanges(ranges: string[]): Cidr[] {
  const parsed = ranges.map((r) => parseCidr(r.includes('/') ? r : `${formatAddress(r)}/32`));
  parsed.sort((a, b) => a.base - b.base || a.prefix - b.prefix);
  const out: Cidr[] = [];
  for (const c of parsed) {
    const last = out[out.length - 1];
    if (last && c.base >= last.base && c.base + blockSize(c.prefix) <= last.base + blockSize(last.prefix)) continue;
    out.push(c);
  }
  return out;
}

function formatAddress(address: string): string {
  parseIpv4(address);
  return address;
}
