import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { freeTcpPort } from '#test-kit';
import { dnsConfigSchema } from './dns-config.js';
import { startDns } from './dns-service.js';

const logger = createLogger({ service: 'dns', level: 'silent' });
const cleanups: Array<() => void> = [];
afterEach(() => cleanups.splice(0).forEach((c) => c()));

function listen(port: number, host = '127.0.0.1'): Promise<Server> {
  return new Promise((resolve, reject) => {
    const server = createServer().once('error', reject);
    server.listen(port, host, () => resolve(server));
  });
}

describe('startDns', () => {
  it('closes the DNS port and the control socket again when the metrics port is taken', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'sbx-dns-rollback-'));
    cleanups.push(() => rmSync(dir, { recursive: true, force: true }));
    const taken = await listen(0);
    cleanups.push(() => taken.close());
    const dnsPort = await freeTcpPort();
    const config = dnsConfigSchema.parse({
      listen: `127.0.0.95:${dnsPort}`,
      controlSocket: join(dir, 'dns.sock'),
      metricsPort: (taken.address() as { port: number }).port,
      udpEngine: 'dgram',
    });
    await expect(startDns(config, logger)).rejects.toThrow(/EADDRINUSE/);
    expect(existsSync(config.controlSocket)).toBe(false);
    // UDP and TCP were closed: the same address serves again once the metrics port is free.
    taken.close();
    const dns = await startDns(config, logger);
    await dns.stop();
    expect(existsSync(config.controlSocket)).toBe(false);
  });
});
