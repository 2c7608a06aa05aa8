import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createNameResolver, NameNotResolved, parseHostsFile } from './name-resolver.js';

describe('name resolver', () => {
  it('parses a hosts file: IPv4 lines only, names normalized, comments skipped', () => {
    const hosts = parseHostsFile('# c\n1.2.3.4 A.com b.com # x\n::1 v6.com\n5.6.7.8 a.com\nnot-an-ip c.com\n');
    expect(hosts.get('a.com')).toEqual(['1.2.3.4', '5.6.7.8']);
    expect(hosts.get('b.com')).toEqual(['1.2.3.4']);
    expect(hosts.has('v6.com')).toBe(false);
    expect(hosts.has('c.com')).toBe(false);
  });

  it('answers from its hosts file first, re-read at each lookup; an unknown name is an error naming it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'resolver-'));
    try {
      const file = join(dir, 'hosts');
      await writeFile(file, '198.18.0.1 a.test\n');
      const resolver = createNameResolver({ hostsFile: file, dnsServers: ['127.0.0.1:1'], timeoutMs: 200 });
      expect(await resolver.resolve4('a.test')).toEqual(['198.18.0.1']);
      await writeFile(file, '198.18.0.2 a.test\n');
      expect(await resolver.resolve4('a.test')).toEqual(['198.18.0.2']);
      const err = await resolver.resolve4('nowhere.test').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NameNotResolved);
      expect((err as Error).message).toContain('nowhere.test');
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
