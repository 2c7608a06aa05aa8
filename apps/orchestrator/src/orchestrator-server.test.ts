import { mkdtemp, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { SocketInUse } from '#grpc';
import { createLogger } from '#logging';
import { freeTcpPort } from '#test-kit';
import { orchestratorConfigSchema } from './orchestrator-config.js';
import { startOrchestrator } from './orchestrator-server.js';

const logger = createLogger({ service: 'orchestrator', level: 'silent' });
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

describe('startOrchestrator', () => {
  it('gives back its gRPC port, metrics port and watchers when the control socket is taken', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'sbx-orchestrator-rollback-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const holder = createServer();
    await listen(holder, join(dir, 'control.sock'));
    cleanups.push(() => new Promise((resolve) => holder.close(resolve)));
    const config = orchestratorConfigSchema.parse({
      grpcHost: '127.0.0.1',
      grpcPort: await freeTcpPort(),
      metricsPort: await freeTcpPort(),
      controlSocket: join(dir, 'control.sock'),
      dataDir: join(dir, 'data'),
      bucket: join(dir, 'bucket'),
      cacheDir: join(dir, 'cache'),
      sampleTemplate: 'false',
      ...Object.fromEntries(['uffdServerSockets', 'blockServerSockets'].map((k) => [k, [join(dir, `${k}.sock`)]])),
      netAgentSocket: join(dir, 'net.sock'),
      dnsSocket: join(dir, 'dns.sock'),
    });
    await expect(startOrchestrator(config, logger)).rejects.toBeInstanceOf(SocketInUse);
    for (const port of [config.grpcPort, config.metricsPort]) {
      const probe = createServer();
      await listen(probe, port);
      await new Promise((resolve) => probe.close(resolve));
    }
  });
});
