/**
 * How the egress proxy turns an allowed name into addresses: IPv4 only (slots have no IPv6).
 * A hosts file (when configured) answers first, then the configured DNS servers, else the node's
 * own resolver (getaddrinfo: /etc/hosts, /etc/resolv.conf). Configurable so tests can point it at
 * names of their own namespaces.
 */
import { lookup, Resolver } from 'node:dns/promises';
import { readFile } from 'node:fs/promises';
import { normalizeHostName } from './host-name.js';

/** Only ever logged (the guest's connection is refused), so a plain error. */
export class NameNotResolved extends Error {
  constructor(
    readonly host: string,
    why: string,
  ) {
    super(`${host} does not resolve: ${why}`);
    this.name = 'NameNotResolved';
  }
}

export interface NameResolver {
  resolve4(name: string): Promise<string[]>;
}

/** `a.b.c.d name name...` lines; comments and IPv6 lines skipped. Later lines do not override. */
export function parseHostsFile(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const raw of text.split('\n')) {
    const [address, ...names] = raw.replace(/#.*/, '').trim().split(/\s+/);
    if (!address || !/^\d{1,3}(?:\.\d{1,3}){3}$/.test(address)) continue;
    for (const n of names) {
      const name = normalizeHostName(n);
      if (!name) continue;
      const list = out.get(name) ?? [];
      if (!list.includes(address)) list.push(address);
      out.set(name, list);
    }
  }
  return out;
}

export function createNameResolver(options: {
  hostsFile?: string;
  dnsServers: string[];
  timeoutMs: number;
}): NameResolver {
  const dns = options.dnsServers.length ? new Resolver({ timeout: options.timeoutMs, tries: 2 }) : undefined;
  dns?.setServers(options.dnsServers);
  return {
    async resolve4(name) {
      if (options.hostsFile) {
        // Read at each lookup: small, and edits apply without a restart.
        const found = parseHostsFile(await readFile(options.hostsFile, 'utf8')).get(name);
        if (found) return found;
      }
      try {
        if (dns) return await dns.resolve4(name);
        return (await lookup(name, { family: 4, all: true })).map((a) => a.address);
      } catch (err) {
        throw new NameNotResolved(name, (err as { code?: string }).code ?? String(err));
      }
    },
  };
}
