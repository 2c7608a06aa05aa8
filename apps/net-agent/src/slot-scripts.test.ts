import { describe, expect, it } from 'vitest';
import { loadNetAgentConfig } from './net-agent-config.js';
import { SlotLayout } from './slot-layout.js';
import { formatCidr } from './ipv4.js';
import {
  hostCreateBatch,
  hostElements,
  hostRemoveBatch,
  hostTableRuleset,
  namespaceBatch,
  namespaceRuleset,
  normalizeRanges,
} from './slot-scripts.js';

const config = loadNetAgentConfig({ argv: [], env: {} });
const layout = new SlotLayout(config);
const s = layout.slot(7);

describe('slot scripts', () => {
  it('host batch: namespace, veth pair into it, host address, host route to the host IP', () => {
    expect(hostCreateBatch([s]).split('\n')).toEqual([
      'netns add ns-7',
      'link add veth-7 type veth peer name eth0 netns ns-7',
      'addr add 10.12.0.14/31 dev veth-7',
      'link set veth-7 up',
      'route add 10.11.0.8/32 via 10.12.0.15 dev veth-7',
      '',
    ]);
  });

  it('namespace batch: veth side, tap with its /30, default route via the host side', () => {
    expect(namespaceBatch(s)).toContain('tuntap add dev tap0 mode tap');
    expect(namespaceBatch(s)).toContain('addr add 169.254.0.22/30 dev tap0');
    expect(namespaceBatch(s)).toContain('route add default via 10.12.0.14 dev eth0');
  });

  it('namespace rules: DNAT in, SNAT out, egress to private and link-local dropped unless established', () => {
    const rules = namespaceRuleset(s, config);
    expect(rules).toContain('iifname "eth0" ip daddr 10.11.0.8 dnat to 169.254.0.21');
    expect(rules).toContain('oifname "eth0" ip saddr 169.254.0.21 snat to 10.11.0.8');
    const established = rules.indexOf('iifname "tap0" ct state established,related accept');
    const drop = rules.indexOf(
      'iifname "tap0" ip daddr { 10.0.0.0/8, 169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16 } drop',
    );
    expect(established).toBeGreaterThan(0);
    expect(drop).toBeGreaterThan(established);
  });

  it('a metadata address outside the blocked ranges is blocked on its own', () => {
    const rules = namespaceRuleset(s, { ...config, blockedRanges: ['10.0.0.0/8'], metadataAddress: '100.100.100.200' });
    expect(rules).toContain('ip daddr { 10.0.0.0/8, 100.100.100.200/32 } drop');
  });

  it('normalizes ranges: nested blocks dropped (nft refuses overlapping set elements)', () => {
    const ranges = normalizeRanges(['169.254.169.254', '10.0.0.0/8', '10.1.0.0/16', '169.254.0.0/16', '10.0.0.0/8']);
    expect(ranges.map(formatCidr)).toEqual(['10.0.0.0/8', '169.254.0.0/16']);
  });

  it('host table: replaced whole, forwarding and masquerade keyed on per-slot set elements', () => {
    const text = hostTableRuleset({ hostTable: 'sbx_net', uplink: 'up0' }, [s]);
    expect(text.startsWith('add table ip sbx_net\ndelete table ip sbx_net\n')).toBe(true);
    expect(text).toContain('iifname @slot_veths oifname "up0" accept');
    expect(text).toContain('iifname "up0" oifname @slot_veths accept');
    expect(text).toContain('oifname "up0" ip saddr @slot_hosts masquerade');
    expect(text).toContain('add element ip sbx_net slot_veths { "veth-7" }');
    expect(hostElements('delete', 'sbx_net', [s, layout.slot(8)])).toBe(
      'delete element ip sbx_net slot_veths { "veth-7", "veth-8" }\ndelete element ip sbx_net slot_hosts { 10.11.0.8, 10.11.0.9 }\n',
    );
  });

  it('removal: one group delete for the batch, then the namespaces', () => {
    expect(hostRemoveBatch([s, layout.slot(8)], 1457).split('\n')).toEqual([
      'link set veth-7 group 1457',
      'link set veth-8 group 1457',
      'link del group 1457',
      'netns del ns-7',
      'netns del ns-8',
      '',
    ]);
  });
});
