import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { cidrContains, cidrsOverlap, formatIpv4, Ipv4Invalid, parseCidr, parseIpv4 } from './ipv4.js';

describe('ipv4', () => {
  it('parses and formats every address back to itself', () => {
    fc.assert(fc.property(fc.ipV4(), (ip) => formatIpv4(parseIpv4(ip)) === ip));
    fc.assert(fc.property(fc.integer({ min: 0, max: 0xffffffff }), (n) => parseIpv4(formatIpv4(n)) === n));
  });

  it('rejects malformed addresses and blocks with host bits set', () => {
    for (const bad of [
      '',
      '1.2.3',
      '1.2.3.4.5',
      '256.0.0.1',
      '01.2.3.4',
      '1.2.3.-1',
      ' 1.2.3.4',
      '1.2.3.4 ',
      'a.b.c.d',
    ]) {
      expect(() => parseIpv4(bad), bad).toThrow(Ipv4Invalid);
    }
    for (const bad of ['10.0.0.1/8', '10.0.0.0/33', '10.0.0.0/', '10.0.0.0/08x', '/8']) {
      expect(() => parseCidr(bad), bad).toThrow(Ipv4Invalid);
    }
  });

  it('never throws anything but Ipv4Invalid on random input', () => {
    fc.assert(
      fc.property(fc.string({ maxLength: 24 }), (text) => {
        for (const parse of [parseIpv4, parseCidr]) {
          try {
            parse(text);
          } catch (err) {
            expect(err).toBeInstanceOf(Ipv4Invalid);
          }
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('answers containment and overlap', () => {
    const ten = parseCidr('10.0.0.0/8');
    expect(cidrContains(ten, parseIpv4('10.255.255.255'))).toBe(true);
    expect(cidrContains(ten, parseIpv4('11.0.0.0'))).toBe(false);
    expect(cidrsOverlap(ten, parseCidr('10.12.0.0/16'))).toBe(true);
    expect(cidrsOverlap(parseCidr('10.11.0.0/16'), parseCidr('10.12.0.0/16'))).toBe(false);
    expect(parseCidr('169.254.169.254')).toEqual({ base: parseIpv4('169.254.169.254'), prefix: 32 });
  });
});
