import { describe, expect, it } from 'vitest';
import { parseEgressPolicy } from './egress-policy.js';
import { judge } from './egress-verdict.js';
import { parseCidr, parseIpv4 } from './ipv4.js';

const none = { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };
const alwaysDenied = ['10.0.0.0/8', '169.254.0.0/16', '127.0.0.0/8'].map(parseCidr);
const to = (address: string, port: number) => ({ address: parseIpv4(address), port });

describe('egress verdict', () => {
  it("E2B's order: an allowed name or address wins, then a denied address refuses, else allowed", () => {
    const p = parseEgressPolicy({
      ...none,
      allowedCidrs: ['1.2.3.4:443'],
      deniedCidrs: ['1.2.3.0/24'],
      allowedDomains: ['ok.com'],
    });
    expect(judge(p, alwaysDenied, to('1.2.3.4', 443))).toEqual({ allow: true, dial: 'destination' });
    expect(judge(p, alwaysDenied, to('1.2.3.4', 80))).toEqual({ allow: false, reason: 'denied address' });
    expect(judge(p, alwaysDenied, to('1.2.3.4', 80), 'ok.com')).toEqual({ allow: true, dial: 'name', name: 'ok.com' });
    expect(judge(p, alwaysDenied, to('1.2.3.4', 80), 'no.com').allow).toBe(false);
    expect(judge(p, alwaysDenied, to('8.8.8.8', 80), 'no.com')).toEqual({ allow: true, dial: 'destination' });
  });

  it('internet access off refuses what nothing allows; always-denied ranges stay refused without a name', () => {
    const p = parseEgressPolicy({ ...none, denyInternet: true, allowedCidrs: ['10.1.0.0/16'], allowedDomains: ['*'] });
    expect(judge(p, alwaysDenied, to('8.8.8.8', 80)).allow).toBe(false);
    expect(judge(p, alwaysDenied, to('10.1.2.3', 80))).toEqual({ allow: false, reason: 'always-denied range' });
    // A name is dialed where the node resolves it, so the address the guest chose does not matter.
    expect(judge(p, alwaysDenied, to('169.254.169.254', 80), 'x.com').allow).toBe(true);
  });
});
