import { createServer as createHttpServer, request, type Server } from 'node:http';
import type { Http2Server } from 'node:http2';
import { connect, type AddressInfo } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { createLogger } from '#logging';
import { RouteState } from '#proto/sbx/routing';
import { ProtocolListener } from './protocol-listener.js';
import { RouteTable } from './route-table.js';
import { forwarders, type Forwarders } from '../test/forwarders.js';
import { h2Get, h2Guest } from '../test/h2-peers.js';

/*
 * One client port for HTTP/1.1 and h2 with prior knowledge, against upstream servers on
 * loopback standing in for a sandbox (its route points at 127.0.0.1). The orchestrator is never
 * asked: the route is in the table.
 */

const logger = createLogger({ service: 'test', level: 'silent' });
let upstream1: Server;
let upstream2: Http2Server;
let listener: ProtocolListener;
let forwarding: Forwarders;

const listen = (server: Server | Http2Server) =>
  new Promise<number>((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)),
  );

let port1 = 0;
let port2 = 0;

beforeEach(async () => {
  upstream1 = createHttpServer((req, res) => res.end(`h1 ${req.headers.host} ${req.url}`));
  upstream2 = h2Guest();
  port1 = await listen(upstream1);
  port2 = await listen(upstream2);
  const table = new RouteTable();
  table.upsert({ sandboxId: 'sbx', state: RouteState.ROUTE_STATE_RUNNING, hostIp: '127.0.0.1', autoResumePolicy: '' });
  forwarding = forwarders(table, logger);
  const { metrics } = forwarding;
  listener = await ProtocolListener.start({
    host: '127.0.0.1',
    port: 0,
    http1: forwarding.http1,
    h2: forwarding.h2,
    metrics,
    logger,
    idleTimeoutMs: 300,
  });
});

afterEach(async () => {
  await listener.close();
  forwarding.close();
  await new Promise((r) => upstream1.close(r));
  await new Promise((r) => upstream2.close(r));
});

function get1(host: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port: listener.port, path: '/p', headers: { host } }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d));
      res.on('end', () => resolve(`${res.statusCode} ${body}`));
    });
    req.on('error', reject);
    req.end();
  });
}

describe('ProtocolListener', () => {
  it('serves HTTP/1.1 and h2 with prior knowledge on one port', async () => {
    expect(await get1(`${port1}-sbx.example`)).toBe(`200 h1 ${port1}-sbx.example /p`);
    const body = await h2Get(listener.port, `${port2}-sbx.example`, '/q');
    expect(body).toBe(`h2 ${port2}-sbx.example /q`);
  });

  it('tells HTTP/1.1 from h2 when the first bytes come one at a time', async () => {
    const socket = connect(listener.port, '127.0.0.1');
    await new Promise((r) => socket.once('connect', r));
    const head = `GET /slow HTTP/1.1\r\nHost: ${port1}-sbx.example\r\nConnection: close\r\n\r\n`;
    let answer = '';
    socket.on('data', (d: Buffer) => (answer += d));
    const closed = new Promise((r) => socket.once('close', r));
    for (const c of head) {
      socket.write(c);
      await new Promise((r) => setImmediate(r));
    }
    await closed;
    expect(answer).toMatch(/^HTTP\/1\.1 200 OK/);
    expect(answer).toContain(`h1 ${port1}-sbx.example /slow`);
  });

  it('closes a connection that never sends a byte', async () => {
    const socket = connect(listener.port, '127.0.0.1');
    await new Promise((r) => socket.once('close', r));
    await eventually(() => listener.openConnections === 0, { what: 'the server side closed too' });
  });

  it('answers 400 with a JSON body for a Host that names no sandbox port', async () => {
    const answer = await get1('www.example.com');
    expect(answer).toMatch(/^400 \{"code":"BAD_ROUTE"/);
  });
});
