/**
 * `allowed_domains` entries: a name (`example.com`), a wildcard for every name below one
 * (`*.example.com`: `a.example.com`, `a.b.example.com`, not `example.com` itself), or `*`
 * (any name). Names compare without case and without a trailing dot.
 */
import { RequestInvalid } from '#service-kit';
import { normalizeHostName } from './host-name.js';

export interface DomainRules {
  any: boolean;
  exact: Set<string>;
  /** Each with its leading dot: `.example.com`. */
  suffixes: string[];
  /** As given (normalized), for logs and state. */
  entries: string[];
}

export function parseDomainRules(field: string, entries: string[]): DomainRules {
  const rules: DomainRules = { any: false, exact: new Set(), suffixes: [], entries: [] };
  entries.forEach((text, i) => {
    const bad = (why: string) =>
      new RequestInvalid(`${field}[${i}]`, `${JSON.stringify(text)}: ${why} (expected name, *.name or *)`);
    const entry = text.trim();
    if (entry === '*') {
      rules.any = true;
      rules.entries.push('*');
      return;
    }
    const wildcard = entry.startsWith('*.');
    const body = wildcard ? entry.slice(2) : entry;
    if (/^[0-9.]+(\/\d+)?(:[0-9-]+)?$/.test(body)) throw bad('an address belongs in allowed_cidrs');
    const name = normalizeHostName(body);
    if (!name) throw bad('not a host name');
    if (wildcard) rules.suffixes.push(`.${name}`);
    else rules.exact.add(name);
    rules.entries.push(wildcard ? `*.${name}` : name);
  });
  return rules;
}

/** `name` must be normalized (normalizeHostName), as the head parsers return it. */
export function domainAllowed(rules: DomainRules, name: string): boolean {
  if (rules.any || rules.exact.has(name)) return true;
  return rules.suffixes.some((s) => name.endsWith(s));
}
