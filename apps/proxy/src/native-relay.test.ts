import { createServer as createHttpServer, type IncomingHttpHeaders, type Server } from 'node:http';
import type { Http2Server } from 'node:http2';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { RouteState, type SandboxRoute } from '#proto/sbx/routing';
import { eventually, openFds } from '#test-kit';
import { NativeRelay } from './native-relay.js';
import { ProtocolListener } from './protocol-listener.js';
import { RouteTable } from './route-table.js';
import { forwarders, type Forwarders } from '../test/forwarders.js';
import { h2Get, h2Guest } from '../test/h2-peers.js';

/*
 * The native data path wired as proxy-service.ts wires it (the C relay of libsbxnative, the
 * route table mirrored into it, handoffs served by the Node path) against an HTTP server on
 * loopback standing in for a sandbox port. The orchestrator is never reached (its socket does
 * not exist): what the table does not show running is the Node path's answer.
 */

const logger = createLogger({ service: 'test', level: 'silent' });

let guest: Server;
let guestPort: number;
/** Request heads the guest saw, in order. */
let seen: { url: string; headers: IncomingHttpHeaders }[];
let table: RouteTable;
let forwarding: Forwarders;
let relay: NativeRelay;
let listener: ProtocolListener;
/** Descriptors open before the relay and the client port existed. */
let fdsBefore: number;
let h2Upstream: Http2Server;
let h2Port: number;

const running = (id: string, extra: Partial<SandboxRoute> = {}): SandboxRoute => ({
  sandboxId: id,
  state: RouteState.ROUTE_STATE_RUNNING,
  hostIp: '127.0.0.1',
  autoResumePolicy: '',
  ...extra,
});

beforeEach(async () => {
  seen = [];
  guest = createHttpServer((req, res) => {
    seen.push({ url: req.url!, headers: req.headers });
    res.end(`guest ${req.url}`);
  });
  guest.on('upgrade', (req, socket: Socket) => {
    socket.write('HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n');
    socket.pipe(socket);
  });
  guestPort = await new Promise<number>((r) =>
    guest.listen(0, '127.0.0.1', () => r((guest.address() as AddressInfo).port)),
  );
  table = new RouteTable();
  table.upsert(running('sbx'));
  table.upsert(running('locked', { trafficAccessToken: 'tok-1', maskRequestHost: 'app.internal:3000' }));
  forwarding = forwarders(table, logger);
  const { metrics } = forwarding;
  h2Upstream = h2Guest();
  h2Port = await new Promise<number>((r) =>
    h2Upstream.listen(0, '127.0.0.1', () => r((h2Upstream.address() as AddressInfo).port)),
  );
  fdsBefore = openFds(process.pid).length;
  relay = new NativeRelay({
    threads: 2,
    clientIdleTimeoutMs: 10_000,
    upstreamConnectTimeoutMs: 2000,
    upstreamIdleTimeoutMs: 4000,
    table,
    logger,
    onHandoff: (socket, bytes) => listener.serve(socket, bytes),
  });
  listener = await ProtocolListener.start({
    host: '127.0.0.1',
    port: 0,
    http1: forwarding.http1,
    h2: forwarding.h2,
    metrics,
    logger,
    idleTimeoutMs: 10_000,
    relay,
  });
});

afterEach(async () => {
  await listener.close();
  relay.close();
  forwarding.close();
  guest.closeAllConnections();
  await new Promise((r) => guest.close(r));
  await new Promise((r) => h2Upstream.close(r));
});

/** A raw keep-alive client: writes requests, reads answers one by one (Content-Length framed). */
class Client {
  private buf = Buffer.alloc(0);
  private waiting: (() => void) | undefined;
  closed = false;
  readonly socket: Socket;
  constructor(port: number) {
    this.socket = connect(port, '127.0.0.1');
    this.socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiting?.();
    });
    this.socket.on('close', () => {
      this.closed = true;
      this.waiting?.();
    });
    this.socket.on('error', () => undefined);
  }

  async ask(head: string): Promise<{ status: number; head: string; body: string }> {
    this.socket.write(head);
    for (;;) {
      const end = this.buf.indexOf('\r\n\r\n');
      if (end >= 0) {
        const text = this.buf.subarray(0, end).toString('latin1');
        const length = Number(/\r\ncontent-length: *(\d+)/i.exec(text)?.[1] ?? 0);
        if (this.buf.length >= end + 4 + length) {
          const body = this.buf.subarray(end + 4, end + 4 + length).toString();
          this.buf = this.buf.subarray(end + 4 + length);
          return { status: Number(text.split(' ')[1]), head: text, body };
        }
      }
      if (this.closed) throw new Error(`connection closed; got ${JSON.stringify(this.buf.toString())}`);
      await new Promise<void>((r) => (this.waiting = r));
    }
  }

  close(): void {
    this.socket.destroy();
  }
}

const get = (host: string, path: string, extra = '') => `GET ${path} HTTP/1.1\r\nHost: ${host}\r\n${extra}\r\n`;

describe('native data path (C relay + Node handoffs)', () => {
  it('carries a keep-alive stream natively with the head the guest must see', async () => {
    const c = new Client(listener.port);
    const host = `${guestPort}-locked.example`;
    for (let i = 0; i < 50; i++) {
      const r = await c.ask(get(host, `/n${i}`, 'e2b-traffic-access-token: tok-1\r\n'));
      expect(r.status).toBe(200);
      expect(r.body).toBe(`guest /n${i}`);
    }
    c.close();
    expect(seen).toHaveLength(50);
    for (const s of seen) {
      expect(s.headers['host']).toBe('app.internal:3000');
      expect(s.headers['x-forwarded-host']).toBe(host);
      expect(s.headers['x-forwarded-for']).toBe('127.0.0.1');
      expect(s.headers['e2b-traffic-access-token']).toBeUndefined();
    }
    // All by the relay: no connection came back to the Node path.
    expect(relay.stats()!.requests).toBe(50);
    expect(relay.stats()!.handoffs).toBe(0);
  });

  it('hands a refused token, an unknown sandbox and a bad Host to the Node path, which answers them', async () => {
    const c = new Client(listener.port);
    const ok = await c.ask(get(`${guestPort}-sbx.example`, '/first'));
    expect(ok.status).toBe(200);
    const denied = await c.ask(get(`${guestPort}-locked.example`, '/x', 'e2b-traffic-access-token: nope\r\n'));
    expect(denied.status).toBe(403);
    expect(denied.body).toMatch(/"code":"ACCESS_DENIED"/);
    // The Node path now holds the connection and keeps serving it.
    const after = await c.ask(get(`${guestPort}-sbx.example`, '/after'));
    expect(after.body).toBe('guest /after');
    c.close();
    const d = new Client(listener.port);
    expect((await d.ask(get(`${guestPort}-nosuch.example`, '/'))).status).toBe(404);
    d.close();
    const e = new Client(listener.port);
    expect((await e.ask(get('www.example.com', '/'))).status).toBe(400);
    e.close();
    expect(relay.stats()!.handoffsByReason).toEqual({ TOKEN: 1, NO_ROUTE: 1, HOST: 1 });
    expect(seen.map((s) => s.url)).toEqual(['/first', '/after']);
  });

  it('stops native requests to a sandbox the moment it pauses or goes', async () => {
    const c = new Client(listener.port);
    const host = `${guestPort}-sbx.example`;
    expect((await c.ask(get(host, '/before'))).status).toBe(200);
    table.upsert({ ...running('sbx'), state: RouteState.ROUTE_STATE_PAUSED, hostIp: '', autoResumePolicy: 'off' });
    // The same keep-alive connection: the next request is the Node path's, which refuses it.
    const paused = await c.ask(get(host, '/paused'));
    expect(paused.status).toBe(409);
    c.close();
    table.upsert(running('sbx'));
    const d = new Client(listener.port);
    expect((await d.ask(get(host, '/again'))).status).toBe(200);
    table.apply({ reset: false, routes: [], removed: ['sbx'] });
    expect((await d.ask(get(host, '/gone'))).status).toBe(404);
    d.close();
    expect(seen.map((s) => s.url)).toEqual(['/before', '/again']);
  });

  it('gives h2c and upgrades to the Node path', async () => {
    const body = await h2Get(listener.port, `${h2Port}-sbx.example`, '/h2');
    expect(body).toBe(`h2 ${h2Port}-sbx.example /h2`);

    const socket = connect(listener.port, '127.0.0.1');
    socket.write(get(`${guestPort}-sbx.example`, '/up', 'Connection: Upgrade\r\nUpgrade: echo\r\n'));
    let got = '';
    socket.on('data', (d: Buffer) => {
      got += d.toString('latin1');
      if (got.includes('\r\n\r\n') && !got.includes('ping')) socket.write('ping');
    });
    await eventually(() => got.includes('\r\n\r\nping'), { what: 'the echo through the tunnel' });
    socket.destroy();
    expect(got).toMatch(/^HTTP\/1\.1 101/);
  });

  it('releases every descriptor when the relay is closed with connections open', async () => {
    const clients = Array.from({ length: 8 }, () => new Client(listener.port));
    for (const [i, c] of clients.entries())
      expect((await c.ask(get(`${guestPort}-sbx.example`, `/k${i}`))).status).toBe(200);
    await listener.close();
    relay.close();
    forwarding.http1.close();
    for (const c of clients) await eventually(() => c.closed, { what: 'the relay closed its client connections' });
    guest.closeAllConnections();
    await eventually(() => expect(openFds(process.pid).length).toBeLessThanOrEqual(fdsBefore));
  });
});
