/**
 * A sandbox's egress policy (E2B's `allow_internet_access` and `network.egress`) as packet-filter
 * rules in its slot namespace. Order as E2B's: an allow match wins, then a deny match refuses,
 * otherwise the connection is allowed; with internet access off everything not allowed is refused.
 * The always-denied ranges (private, link-local, metadata) stay in the slot table, whose drop an
 * accept here cannot override.
 *
 * Every packet of a connection the guest opened is judged on the connection's original
 * destination (`ct original`), in both directions, not only its first packet: replacing the
 * table (one transaction) is then enough to cut connections the new policy forbids, with no
 * conntrack flush and no window where they still pass.
 */
import { RequestInvalid } from '#service-kit';
import { parseDomainRules, type DomainRules } from './domain-rules.js';
import { formatCidr, parseCidr, type Cidr } from './ipv4.js';
import type { SlotSpec } from './slot-layout.js';

export const EGRESS_TABLE = 'sbx_egress';
/** Bound on each list, so one request cannot make a ruleset every packet walks for long. */
export const MAX_EGRESS_ENTRIES = 256;

export interface EgressPolicyInput {
  denyInternet: boolean;
  allowedCidrs: string[];
  deniedCidrs: string[];
  allowedDomains: string[];
}

export interface EgressRule {
  cidr: Cidr;
  /** Inclusive; absent = every protocol and port. With ports the rule matches TCP and UDP. */
  ports?: { from: number; to: number };
}

export interface EgressPolicy {
  denyInternet: boolean;
  allow: EgressRule[];
  deny: EgressRule[];
  /** Names a connection may ask for (TLS SNI / HTTP Host); judged by the egress proxy. */
  domains: DomainRules;
  /** What it was parsed from (kept with the slot so a restarted agent can serve it again). */
  source: EgressPolicyInput;
}

const RULE = /^([0-9.]+(?:\/\d{1,2})?)(?::(\d{1,5})(?:-(\d{1,5}))?)?$/;

/** `a.b.c.d`, `a.b.c.d/n`, either followed by `:port` or `:from-to`. */
export function parseEgressRule(field: string, text: string): EgressRule {
  const m = RULE.exec(text.trim());
  const bad = (why: string) =>
    new RequestInvalid(field, `${JSON.stringify(text)}: ${why} (expected a.b.c.d[/n][:port[-port]])`);
  if (!m) throw bad('not an address or CIDR with an optional port or port range');
  let cidr: Cidr;
  try {
    cidr = parseCidr(m[1]!);
  } catch {
    throw bad('not an IPv4 address or CIDR block with host bits zero');
  }
  if (m[2] === undefined) return { cidr };
  const from = Number(m[2]);
  const to = m[3] === undefined ? from : Number(m[3]);
  if (from < 1 || from > 65535 || to < 1 || to > 65535) throw bad('ports are 1-65535');
  if (to < from) throw bad('port range ends before it starts');
  return { cidr, ports: { from, to } };
}

export function parseEgressPolicy(input: EgressPolicyInput, prefix = 'egress.'): EgressPolicy {
  const list = (name: string, entries: string[]) => {
    if (entries.length > MAX_EGRESS_ENTRIES)
      throw new RequestInvalid(`${prefix}${name}`, `at most ${MAX_EGRESS_ENTRIES} entries (got ${entries.length})`);
    return entries.map((e, i) => parseEgressRule(`${prefix}${name}[${i}]`, e));
  };
  if (input.allowedDomains.length > MAX_EGRESS_ENTRIES) {
    throw new RequestInvalid(
      `${prefix}allowed_domains`,
      `at most ${MAX_EGRESS_ENTRIES} entries (got ${input.allowedDomains.length})`,
    );
  }
  return {
    denyInternet: input.denyInternet,
    allow: list('allowed_cidrs', input.allowedCidrs),
    deny: list('denied_cidrs', input.deniedCidrs),
    domains: parseDomainRules(`${prefix}allowed_domains`, input.allowedDomains),
    source: {
      denyInternet: input.denyInternet,
      allowedCidrs: [...input.allowedCidrs],
      deniedCidrs: [...input.deniedCidrs],
      allowedDomains: [...input.allowedDomains],
    },
  };
}

/**
 * True when the policy lets everything through (then the slot needs no egress table). Allowed
 * names change nothing when nothing is denied.
 */
export function isOpenPolicy(p: EgressPolicy): boolean {
  return !p.denyInternet && p.deny.length === 0;
}

/**
 * True when names can allow what addresses refuse: the guest's TCP then goes through the egress
 * proxy, which reads the name each connection asks for.
 */
export function usesProxy(p: EgressPolicy): boolean {
  return !isOpenPolicy(p) && p.domains.entries.length > 0;
}

function ruleMatch(r: EgressRule): string {
  const net = `ct original ip daddr ${formatCidr(r.cidr)}`;
  if (!r.ports) return net;
  const ports = r.ports.from === r.ports.to ? `${r.ports.from}` : `${r.ports.from}-${r.ports.to}`;
  return `meta l4proto { tcp, udp } ${net} ct original proto-dst ${ports}`;
}

/**
 * One nft transaction replacing the slot's egress table (the `add`/`delete` make it work whether
 * or not a table is there); an open policy only deletes it. With domain rules every new TCP
 * connection from the guest, whatever its port, is redirected to the egress proxy listening on
 * `proxyPort` in the slot namespace (it judges addresses and names itself, always-denied ranges
 * included, since redirected connections never reach the forward hooks); the forward rules still
 * judge everything else (UDP, ICMP) and TCP connections opened before the redirect existed.
 */
export function egressRuleset(s: SlotSpec, p: EgressPolicy, proxyPort = 0): string {
  const lines = [`add table ip ${EGRESS_TABLE}`, `delete table ip ${EGRESS_TABLE}`];
  if (isOpenPolicy(p)) return lines.join('\n') + '\n';
  lines.push(
    `table ip ${EGRESS_TABLE} {`,
    `  chain forward {`,
    // Before the slot table's filter, so a refused packet never reaches its accepts.
    `    type filter hook forward priority filter - 1; policy accept;`,
    // Connections the guest did not open (the node reaching the guest) are not egress.
    `    ct original ip saddr != ${s.guestIp} accept`,
    ...p.allow.map((r) => `    ${ruleMatch(r)} accept`),
    ...p.deny.map((r) => `    ${ruleMatch(r)} goto refuse`),
    ...(p.denyInternet ? ['    goto refuse'] : []),
    `  }`,
    ...(usesProxy(p)
      ? [
          `  chain to_proxy {`,
          `    type nat hook prerouting priority dstnat; policy accept;`,
          `    iifname "${s.tapName}" meta l4proto tcp redirect to :${proxyPort}`,
          `  }`,
        ]
      : []),
    `  chain refuse {`,
    // The guest learns at once (reset / unreachable) instead of waiting out its timeouts.
    `    iifname "${s.tapName}" meta l4proto tcp reject with tcp reset`,
    `    iifname "${s.tapName}" reject with icmp type admin-prohibited`,
    `    drop`,
    `  }`,
    `}`,
  );
  return lines.join('\n') + '\n';
}
