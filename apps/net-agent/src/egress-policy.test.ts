import { describe, expect, it } from 'vitest';
import { RequestInvalid } from '#service-kit';
import { egressRuleset, MAX_EGRESS_ENTRIES, parseEgressPolicy, parseEgressRule } from './egress-policy.js';
import type { SlotSpec } from './slot-layout.js';

const spec = { guestIp: '169.254.0.21', tapName: 'tap0' } as SlotSpec;
const none = { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };

describe('egress rules', () => {
  it('parses an address, a CIDR, a port and a port range', () => {
    expect(parseEgressRule('f', '8.8.8.8')).toEqual({ cidr: { base: 0x08080808, prefix: 32 } });
    expect(parseEgressRule('f', '10.1.0.0/16:443')).toEqual({
      cidr: { base: 0x0a010000, prefix: 16 },
      ports: { from: 443, to: 443 },
    });
    expect(parseEgressRule('f', '0.0.0.0/0:8000-8100').ports).toEqual({ from: 8000, to: 8100 });
  });

  it.each([
    ['1.2.3', 'not an IPv4 address'],
    ['1.2.3.4/24', 'host bits zero'],
    ['1.2.3.0/33', 'not an IPv4 address'],
    ['1.2.3.4:0', 'ports are 1-65535'],
    ['1.2.3.4:70000', 'ports are 1-65535'],
    ['1.2.3.4:90-80', 'ends before it starts'],
    ['example.com', 'not an address'],
    ['1.2.3.4:80,443', 'not an address'],
  ])('refuses %s naming the entry', (text, why) => {
    const err = (() => {
      try {
        parseEgressRule('egress.allowed_cidrs[2]', text);
      } catch (e) {
        return e as RequestInvalid;
      }
    })();
    expect(err).toBeInstanceOf(RequestInvalid);
    expect(err?.field).toBe('egress.allowed_cidrs[2]');
    expect(err?.message).toContain(why);
  });

  it('bounds each list, domain rules included, and names a bad domain entry', () => {
    const many = Array.from({ length: MAX_EGRESS_ENTRIES + 1 }, () => '1.1.1.1');
    expect(() => parseEgressPolicy({ ...none, deniedCidrs: many })).toThrow(/at most 256/);
    const names = Array.from({ length: MAX_EGRESS_ENTRIES + 1 }, (_, i) => `n${i}.example.com`);
    expect(() => parseEgressPolicy({ ...none, allowedDomains: names })).toThrow(/at most 256/);
    expect(() => parseEgressPolicy({ ...none, allowedDomains: ['ok.com', 'bad name'] })).toThrow(
      'egress.allowed_domains[1]',
    );
    expect(parseEgressPolicy({ ...none, allowedDomains: ['Example.COM.'] }).domains.entries).toEqual(['example.com']);
  });
});

describe('egress ruleset', () => {
  it('an open policy only removes the table', () => {
    const text = egressRuleset(spec, parseEgressPolicy({ ...none, allowedCidrs: ['1.1.1.1'] }));
    expect(text).toBe('add table ip sbx_egress\ndelete table ip sbx_egress\n');
  });

  it('allows first, then denies, then refuses everything without internet; judged on the original tuple', () => {
    const text = egressRuleset(
      spec,
      parseEgressPolicy({ ...none, denyInternet: true, allowedCidrs: ['1.2.3.0/24:80-443'], deniedCidrs: ['1.2.3.4'] }),
    );
    const lines = text.split('\n').map((l) => l.trim());
    const allow = lines.indexOf(
      'meta l4proto { tcp, udp } ct original ip daddr 1.2.3.0/24 ct original proto-dst 80-443 accept',
    );
    const deny = lines.indexOf('ct original ip daddr 1.2.3.4/32 goto refuse');
    const all = lines.indexOf('goto refuse');
    expect(lines).toContain('ct original ip saddr != 169.254.0.21 accept');
    expect(allow).toBeGreaterThan(0);
    expect(deny).toBeGreaterThan(allow);
    expect(all).toBeGreaterThan(deny);
    expect(text.startsWith('add table ip sbx_egress\ndelete table ip sbx_egress\ntable ip sbx_egress {')).toBe(true);
  });

  it('redirects the guest TCP to the proxy only when names can allow what addresses refuse', () => {
    const redirect = 'iifname "tap0" meta l4proto tcp redirect to :15001';
    const withNames = parseEgressPolicy({ ...none, denyInternet: true, allowedDomains: ['a.com'] });
    expect(egressRuleset(spec, withNames, 15001)).toContain(redirect);
    // Nothing denied: names change nothing, no table at all.
    const open = parseEgressPolicy({ ...none, allowedDomains: ['a.com'] });
    expect(egressRuleset(spec, open, 15001)).toBe('add table ip sbx_egress\ndelete table ip sbx_egress\n');
    const cidrsOnly = parseEgressPolicy({ ...none, denyInternet: true, allowedCidrs: ['1.1.1.1'] });
    expect(egressRuleset(spec, cidrsOnly, 15001)).not.toContain('redirect');
  });
});
