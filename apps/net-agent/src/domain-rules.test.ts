import { describe, expect, it } from 'vitest';
import { RequestInvalid } from '#service-kit';
import { domainAllowed, parseDomainRules } from './domain-rules.js';

describe('domain rules', () => {
  it('matches names exactly, *. below a name (not the name itself), * anything', () => {
    const rules = parseDomainRules('f', ['api.example.com', '*.pypi.org', 'Trailing.Dot.']);
    expect(domainAllowed(rules, 'api.example.com')).toBe(true);
    expect(domainAllowed(rules, 'example.com')).toBe(false);
    expect(domainAllowed(rules, 'x.api.example.com')).toBe(false);
    expect(domainAllowed(rules, 'files.pypi.org')).toBe(true);
    expect(domainAllowed(rules, 'a.b.pypi.org')).toBe(true);
    expect(domainAllowed(rules, 'pypi.org')).toBe(false);
    expect(domainAllowed(rules, 'evilpypi.org')).toBe(false);
    expect(domainAllowed(rules, 'trailing.dot')).toBe(true);
    expect(domainAllowed(parseDomainRules('f', ['*']), 'anything.at.all')).toBe(true);
    expect(domainAllowed(parseDomainRules('f', []), 'a.com')).toBe(false);
  });

  it.each([
    ['', 'not a host name'],
    ['a b.com', 'not a host name'],
    ['*.', 'not a host name'],
    ['a.*.com', 'not a host name'],
    ['**.a.com', 'not a host name'],
    ['1.2.3.4', 'belongs in allowed_cidrs'],
    ['10.0.0.0/8', 'belongs in allowed_cidrs'],
    ['-a.com', 'not a host name'],
    [`${'a'.repeat(64)}.com`, 'not a host name'],
    ['https://a.com', 'not a host name'],
  ])('refuses %j naming the entry', (text, why) => {
    let err: unknown;
    try {
      parseDomainRules('egress.allowed_domains', ['ok.com', text]);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(RequestInvalid);
    expect((err as RequestInvalid).field).toBe('egress.allowed_domains[1]');
    expect((err as Error).message).toContain(why);
  });
});
