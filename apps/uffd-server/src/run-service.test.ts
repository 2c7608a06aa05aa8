import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SocketInUse } from '#grpc';
import { createLogger } from '#logging';
import { freeTcpPort } from '#test-kit';
import { startUffdServer } from './run-service.js';
import { uffdServerConfigSchema } from './uffd-server-config.js';

const logger = createLogger({ service: 'uffd-server', level: 'silent' });
const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const listen = (server: Server, at: string | number, host = '127.0.0.1') =>
  new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    if (typeof at === 'string') server.listen(at, () => resolve());
    else server.listen(at, host, () => resolve());
  });

describe('startUffdServer', () => {
  it('closes its metrics port again when the control socket is taken', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'sbx-uffd-rollback-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const holder = createServer();
    await listen(holder, join(dir, 'control.sock'));
    cleanups.push(() => new Promise((resolve) => holder.close(resolve)));
    const config = uffdServerConfigSchema.parse({
      controlSocket: join(dir, 'control.sock'),
      cacheDir: join(dir, 'cache'),
      metricsPort: await freeTcpPort(),
    });
    await expect(startUffdServer(config, logger)).rejects.toBeInstanceOf(SocketInUse);
    const probe = createServer();
    await listen(probe, config.metricsPort);
    await new Promise((resolve) => probe.close(resolve));
  });
});
