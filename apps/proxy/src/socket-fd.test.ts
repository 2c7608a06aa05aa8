import { createServer as createHttpServer, request, type Server } from 'node:http';
import type { Http2Server } from 'node:http2';
import { Socket, type AddressInfo } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { read, watchReadable } from '#native';
import { RouteState } from '#proto/sbx/routing';
import { eventually, openFds } from '#test-kit';
import { ProtocolListener, type ConnectionRelay } from './protocol-listener.js';
import { ProxyMetrics } from './proxy-metrics.js';
import { RouteTable } from './route-table.js';
import { forwarders, type Forwarders } from '../test/forwarders.js';
import { h2Get, h2Guest } from '../test/h2-peers.js';
import { detachSocketFd, socketFromFd } from './socket-fd.js';

/*
 * The handoff mechanics of the native data path without the C relay: a connection accepted
 * paused is taken from Node as a descriptor, some of its bytes are read straight from the
 * descriptor (as the relay would, up to a request boundary), and the descriptor comes back as
 * a net.Socket with those bytes as "seen so far". The relay here is a DOUBLE that reads `take`
 * bytes itself; native-relay.test.ts runs the real one.
 */

const logger = createLogger({ service: 'test', level: 'silent' });

class ReadingRelayDouble implements ConnectionRelay {
  listener: ProtocolListener | undefined;
  detached = 0;
  constructor(private readonly take: number) {}
  adopt(socket: Socket): boolean {
    const fd = detachSocketFd(socket);
    this.detached++;
    const buf = Buffer.alloc(this.take);
    let got = 0;
    const giveBack = () => this.listener!.serve(socketFromFd(fd), buf.subarray(0, got));
    if (!this.take) {
      giveBack();
      return true;
    }
    // Read on the event loop (the client runs in this process): libuv polls the descriptor.
    const watch = watchReadable(fd, () => {
      const n = read(fd, buf, got);
      got += n;
      if (n > 0 && got < this.take) return;
      watch.close();
      giveBack();
    });
    return true;
  }
}

let upstream1: Server;
let upstream2: Http2Server;
let forwarding: Forwarders;
let port1 = 0;
let port2 = 0;
const listeners: ProtocolListener[] = [];

const listen = (server: Server | Http2Server) =>
  new Promise<number>((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)),
  );

beforeEach(async () => {
  upstream1 = createHttpServer((req, res) => res.end(`h1 ${req.headers.host} ${req.url}`));
  upstream2 = h2Guest();
  port1 = await listen(upstream1);
  port2 = await listen(upstream2);
  const table = new RouteTable();
  table.upsert({ sandboxId: 'sbx', state: RouteState.ROUTE_STATE_RUNNING, hostIp: '127.0.0.1', autoResumePolicy: '' });
  forwarding = forwarders(table, logger);
});

afterEach(async () => {
  for (const l of listeners.splice(0)) await l.close();
  forwarding.close();
  await new Promise((r) => upstream1.close(r));
  await new Promise((r) => upstream2.close(r));
});

async function start(relay: ReadingRelayDouble): Promise<ProtocolListener> {
  const metrics = new ProxyMetrics(undefined, new RouteTable(), () => true);
  const l = await ProtocolListener.start({
    host: '127.0.0.1',
    port: 0,
    http1: forwarding.http1,
    h2: forwarding.h2,
    metrics,
    logger,
    idleTimeoutMs: 2000,
    relay,
  });
  relay.listener = l;
  listeners.push(l);
  return l;
}

function get(port: number, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = request(
      { host: '127.0.0.1', port, path, headers: { host: `${port1}-sbx.example`, connection: 'close' } },
      (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d));
        res.on('end', () => resolve(`${res.statusCode} ${body}`));
      },
    );
    req.on('error', reject);
    req.end();
  });
}

describe('a connection taken from Node and given back (socket-fd.ts)', () => {
  it('is served by the HTTP/1.1 path with the bytes read before it came back, at any split', async () => {
    for (const take of [0, 1, 17, 40]) {
      const relay = new ReadingRelayDouble(take);
      const l = await start(relay);
      expect(await get(l.port, `/take-${take}`)).toBe(`200 h1 ${port1}-sbx.example /take-${take}`);
      expect(relay.detached).toBe(1);
    }
  });

  it('is served by the h2 server when the bytes given back are (part of) the preface', async () => {
    for (const take of [10, 24]) {
      const relay = new ReadingRelayDouble(take);
      const l = await start(relay);
      const body = await h2Get(l.port, `${port2}-sbx.example`, '/q');
      expect(body).toBe(`h2 ${port2}-sbx.example /q`);
    }
  });

  it('leaves no descriptor behind once client and proxy are done', async () => {
    const relay = new ReadingRelayDouble(5);
    const l = await start(relay);
    await get(l.port, '/warm');
    await eventually(() => l.openConnections === 0, { what: 'the warm-up connection closed' });
    const before = openFds(process.pid).length;
    for (let i = 0; i < 20; i++) await get(l.port, `/n${i}`);
    await eventually(() => l.openConnections === 0, { what: 'every handed-back socket closed' });
    forwarding.http1.pool.close();
    await eventually(() => expect(openFds(process.pid).length).toBeLessThanOrEqual(before));
    expect(relay.detached).toBe(21);
  });

  it('refuses a socket without a descriptor with a clear error', () => {
    expect(() => detachSocketFd(new Socket())).toThrow(/no descriptor/);
  });
});
