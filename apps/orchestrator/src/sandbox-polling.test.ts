import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { createLogger } from '#logging';
import type { SnapshotBuild } from '#storage';
import type { SandboxConfig } from '#proto/orchestrator';
import type { NetSlot } from '#proto/sbx/net';
import { HttpEnvdClient } from './envd-client.js';
import { Sandbox } from './sandbox.js';

/** An envd on loopback that counts what it is asked and answers as told. */
class CountingEnvd {
  readonly asked = { health: 0, metrics: 0 };
  metricsStatus = 200;
  healthStatus = 204;
  private server: Server | undefined;
  port = 0;

  async start(): Promise<this> {
    this.server = createServer((req, res) => {
      if (req.url === '/health') {
        this.asked.health++;
        res.writeHead(this.healthStatus).end();
      } else if (req.url === '/metrics') {
        this.asked.metrics++;
        res.writeHead(this.metricsStatus, { 'content-type': 'application/json' });
        res.end(JSON.stringify({ ts: 1, cpu_count: 1, cpu_used_pct: 0, mem_total_mib: 128, mem_used_mib: 10 }));
      } else res.writeHead(404).end();
    });
    await new Promise<void>((resolve) => this.server!.listen(0, '127.0.0.1', () => resolve()));
    this.port = (this.server!.address() as AddressInfo).port;
    return this;
  }

  stop(): Promise<void> {
    return new Promise((resolve) => this.server!.close(() => resolve()));
  }
}

function sandbox(): Sandbox {
  const s = new Sandbox({
    id: 'poll-test',
    config: {} as SandboxConfig,
    build: {} as SnapshotBuild,
    startTime: new Date(),
    endTime: new Date(Date.now() + 60_000),
    dir: '/nonexistent',
    log: createLogger({ service: 'orchestrator-test', level: 'silent' }),
  });
  s.slot = { hostIp: '127.0.0.1' } as NetSlot;
  return s;
}

describe('Sandbox polling', () => {
  let envd: CountingEnvd | undefined;
  let sbx: Sandbox | undefined;
  afterEach(async () => {
    sbx?.stopPolling();
    await envd?.stop();
  });

  it('asks /health only when /metrics has not answered within the health interval, with the same verdicts', async () => {
    envd = await new CountingEnvd().start();
    sbx = sandbox();
    // Metrics twice as often as health, as the defaults (10 s and 20 s).
    sbx.startPolling(new HttpEnvdClient(envd.port), 200, 100);
    await eventually(() => envd!.asked.metrics >= 6, { what: 'metrics polls' });
    expect(envd.asked.health).toBe(0);
    expect(sbx.healthy).toBe(true);
    expect(sbx.lastMetrics?.mem_total_mib).toBe(128);

    // Metrics stop answering: health is asked again, and a failing health marks it unhealthy.
    envd.metricsStatus = 500;
    envd.healthStatus = 503;
    await eventually(() => envd!.asked.health >= 1 && sbx!.healthy === false, { what: 'health asked, unhealthy' });

    // Envd answers again: the next metrics answer marks it healthy.
    envd.metricsStatus = 200;
    await eventually(() => sbx!.healthy === true, { what: 'healthy again' });
  });

  it('keeps asking /health when metrics polling is off', async () => {
    envd = await new CountingEnvd().start();
    sbx = sandbox();
    sbx.startPolling(new HttpEnvdClient(envd.port), 100, 0);
    await eventually(() => envd!.asked.health >= 3, { what: 'health polls' });
    expect(envd.asked.metrics).toBe(0);
  });
});
