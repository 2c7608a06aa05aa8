/**
 * `./sbx proxy serve --workers 2` as a process: routes from a gRPC DOUBLE of the orchestrator's
 * Routing service (one scripted running route; the real one is in proxy-e2e.test.ts), a sandbox
 * port stood in for by an HTTP server on loopback. Both workers serve the one client port, the
 * primary answers health and the summed metrics, and SIGTERM leaves no process or socket behind.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startGrpcServer, type GrpcServerHandle } from '#grpc';
import { createLogger } from '#logging';
import { RouteState, RoutingService, type RouteEvent, type SandboxRoute } from '#proto/sbx/routing';
import { eventually, freeTcpPort, grpcServing, ServiceProcess } from '#test-kit';

const logger = createLogger({ service: 'test', level: 'silent' });
const route: SandboxRoute = {
  sandboxId: 'sbx1',
  state: RouteState.ROUTE_STATE_RUNNING,
  hostIp: '127.0.0.1',
  autoResumePolicy: '',
};

describe('proxy --workers', () => {
  let dir: string;
  let routing: GrpcServerHandle;
  let upstream: Server;
  let upstreamPort: number;
  let proxy: ServiceProcess;
  let port: number;
  let metricsPort: number;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'proxy-workers-'));
    routing = await startGrpcServer({
      address: `unix://${join(dir, 'orch.sock')}`,
      services: [
        {
          name: 'sbx.v1.Routing',
          definition: RoutingService,
          implementation: {
            watch: (call: { write(e: RouteEvent): void }) => call.write({ reset: true, routes: [route], removed: [] }),
            resume: (_call: unknown, cb: (e: null, r: SandboxRoute) => void) => cb(null, route),
          },
        },
      ],
      logger,
    });
    upstream = createServer((req, res) => res.end(`pid-less answer for ${req.headers.host}`));
    upstreamPort = await new Promise<number>((r) =>
      upstream.listen(0, '127.0.0.1', () => r((upstream.address() as AddressInfo).port)),
    );
    port = await freeTcpPort();
    metricsPort = await freeTcpPort();
    proxy = await ServiceProcess.start({
      args: [
        'proxy',
        'serve',
        '--workers',
        '2',
        '--listen',
        `127.0.0.1:${port}`,
        '--orchestrator-socket',
        join(dir, 'orch.sock'),
        '--control-socket',
        join(dir, 'proxy.sock'),
        '--metrics-port',
        String(metricsPort),
      ],
      detached: true,
      ready: grpcServing(join(dir, 'proxy.sock')),
      readyTimeoutMs: 60_000,
    });
  }, 90_000);

  afterAll(async () => {
    await proxy?.stop();
    await routing?.shutdown(1000);
    await new Promise((r) => upstream?.close(r));
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('serves the client port from two worker processes and sums their metrics', async () => {
    const serving = () =>
      new Set(
        proxy.logs
          .filter((l) => l.includes('proxy serving (http/1.1'))
          .map((l) => (JSON.parse(l) as { pid: number }).pid),
      );
    expect(serving().size).toBe(2);
    expect(serving().has(proxy.child.pid!)).toBe(false);
    for (let i = 0; i < 20; i++) {
      // A new connection each time: the primary hands connections to the workers in turn.
      const res = await fetch(`http://127.0.0.1:${port}/`, {
        headers: { 'e2b-sandbox-id': 'sbx1', 'e2b-sandbox-port': String(upstreamPort), connection: 'close' },
      });
      expect(res.status).toBe(200);
      await res.text();
    }
    await eventually(
      async () => {
        const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
        return (
          /sbx_proxy_requests_total\{protocol="http1",result="ok"[^}]*\} 20\b/.test(text) &&
          /sbx_proxy_routes\{state="running"[^}]*\} 1\b/.test(text)
        );
      },
      { what: 'the summed metrics of both workers', timeoutMs: 20_000 },
    );
  });

  it('stops every worker on SIGTERM and removes its socket', async () => {
    const workers = [
      ...new Set(
        proxy.logs
          .filter((l) => l.includes('proxy serving (http/1.1'))
          .map((l) => (JSON.parse(l) as { pid: number }).pid),
      ),
    ];
    expect(await proxy.stop('SIGTERM')).toBe(0);
    for (const pid of workers) {
      const alive = await readFile(`/proc/${pid}/stat`, 'utf8').then(
        (s) => !/\) Z /.test(s),
        () => false,
      );
      expect(alive, `worker ${pid} gone`).toBe(false);
    }
    expect(existsSync(join(dir, 'proxy.sock'))).toBe(false);
  });
});
