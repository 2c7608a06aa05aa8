import { createHash } from 'node:crypto';
import { createServer as createHttpServer, request, type Server } from 'node:http';
import { connect, type AddressInfo, type Socket } from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { RouteState } from '#proto/sbx/routing';
import { eventually } from '#test-kit';
import { ProtocolListener } from './protocol-listener.js';
import { RouteTable } from './route-table.js';
import { forwarders, type Forwarders } from '../test/forwarders.js';

/*
 * The raw-socket HTTP/1.1 path (http1-connection.ts) against HTTP servers on loopback standing
 * in for sandbox ports: two ports of sandbox `sbx`, and sandbox `locked` with a token and a
 * masked Host. Clients are raw sockets where the bytes on the wire matter.
 */

const logger = createLogger({ service: 'test', level: 'silent' });
const BIG = 24 * 1024 * 1024 + 12_345;

function pattern(offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) out[i] = ((offset + i) * 131 + ((offset + i) >>> 9)) & 0xff;
  return out;
}
const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

let servers: Server[];
let ports: number[];
let listener: ProtocolListener;
let forwarding: Forwarders;
/** Upstream connections the servers saw opened. */
let accepted: number;

function guestServer(name: string): Server {
  const server = createHttpServer((req, res) => {
    const url = new URL(req.url!, 'http://x');
    if (url.pathname === '/who') {
      res.end(JSON.stringify({ name, method: req.method, url: req.url, headers: req.headers }));
    } else if (url.pathname === '/big') {
      // No length: chunked, in writes larger than any socket buffer.
      const total = Number(url.searchParams.get('bytes'));
      let at = 0;
      const more = () => {
        while (at < total) {
          const n = Math.min(1024 * 1024, total - at);
          const ok = res.write(pattern(at, n));
          at += n;
          if (!ok) return void res.once('drain', more);
        }
        res.end();
      };
      more();
    } else if (url.pathname === '/upload') {
      const hash = createHash('sha256');
      let n = 0;
      req.on('data', (d: Buffer) => {
        hash.update(d);
        n += d.length;
      });
      req.on('end', () => res.end(JSON.stringify({ bytes: n, sha: hash.digest('hex') })));
    } else if (url.pathname === '/slow') {
      // A download that goes on until the client goes away.
      res.write('first part\n');
      const timer = setInterval(() => res.write('more\n'), 20);
      res.on('close', () => clearInterval(timer));
    } else {
      res.statusCode = 404;
      res.end('no such path');
    }
  });
  server.on('connection', () => accepted++);
  server.on('upgrade', (req, socket: Socket, head: Buffer) => {
    socket.write(
      `HTTP/1.1 101 Switching Protocols\r\nUpgrade: ${req.headers.upgrade}\r\nConnection: Upgrade\r\nX-Host: ${req.headers.host}\r\n\r\n`,
    );
    if (req.url === '/ws-bye') {
      socket.end();
      return;
    }
    if (head.length) socket.write(head);
    socket.pipe(socket);
  });
  return server;
}

const listen = (server: Server) =>
  new Promise<number>((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port)),
  );

beforeEach(async () => {
  accepted = 0;
  servers = [guestServer('a'), guestServer('b')];
  ports = await Promise.all(servers.map(listen));
  const table = new RouteTable();
  table.upsert({ sandboxId: 'sbx', state: RouteState.ROUTE_STATE_RUNNING, hostIp: '127.0.0.1', autoResumePolicy: '' });
  table.upsert({
    sandboxId: 'locked',
    state: RouteState.ROUTE_STATE_RUNNING,
    hostIp: '127.0.0.1',
    autoResumePolicy: '',
    trafficAccessToken: 's3cret',
    maskRequestHost: 'localhost:3000',
  });
  forwarding = forwarders(table, logger, 30_000);
  const { metrics } = forwarding;
  listener = await ProtocolListener.start({
    host: '127.0.0.1',
    port: 0,
    http1: forwarding.http1,
    h2: forwarding.h2,
    metrics,
    logger,
    idleTimeoutMs: 30_000,
  });
});

afterEach(async () => {
  await listener.close();
  forwarding.close();
  for (const s of servers) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
});

/** A raw client connection and everything it has received so far. */
async function rawClient(): Promise<{ socket: Socket; received: () => Buffer; closed: Promise<void> }> {
  const socket = connect(listener.port, '127.0.0.1');
  await new Promise((r) => socket.once('connect', r));
  const chunks: Buffer[] = [];
  socket.on('data', (d: Buffer) => chunks.push(d));
  socket.on('error', () => undefined);
  const closed = new Promise<void>((r) => socket.once('close', () => r()));
  return { socket, received: () => Buffer.concat(chunks), closed };
}

/** Splits whole responses with Content-Length off the text received. */
function responses(text: string): { status: number; headers: string; body: string }[] {
  const out = [];
  let rest = text;
  for (;;) {
    const end = rest.indexOf('\r\n\r\n');
    if (end < 0) return out;
    const head = rest.slice(0, end);
    const length = Number(/\r\ncontent-length: (\d+)/i.exec(head)?.[1] ?? 0);
    if (rest.length < end + 4 + length) return out;
    out.push({ status: Number(head.slice(9, 12)), headers: head, body: rest.slice(end + 4, end + 4 + length) });
    rest = rest.slice(end + 4 + length);
  }
}

/** The data of a whole chunked body. */
function dechunk(wire: Buffer): Buffer {
  const parts: Buffer[] = [];
  let at = 0;
  for (;;) {
    const eol = wire.indexOf('\r\n', at);
    const size = parseInt(wire.toString('latin1', at, eol), 16);
    if (size === 0) return Buffer.concat(parts);
    parts.push(wire.subarray(eol + 2, eol + 2 + size));
    at = eol + 2 + size + 2;
  }
}

const whoBody = (body: string) => JSON.parse(body) as { name: string; url: string; headers: Record<string, string> };

describe('HTTP/1.1 on raw sockets', () => {
  it('answers pipelined requests in order, each routed by its own Host, on one client connection', async () => {
    const c = await rawClient();
    c.socket.write(
      `GET /who?n=1 HTTP/1.1\r\nHost: ${ports[0]}-sbx.example\r\n\r\n` +
        `GET /who?n=2 HTTP/1.1\r\nHost: ${ports[1]}-sbx.example\r\n\r\n` +
        `POST /upload HTTP/1.1\r\nHost: ${ports[0]}-sbx.example\r\nContent-Length: 5\r\n\r\nhello` +
        `GET /who?n=4 HTTP/1.1\r\nHost: ${ports[1]}-SBX.example\r\n\r\n`,
    );
    await eventually(() => responses(c.received().toString('latin1')).length === 4, { what: 'four answers' });
    const [r1, r2, r3, r4] = responses(c.received().toString('latin1'));
    expect([whoBody(r1!.body).name, whoBody(r1!.body).url]).toEqual(['a', '/who?n=1']);
    expect([whoBody(r2!.body).name, whoBody(r2!.body).url]).toEqual(['b', '/who?n=2']);
    expect(JSON.parse(r3!.body)).toEqual({ bytes: 5, sha: sha(Buffer.from('hello')) });
    expect([whoBody(r4!.body).name, whoBody(r4!.body).url]).toEqual(['b', '/who?n=4']);
    // One upstream connection per sandbox port, reused; the client connection is still open.
    expect(accepted).toBe(2);
    expect(c.socket.destroyed).toBe(false);
    c.socket.destroy();
  });

  it('re-routes each keep-alive request, and keeps upstream connections pooled per port', async () => {
    const c = await rawClient();
    for (let i = 0; i < 6; i++) {
      const port = ports[i % 2]!;
      const before = responses(c.received().toString('latin1')).length;
      c.socket.write(`GET /who?i=${i} HTTP/1.1\r\nHost: ${port}-sbx.example\r\nUser-Agent: t\r\n\r\n`);
      await eventually(() => responses(c.received().toString('latin1')).length === before + 1, { what: `answer ${i}` });
    }
    const names = responses(c.received().toString('latin1')).map((r) => whoBody(r.body).name);
    expect(names).toEqual(['a', 'b', 'a', 'b', 'a', 'b']);
    expect(accepted).toBe(2);
    c.socket.destroy();
  });

  it('passes a response larger than any buffer (chunked) and a chunked upload byte for byte', async () => {
    const down = await new Promise<Buffer>((resolve, reject) => {
      const req = request(
        { host: '127.0.0.1', port: listener.port, path: `/big?bytes=${BIG}`, headers: { host: `${ports[0]}-sbx.x` } },
        (res) => {
          const parts: Buffer[] = [];
          res.on('data', (d: Buffer) => parts.push(d));
          res.on('end', () => resolve(Buffer.concat(parts)));
        },
      );
      req.on('error', reject);
      req.end();
    });
    expect(down.length).toBe(BIG);
    expect(down.equals(pattern(0, BIG))).toBe(true);

    // A client that stops reading now and then: the proxy's writes queue, and what it reads next
    // from the guest must not overwrite what is still waiting to go out.
    const slow = await rawClient();
    slow.socket.write(
      `GET /big?bytes=${8 * 1024 * 1024} HTTP/1.1\r\nHost: ${ports[1]}-sbx.x\r\nConnection: close\r\n\r\n`,
    );
    const pauser = setInterval(() => {
      slow.socket.pause();
      setTimeout(() => slow.socket.resume(), 5);
    }, 10);
    await slow.closed;
    clearInterval(pauser);
    const raw = slow.received();
    const bodyAt = raw.indexOf('\r\n\r\n') + 4;
    expect(dechunk(raw.subarray(bodyAt)).equals(pattern(0, 8 * 1024 * 1024))).toBe(true);

    const upload = pattern(7, 9 * 1024 * 1024 + 3);
    const answer = await new Promise<string>((resolve, reject) => {
      const req = request(
        {
          host: '127.0.0.1',
          port: listener.port,
          method: 'POST',
          path: '/upload',
          headers: { host: `${ports[1]}-sbx.x` },
        },
        (res) => {
          let text = '';
          res.on('data', (d: Buffer) => (text += d));
          res.on('end', () => resolve(text));
        },
      );
      req.on('error', reject);
      // Several writes without a length: node:http sends them chunked.
      for (let at = 0; at < upload.length; at += 1_000_003) req.write(upload.subarray(at, at + 1_000_003));
      req.end();
    });
    expect(JSON.parse(answer)).toEqual({ bytes: upload.length, sha: sha(upload) });
  });

  it('leaks nothing when a client goes away in the middle of its body or of the answer', async () => {
    const c = await rawClient();
    c.socket.write(`POST /upload HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\nContent-Length: 1000000\r\n\r\n`);
    c.socket.write(Buffer.alloc(300_000, 1));
    await eventually(() => forwarding.http1.pool.size === 1, { what: 'the upstream connection' });
    c.socket.destroy();
    const d = await rawClient();
    d.socket.write(`GET /slow HTTP/1.1\r\nHost: ${ports[1]}-sbx.x\r\n\r\n`);
    await eventually(() => d.received().toString().includes('first part'), { what: 'the start of the answer' });
    d.socket.destroy();
    const upstreamOpen = async () =>
      (await Promise.all(servers.map((s) => new Promise<number>((r) => s.getConnections((_, n) => r(n)))))).reduce(
        (a, b) => a + b,
      );
    await eventually(
      async () => listener.openConnections === 0 && forwarding.http1.pool.size === 0 && (await upstreamOpen()) === 0,
      {
        what: 'every client and upstream socket closed',
      },
    );
  });

  it('checks the token, strips it and shows the guest the masked Host', async () => {
    const c = await rawClient();
    c.socket.write(`GET /who HTTP/1.1\r\nHost: ${ports[0]}-locked.x\r\n\r\n`);
    c.socket.write(`GET /who HTTP/1.1\r\nHost: ${ports[0]}-locked.x\r\ne2b-traffic-access-token: nope\r\n\r\n`);
    c.socket.write(`GET /who HTTP/1.1\r\nHost: ${ports[0]}-locked.x\r\ne2b-traffic-access-token: s3cret\r\n\r\n`);
    await eventually(() => responses(c.received().toString('latin1')).length === 3, { what: 'three answers' });
    const [missing, wrong, ok] = responses(c.received().toString('latin1'));
    expect([missing!.status, JSON.parse(missing!.body).code]).toEqual([403, 'ACCESS_DENIED']);
    expect([wrong!.status, JSON.parse(wrong!.body).code]).toEqual([403, 'ACCESS_DENIED']);
    const seen = whoBody(ok!.body).headers;
    expect(seen.host).toBe('localhost:3000');
    expect(seen['x-forwarded-host']).toBe(`${ports[0]}-locked.x`);
    expect(seen['e2b-traffic-access-token']).toBeUndefined();
    c.socket.destroy();
  });

  it('refuses a malformed request with 400 and closes; a route error keeps the connection', async () => {
    const c = await rawClient();
    c.socket.write(`GET /who HTTP/1.1\r\nHost: www.example.com\r\n\r\n`);
    c.socket.write(`GET /who HTTP/1.1\r\nHost: 1-nosuch.example\r\nContent-Length: 3\r\n\r\nabc`);
    c.socket.write(
      `GET /who HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n`,
    );
    await c.closed;
    const answers = responses(c.received().toString('latin1'));
    expect(answers.length, c.received().toString('latin1')).toBe(3);
    const [badHost, unknown, smuggle] = answers;
    expect([badHost!.status, JSON.parse(badHost!.body).code]).toEqual([400, 'BAD_ROUTE']);
    expect([unknown!.status, JSON.parse(unknown!.body).code]).toEqual([404, 'SANDBOX_NOT_FOUND']);
    expect([smuggle!.status, JSON.parse(smuggle!.body).code]).toEqual([400, 'BAD_REQUEST']);
    expect(smuggle!.headers).toMatch(/connection: close/i);
    expect(accepted).toBe(0);
  });

  it('passes 100 Continue through, then the answer', async () => {
    const c = await rawClient();
    c.socket.write(
      `POST /upload HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n`,
    );
    await eventually(() => c.received().toString().startsWith('HTTP/1.1 100 Continue\r\n\r\n'), {
      what: '100 Continue',
    });
    c.socket.write('data');
    await eventually(() => c.received().toString().includes('"bytes":4'), { what: 'the final answer' });
    c.socket.destroy();
  });

  it('tunnels an upgrade after 101, and serves HEAD and HTTP/1.0 clients', async () => {
    const c = await rawClient();
    c.socket.write(
      `GET /ws HTTP/1.1\r\nHost: ${ports[0]}-locked.x\r\ne2b-traffic-access-token: s3cret\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`,
    );
    await eventually(() => c.received().toString().includes('\r\n\r\n'), { what: '101' });
    expect(c.received().toString()).toMatch(/^HTTP\/1\.1 101 Switching Protocols\r\n/);
    expect(c.received().toString()).toContain('X-Host: localhost:3000');
    const payload = pattern(3, 200_000);
    c.socket.write(payload);
    const headLength = c.received().indexOf('\r\n\r\n') + 4;
    await eventually(() => c.received().length === headLength + payload.length, { what: 'the echo' });
    expect(c.received().subarray(headLength).equals(payload)).toBe(true);
    c.socket.end();
    await c.closed;

    // A guest that ends the tunnel at once while the client still writes.
    const b = await rawClient();
    b.socket.write(`GET /ws-bye HTTP/1.1\r\nHost: ${ports[1]}-sbx.x\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n`);
    await eventually(() => b.received().toString().includes('\r\n\r\n'), { what: '101 then end' });
    b.socket.write('still talking');
    b.socket.end('bye');
    await b.closed;
    await eventually(() => listener.openConnections === 0 && forwarding.http1.pool.size === 0, {
      what: 'both sides closed',
    });

    const h = await rawClient();
    h.socket.write(
      `HEAD /who HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\n\r\nGET /who?after HTTP/1.0\r\nHost: ${ports[0]}-sbx.x\r\n\r\n`,
    );
    await h.closed;
    const text = h.received().toString('latin1');
    expect(text).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    const second = text.slice(text.indexOf('\r\n\r\n') + 4);
    // HEAD has no body, so the next bytes are the HTTP/1.0 answer, after which the connection closes.
    expect(second).toMatch(/^HTTP\/1\.1 200 OK\r\n/);
    expect(second).toContain('/who?after');
  });

  it('drops a pooled connection the guest closed while idle; the next request gets a new one', async () => {
    const c = await rawClient();
    c.socket.write(`GET /who HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\n\r\n`);
    await eventually(() => responses(c.received().toString('latin1')).length === 1, { what: 'first answer' });
    // The guest drops its idle keep-alive connections (as on its keep-alive timeout).
    servers[0]!.closeIdleConnections();
    await eventually(() => forwarding.http1.pool.size === 0, { what: 'the pooled connection to go' });
    c.socket.write(`GET /who HTTP/1.1\r\nHost: ${ports[0]}-sbx.x\r\n\r\n`);
    await eventually(() => responses(c.received().toString('latin1')).length === 2, { what: 'second answer' });
    expect(responses(c.received().toString('latin1'))[1]!.status).toBe(200);
    c.socket.destroy();
  });
});
