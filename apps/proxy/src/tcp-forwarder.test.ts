import { randomBytes } from 'node:crypto';
import { connect, createServer, type AddressInfo, type Server } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { dial } from '#grpc';
import { createLogger } from '#logging';
import { RouteState, RoutingClient } from '#proto/sbx/routing';
import { ProxyMetrics } from './proxy-metrics.js';
import { RouteResolver } from './route-resolver.js';
import { RouteTable } from './route-table.js';
import { TcpForwarder } from './tcp-forwarder.js';

/* `--tcp-forward` against an echo server on loopback standing in for a sandbox port. */

const logger = createLogger({ service: 'test', level: 'silent' });
let echo: Server;
let echoPort: number;
let table: RouteTable;
let routing: RoutingClient;
const forwarders: TcpForwarder[] = [];

beforeEach(async () => {
  echo = createServer((s) => s.pipe(s));
  echoPort = await new Promise<number>((r) =>
    echo.listen(0, '127.0.0.1', () => r((echo.address() as AddressInfo).port)),
  );
  table = new RouteTable();
  routing = dial(RoutingClient, '/nonexistent/orchestrator.sock');
});

afterEach(async () => {
  for (const f of forwarders.splice(0)) await f.close();
  routing.close();
  await new Promise((r) => echo.close(r));
});

async function forwarder(sandboxId: string): Promise<TcpForwarder> {
  const resolver = new RouteResolver({ table, routing, resumeTimeoutMs: 1000, logger });
  const f = await TcpForwarder.start({
    forward: { listenPort: 0, sandboxId, port: echoPort },
    host: '127.0.0.1',
    resolver,
    metrics: new ProxyMetrics(undefined, table, () => true),
    logger,
    connectTimeoutMs: 2000,
  });
  forwarders.push(f);
  return f;
}

/** Sends `data`, half-closes, and collects what comes back until the connection closes (a reset included). */
function exchange(port: number, data: Buffer): Promise<Buffer> {
  return new Promise((resolve) => {
    const s = connect({ port, host: '127.0.0.1', allowHalfOpen: true }, () => s.end(data));
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('close', () => resolve(Buffer.concat(chunks)));
    s.on('error', () => undefined);
  });
}

describe('TcpForwarder', () => {
  it('carries bytes both ways to the sandbox port', async () => {
    table.upsert({
      sandboxId: 'vnc',
      state: RouteState.ROUTE_STATE_RUNNING,
      hostIp: '127.0.0.1',
      autoResumePolicy: '',
    });
    const f = await forwarder('vnc');
    const data = randomBytes(3 * 1024 * 1024);
    expect((await exchange(f.port, data)).equals(data)).toBe(true);
  });

  it('closes without a byte for a sandbox that requires a token, or one it does not know', async () => {
    table.upsert({
      sandboxId: 'locked',
      state: RouteState.ROUTE_STATE_RUNNING,
      hostIp: '127.0.0.1',
      trafficAccessToken: 't',
      autoResumePolicy: '',
    });
    expect((await exchange((await forwarder('locked')).port, Buffer.from('hello'))).length).toBe(0);
    expect((await exchange((await forwarder('unknown')).port, Buffer.from('hello'))).length).toBe(0);
  });
});
