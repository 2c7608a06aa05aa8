/**
 * How the egress proxy judges one TCP connection, in E2B's order: an allow match (an allowed
 * address/port, or an allowed name) wins, then a deny match refuses, otherwise the connection is
 * allowed (refused with internet access off). Always-denied ranges are refused whatever the rules
 * say. A connection allowed by its name is dialed to the name (resolved by the node), never to the
 * address the guest chose.
 */
import { domainAllowed } from './domain-rules.js';
import type { EgressPolicy, EgressRule } from './egress-policy.js';
import { cidrContains, type Cidr } from './ipv4.js';

export type Verdict =
  { allow: true; dial: 'destination' } | { allow: true; dial: 'name'; name: string } | { allow: false; reason: string };

export interface Destination {
  /** As a 32-bit number (parseIpv4). */
  address: number;
  port: number;
}

function matches(r: EgressRule, d: Destination): boolean {
  return cidrContains(r.cidr, d.address) && (!r.ports || (d.port >= r.ports.from && d.port <= r.ports.to));
}

export function inRanges(ranges: Cidr[], address: number): boolean {
  return ranges.some((c) => cidrContains(c, address));
}

/** `name` is normalized; absent when the connection carries none (or it was not read). */
export function judge(p: EgressPolicy, alwaysDenied: Cidr[], d: Destination, name?: string): Verdict {
  if (name !== undefined && domainAllowed(p.domains, name)) return { allow: true, dial: 'name', name };
  if (inRanges(alwaysDenied, d.address)) return { allow: false, reason: 'always-denied range' };
  if (p.allow.some((r) => matches(r, d))) return { allow: true, dial: 'destination' };
  if (p.deny.some((r) => matches(r, d))) return { allow: false, reason: 'denied address' };
  if (p.denyInternet) return { allow: false, reason: name === undefined ? 'no allowed address' : 'name not allowed' };
  return { allow: true, dial: 'destination' };
}
