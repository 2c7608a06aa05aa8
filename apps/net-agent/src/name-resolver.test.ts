import { createSocket } from 'node:dgram';
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

  it('asks the configured DNS servers when the hosts file does not know the name', async () => {
    // A one-record DNS server on loopback: x.test A 198.18.0.9, everything else NXDOMAIN.
    const server = createSocket('udp4');
    server.on('message', (q, peer) => {
      let end = 12;
      const labels: string[] = [];
      while (q[end]! > 0) {
        labels.push(q.subarray(end + 1, end + 1 + q[end]!).toString());
        end += 1 + q[end]!;
      }
      const question = q.subarray(12, end + 5);
      const known = labels.join('.') === 'x.test';
      const header = Buffer.from([q[0]!, q[1]!, 0x81, known ? 0x80 : 0x83, 0, 1, 0, known ? 1 : 0, 0, 0, 0, 0]);
      const answer = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 18, 0, 9]);
      server.send(Buffer.concat([header, question, ...(known ? [answer] : [])]), peer.port, peer.address);
    });
    await new Promise<void>((resolve) => server.bind(0, '127.0.0.1', resolve));
    try {
      const resolver = createNameResolver({
        dnsServers: [`127.0.0.1:${server.address().port}`],
        timeoutMs: 2000,
      });
      expect(await resolver.resolve4('x.test')).toEqual(['198.18.0.9']);
      const err = await resolver.resolve4('y.test').catch((e: unknown) => e);
      expect(err).toBeInstanceOf(NameNotResolved);
      expect((err as Error).message).toContain('ENOTFOUND');
    } finally {
      server.close();
    }
  });
});
