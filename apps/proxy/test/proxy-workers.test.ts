/**
 * `./sbx proxy serve --workers 2` as a process: routes from a gRPC DOUBLE of the orchestrator's
 * Routing service (one scripted running route; the real one is in proxy-e2e.test.ts), a sandbox
 * port stood in for by an HTTP server on loopback. On the Node data path both worker processes
 * serve the one client port and the primary answers health and the summed metrics; on the
 * native path one process runs two relay threads. SIGTERM leaves no process or socket behind.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { Agent, createServer, request, type Server } from 'node:http';
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

describe.each(['node', 'native'] as const)('proxy --workers 2 --data-path %s', (dataPath) => {
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
        '--data-path',
        dataPath,
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

  it('serves the client port from two worker processes (node) or one process (native), with its metrics', async () => {
    const serving = () =>
      new Set(
        proxy.logs
          .filter((l) => l.includes('proxy serving (http/1.1'))
          .map((l) => (JSON.parse(l) as { pid: number }).pid),
      );
    if (dataPath === 'node') {
      expect(serving().size).toBe(2);
      expect(serving().has(proxy.child.pid!)).toBe(false);
    } else {
      expect([...serving()]).toEqual([proxy.child.pid]);
      const line = proxy.logs.find((l) => l.includes('proxy serving (http/1.1'))!;
      expect(JSON.parse(line)).toMatchObject({ dataPath: 'native', relayThreads: 2 });
    }
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
          // The header pair is the Node path's alone: on the native path each is handed back.
          /sbx_proxy_requests_total\{protocol="http1",result="ok"[^}]*\} 20\b/.test(text) &&
          /sbx_proxy_routes\{state="running"[^}]*\} 1\b/.test(text)
        );
      },
      { what: 'the summed metrics of both workers', timeoutMs: 20_000 },
    );
    if (dataPath === 'node') return;
    // Routed by Host, the relay carries them itself.
    const agent = new Agent({ keepAlive: true, maxSockets: 1 });
    for (let i = 0; i < 20; i++) {
      const body = await new Promise<string>((resolve, reject) => {
        const req = request(
          { host: '127.0.0.1', port, path: `/n${i}`, agent, headers: { host: `${upstreamPort}-sbx1.example` } },
          (res) => {
            let text = '';
            res.on('data', (d: Buffer) => (text += d));
            res.on('end', () => resolve(text));
          },
        );
        req.on('error', reject);
        req.end();
      });
      expect(body).toBe(`pid-less answer for ${upstreamPort}-sbx1.example`);
    }
    agent.destroy();
    const text = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(Number(/^sbx_proxy_native_requests_total(?:\{[^}]*\})? (\d+)/m.exec(text)?.[1])).toBeGreaterThanOrEqual(20);
    expect(/^sbx_proxy_native_routes(?:\{[^}]*\})? 1$/m.test(text)).toBe(true);
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
