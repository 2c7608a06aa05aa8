import { createHash, randomBytes } from 'node:crypto';
import http from 'node:http';
import net from 'node:net';
import koffi from 'koffi';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { eventually, openFds } from '#test-kit';
import { close, dupCloexec } from './fd.js';
import { HttpRelay, type HttpRelayOptions, type RelayHandoff } from './http-relay.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

function listen(server: net.Server): Promise<number> {
  return new Promise((resolve) =>
    server.listen(0, '127.0.0.1', () => resolve((server.address() as net.AddressInfo).port)),
  );
}

/** A raw HTTP/1.1 guest: records every request head and body as bytes, answers with `answer`. */
class RawGuest {
  readonly heads: string[] = [];
  readonly bodies: Buffer[] = [];
  readonly sockets = new Set<net.Socket>();
  connections = 0;
  port = 0;
  readonly server: net.Server;
  constructor(
    private readonly answer: (head: string, nOnSocket: number, socket: net.Socket) => string | undefined = () =>
      'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok',
  ) {
    this.server = net.createServer((s) => {
      this.connections++;
      this.sockets.add(s);
      s.on('close', () => this.sockets.delete(s));
      s.on('error', () => {});
      let buf = Buffer.alloc(0);
      let n = 0;
      s.on('data', (chunk) => {
        buf = Buffer.concat([buf, chunk]);
        for (;;) {
          const end = buf.indexOf('\r\n\r\n');
          if (end < 0) return;
          const head = buf.toString('latin1', 0, end + 4);
          const cl = /\r\ncontent-length: *(\d+)/i.exec(head);
          const len = cl ? Number(cl[1]) : 0;
          if (buf.length < end + 4 + len) return;
          this.heads.push(head);
          this.bodies.push(buf.subarray(end + 4, end + 4 + len));
          buf = buf.subarray(end + 4 + len);
          const reply = this.answer(head, ++n, s);
          if (reply !== undefined) s.write(reply, 'latin1');
        }
      });
    });
  }
  async start(): Promise<this> {
    this.port = await listen(this.server);
    return this;
  }
  stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    return new Promise((r) => this.server.close(() => r()));
  }
}

/** A client connection as the proxy would accept it, adopted by the relay. */
class Front {
  readonly handoffs: RelayHandoff[] = [];
  readonly server: net.Server;
  port = 0;
  constructor(
    readonly relay: HttpRelay,
    watch: boolean,
  ) {
    if (watch) relay.onHandoff((h) => this.handoffs.push(h));
    this.server = net.createServer({ pauseOnConnect: true }, (s) => {
      const fd = (s as unknown as { _handle: { fd: number } })._handle.fd;
      relay.adopt(dupCloexec(fd), s.remoteAddress);
      s.destroy();
    });
  }
  async start(): Promise<this> {
    this.port = await listen(this.server);
    return this;
  }
  stop(): Promise<void> {
    for (const h of this.handoffs.splice(0)) close(h.fd);
    return new Promise((r) => this.server.close(() => r()));
  }
}

/** A raw client: writes bytes, collects everything it reads. */
class RawClient {
  readonly socket: net.Socket;
  data = Buffer.alloc(0);
  ended = false;
  closed = false;
  constructor(port: number) {
    this.socket = net.connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    this.socket.on('data', (c) => (this.data = Buffer.concat([this.data, c])));
    this.socket.on('end', () => (this.ended = true));
    this.socket.on('close', () => (this.closed = true));
    this.socket.on('error', () => {});
  }
  send(text: string | Buffer): void {
    this.socket.write(typeof text === 'string' ? Buffer.from(text, 'latin1') : text);
  }
  text(): string {
    return this.data.toString('latin1');
  }
  /** Waits until `n` complete responses with Content-Length were read. */
  async responses(n: number): Promise<string[]> {
    let out: string[] = [];
    await eventually(
      () => {
        out = [];
        let rest = this.text();
        while (out.length < n) {
          const end = rest.indexOf('\r\n\r\n');
          if (end < 0) return false;
          const len = Number(/content-length: *(\d+)/i.exec(rest.slice(0, end))?.[1] ?? 0);
          if (rest.length < end + 4 + len) return false;
          out.push(rest.slice(0, end + 4 + len));
          rest = rest.slice(end + 4 + len);
        }
        return true;
      },
      { what: `${n} responses` },
    );
    return out;
  }
}

describe('HttpRelay', () => {
  let relay: HttpRelay;
  let front: Front;
  const guests: RawGuest[] = [];
  const clients: RawClient[] = [];
  let fdsBefore = 0;

  async function setup(o: Partial<HttpRelayOptions> = {}, watch = true): Promise<void> {
    relay = new HttpRelay({
      threads: 2,
      clientIdleTimeoutMs: 30_000,
      upstreamConnectTimeoutMs: 2_000,
      upstreamIdleTimeoutMs: 30_000,
      ...o,
    });
    front = await new Front(relay, watch).start();
  }
  async function guest(answer?: ConstructorParameters<typeof RawGuest>[0]): Promise<RawGuest> {
    const g = await new RawGuest(answer).start();
    guests.push(g);
    return g;
  }
  function client(): RawClient {
    const c = new RawClient(front.port);
    clients.push(c);
    return c;
  }

  beforeEach(() => {
    fdsBefore = openFds(process.pid).length;
  });
  afterEach(async () => {
    for (const c of clients.splice(0)) c.socket.destroy();
    await front?.stop();
    relay?.destroy();
    for (const g of guests.splice(0)) await g.stop();
    // Every fd the relay had (clients, upstreams, epolls, eventfds) is closed again.
    await eventually(() => expect(openFds(process.pid).length).toBeLessThanOrEqual(fdsBefore));
  });

  it('forwards keep-alive requests with the rewritten head (Host masked, token and hop-by-hop dropped, X-Forwarded-*) on one pooled upstream', async () => {
    await setup();
    const g = await guest();
    relay.setRoute('Sbx-1', '127.0.0.1', 's3cret', 'inside.local');
    const host = `${g.port}-sbx-1.example.com:5007`;
    const c = client();
    for (let i = 0; i < 3; i++) {
      c.send(
        `GET /a/${i}?q=1 HTTP/1.1\r\nHost: ${host}\r\nX-Custom:  v ${i} \r\ne2b-traffic-access-token: s3cret\r\n` +
          `Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n`,
      );
      const [r] = await c.responses(i + 1).then((all) => all.slice(i));
      expect(r).toBe('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
    }
    expect(g.heads).toEqual(
      [0, 1, 2].map(
        (i) =>
          `GET /a/${i}?q=1 HTTP/1.1\r\nHost: inside.local\r\nX-Custom:  v ${i} \r\n` +
          `X-Forwarded-For: 10.0.0.1, 10.0.0.2, 127.0.0.1\r\nX-Forwarded-Host: ${host}\r\nX-Forwarded-Proto: http\r\n\r\n`,
      ),
    );
    expect(g.connections).toBe(1);
    const s = relay.stats();
    expect(s).toMatchObject({ adopted: 1, requests: 3, upstreamConnects: 1, poolReuses: 2, handoffs: 0 });
    expect(s.responses[1]).toBe(3);
    // Connection: close is passed on, answered, and the connection is closed after it.
    c.send(`GET /last HTTP/1.1\r\nHost: ${host}\r\ne2b-traffic-access-token: s3cret\r\nConnection: close\r\n\r\n`);
    await eventually(() => c.ended, { what: 'client end after Connection: close' });
    expect(g.heads[3]).toContain('\r\nConnection: close\r\n\r\n');
    await eventually(() => relay.stats().openClients === 0, { what: 'client closed' });
  });

  it('answers pipelined requests in order, a body in the middle, each routed on its own', async () => {
    await setup();
    const a = await guest((head) => `HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n${head.includes('/x') ? 'x' : 'A'}`);
    const b = await guest(() => 'HTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nB');
    relay.setRoute('one', '127.0.0.1');
    const c = client();
    c.send(
      `GET /1 HTTP/1.1\r\nHost: ${a.port}-one.e2b.dev\r\n\r\n` +
        `POST /2 HTTP/1.1\r\nHost: ${b.port}-one.e2b.dev\r\nContent-Length: 5\r\n\r\nhello` +
        `\r\nGET /x HTTP/1.1\r\nHost: ${a.port}-ONE.e2b.dev\r\n\r\n` +
        `GET /4 HTTP/1.1\r\nHost: ${b.port}-one.e2b.dev\r\n\r\n`,
    );
    const rs = await c.responses(4);
    expect(rs.map((r) => r.slice(-1))).toEqual(['A', 'B', 'x', 'B']);
    expect(b.bodies[0]!.toString()).toBe('hello');
    expect(a.connections + b.connections).toBe(2);
  });

  it('reads requests split at any byte (heads, bodies and pipelined ones in odd pieces)', async () => {
    await setup();
    const g = await guest((head) => `HTTP/1.1 200 OK\r\nContent-Length: ${head.length}\r\n\r\n${head}`);
    relay.setRoute('split', '127.0.0.1');
    const host = `${g.port}-split.example.com`;
    const stream =
      `\r\nPOST /a HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 11\r\n\r\nhello world` +
      `GET /b HTTP/1.1\r\nHost: ${host}\r\nX-Long: ${'z'.repeat(3000)}\r\n\r\n` +
      `POST /c HTTP/1.1\r\nHost: ${host}\r\ncontent-length: 3\r\n\r\nabc`;
    let seed = 3;
    for (let run = 0; run < 12; run++) {
      const c = client();
      for (let at = 0; at < stream.length;) {
        seed = (seed * 1103515245 + 12345) % 2147483648;
        const piece = run === 0 ? 1 : 1 + (seed % 700);
        c.send(stream.slice(at, at + piece));
        at += piece;
        await new Promise((r) => setImmediate(r));
      }
      const rs = await c.responses(3);
      expect(rs.map((r) => /^(?:GET|POST) (\S+)/m.exec(r.slice(r.indexOf('\r\n\r\n') + 4))?.[1])).toEqual([
        '/a',
        '/b',
        '/c',
      ]);
      c.socket.destroy();
    }
    expect(g.bodies.map((b) => b.toString())).toEqual(
      Array.from({ length: 12 }, () => ['hello world', '', 'abc']).flat(),
    );
    expect(relay.stats()).toMatchObject({ requests: 36, handoffs: 0 });
  });

  it('carries a multi-MiB chunked upload and a chunked download byte for byte, and a client that keeps pausing', async () => {
    await setup();
    const upload = randomBytes(6 * 1024 * 1024 + 7);
    const download = randomBytes(9 * 1024 * 1024 + 3);
    const up = http.createServer((req, res) => {
      const parts: Buffer[] = [];
      req.on('data', (p: Buffer) => parts.push(p));
      req.on('end', () => {
        if (req.url === '/up') res.end(sha(Buffer.concat(parts)));
        else {
          // Chunked: written in pieces without a length.
          let at = 0;
          const more = () => {
            while (at < download.length) {
              const piece = download.subarray(at, at + 100_000 + (at % 7919));
              at += piece.length;
              if (!res.write(piece)) return void res.once('drain', more);
            }
            res.end();
          };
          more();
        }
      });
    });
    // Node closes an idle keep-alive connection after 5 s; under a loaded machine the gap between
    // two of these requests has reached that, and the count below is about the relay's pool.
    up.keepAliveTimeout = 120_000;
    const port = await listen(up);
    relay.setRoute('big', '127.0.0.1');
    const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
    try {
      const ask = (path: string, body?: Buffer, pausing = false) =>
        new Promise<{ status: number; body: Buffer; te?: string }>((resolve, reject) => {
          const req = http.request(
            {
              port: front.port,
              host: '127.0.0.1',
              path,
              method: body ? 'POST' : 'GET',
              agent,
              headers: { host: `${port}-big.x` },
            },
            (res) => {
              const parts: Buffer[] = [];
              res.on('data', (p: Buffer) => {
                parts.push(p);
                if (pausing && parts.length % 5 === 0) {
                  res.pause();
                  setTimeout(() => res.resume(), 3);
                }
              });
              res.on('end', () =>
                resolve({ status: res.statusCode!, body: Buffer.concat(parts), te: res.headers['transfer-encoding'] }),
              );
            },
          );
          req.on('error', reject);
          if (body) {
            // Streamed in pieces: node sends it chunked.
            for (let at = 0; at < body.length; at += 65_521) req.write(body.subarray(at, at + 65_521));
          }
          req.end();
        });
      const u = await ask('/up', upload);
      expect(u.body.toString()).toBe(sha(upload));
      const d = await ask('/down');
      expect(d.te).toBe('chunked');
      expect(sha(d.body)).toBe(sha(download));
      const p = await ask('/down', undefined, true);
      expect(sha(p.body)).toBe(sha(download));
      const s = relay.stats();
      expect(s.requests).toBe(3);
      expect(s.upstreamConnects).toBe(1);
      expect(s.handoffs).toBe(0);
    } finally {
      agent.destroy();
      await new Promise((r) => up.close(r));
    }
  });

  it('hands a connection off at the request boundary, with exactly the bytes not forwarded, for each reason', async () => {
    await setup();
    const g = await guest();
    relay.setRoute('run', '127.0.0.1', 'tok');
    const tmp = net.createServer();
    const closed = await listen(tmp); // a port nobody listens on any more
    await new Promise((r) => tmp.close(r));
    const okHost = `${g.port}-run.example.com`;
    const cases: [string, string][] = [
      ['H2_PREFACE', 'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00'],
      ['NO_ROUTE', `GET / HTTP/1.1\r\nHost: ${g.port}-nosuch.example.com\r\n\r\n`],
      ['TOKEN', `GET / HTTP/1.1\r\nHost: ${okHost}\r\n\r\n`],
      ['TOKEN', `POST / HTTP/1.1\r\nHost: ${okHost}\r\ne2b-traffic-access-token: tok2\r\nContent-Length: 3\r\n\r\nabc`],
      [
        'UPGRADE',
        `GET /ws HTTP/1.1\r\nHost: ${okHost}\r\ne2b-traffic-access-token: tok\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n`,
      ],
      ['CONNECTION', `GET / HTTP/1.1\r\nHost: ${okHost}\r\ne2b-traffic-access-token: tok\r\nConnection: x-foo\r\n\r\n`],
      ['VERSION', `GET / HTTP/1.0\r\nHost: ${okHost}\r\n\r\n`],
      ['BAD_HEAD', `GET / HTTP/1.1\r\nHost: ${okHost}\r\n folded\r\n\r\n`],
      ['BAD_HEAD', `GET / HTTP/1.1\r\nHost: ${okHost}\nX: y\r\n\r\n`],
      ['HOST', `GET / HTTP/1.1\r\nHost: example.com\r\n\r\n`],
      ['HOST', `GET / HTTP/1.1\r\nHost: ${okHost}\r\nHost: ${okHost}\r\n\r\n`],
      ['FRAMING', `POST / HTTP/1.1\r\nHost: ${okHost}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n`],
      ['EXPECT', `POST / HTTP/1.1\r\nHost: ${okHost}\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n`],
      ['ROUTE_HEADERS', `GET / HTTP/1.1\r\nHost: x\r\ne2b-sandbox-id: run\r\ne2b-sandbox-port: 80\r\n\r\n`],
      ['TARGET', `GET http://${okHost}/ HTTP/1.1\r\nHost: ${okHost}\r\n\r\n`],
      ['HEAD_TOO_LARGE', `GET / HTTP/1.1\r\nHost: ${okHost}\r\nX: ${'a'.repeat(17_000)}\r\n\r\n`],
      ['CONNECT_FAILED', `GET / HTTP/1.1\r\nHost: ${closed}-run.example.com\r\ne2b-traffic-access-token: tok\r\n\r\n`],
    ];
    for (const [reason, bytes] of cases) {
      const before = front.handoffs.length;
      const c = client();
      c.send(bytes);
      await eventually(() => front.handoffs.length > before, { what: `handoff ${reason}` });
      const h = front.handoffs.splice(before, 1)[0]!;
      expect([reason, h.reason]).toEqual([reason, reason]);
      expect(h.bytes.toString('latin1')).toBe(bytes);
      // The fd is the client's connection: answering on it reaches the client.
      const s = new net.Socket({ fd: h.fd, readable: true, writable: true });
      s.write('HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n');
      await eventually(() => c.text().startsWith('HTTP/1.1 400'), { what: 'answer through the handed-off fd' });
      s.destroy();
    }
    expect(g.heads).toEqual([]);
    // After a forwarded request, the next (refused) one goes with exactly its own bytes.
    const c = client();
    const second = `GET /2 HTTP/1.1\r\nHost: ${okHost}\r\n\r\nGET /3 HTTP/1.1\r\n`;
    c.send(`GET /1 HTTP/1.1\r\nHost: ${okHost}\r\ne2b-traffic-access-token: tok\r\n\r\n${second}`);
    await c.responses(1);
    await eventually(() => front.handoffs.length === 1, { what: 'handoff after a forwarded request' });
    expect(front.handoffs[0]!.bytes.toString('latin1')).toBe(second);
    const s = relay.stats();
    expect(s.handoffs).toBe(cases.length + 1);
    expect(s.handoffsByReason.TOKEN).toBe(3);
    expect(s.openClients).toBe(0);
  });

  it('a deleted route takes effect for the next request, and its idle upstream connections are closed', async () => {
    await setup();
    const g = await guest();
    relay.setRoute('gone', '127.0.0.1');
    const c = client();
    const req = `GET / HTTP/1.1\r\nHost: ${g.port}-gone.example.com\r\n\r\n`;
    c.send(req);
    await c.responses(1);
    await eventually(() => relay.stats().idleUpstreams === 1, { what: 'pooled upstream' });
    expect(relay.deleteRoute('gone')).toBe(true);
    expect(relay.deleteRoute('gone')).toBe(false);
    await eventually(() => relay.stats().openUpstreams === 0 && g.sockets.size === 0, { what: 'idle upstream closed' });
    c.send(req);
    await eventually(() => front.handoffs.length === 1, { what: 'handoff' });
    expect(front.handoffs[0]).toMatchObject({ reason: 'NO_ROUTE' });
    expect(front.handoffs[0]!.bytes.toString('latin1')).toBe(req);
  });

  it('sends a bodiless request again once when its pooled connection was reset before answering', async () => {
    await setup();
    // Each guest connection answers its first request and drops the second without a word.
    const g = await guest((_head, n, s) => {
      if (n === 1) return 'HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok';
      s.destroy();
      return undefined;
    });
    relay.setRoute('flaky', '127.0.0.1');
    const c = client();
    const req = `GET / HTTP/1.1\r\nHost: ${g.port}-flaky.example.com\r\n\r\n`;
    c.send(req);
    await c.responses(1);
    c.send(req);
    await c.responses(2);
    expect(relay.stats()).toMatchObject({ retries: 1, requests: 2, upstreamErrors: 0 });
    expect(g.connections).toBe(2);
    // With a body it is not sent again: the client connection is cut.
    c.send(`POST / HTTP/1.1\r\nHost: ${g.port}-flaky.example.com\r\nContent-Length: 1\r\n\r\nx`);
    await eventually(() => c.ended || c.closed, { what: 'client cut' });
    expect(relay.stats()).toMatchObject({ retries: 1, upstreamErrors: 1, openClients: 0 });
  });

  it('passes interim 1xx on, honours HEAD and close-delimited bodies, and closes the client after them', async () => {
    await setup();
    const g = await guest((head) => {
      if (head.startsWith('HEAD')) return 'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n';
      if (head.startsWith('GET /hint'))
        return 'HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz';
      return undefined;
    });
    relay.setRoute('misc', '127.0.0.1');
    const c = client();
    const host = `${g.port}-misc.example.com`;
    c.send(`HEAD / HTTP/1.1\r\nHost: ${host}\r\n\r\nGET /hint HTTP/1.1\r\nHost: ${host}\r\n\r\n`);
    await eventually(() => c.text().endsWith('\r\n\r\nz'), { what: 'HEAD then 103 + 200' });
    expect(c.text()).toBe(
      'HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz',
    );
    // A response without length ends at the guest's close, then the client is closed too.
    const g2 = await guest((_h, _n, s) => {
      s.end('HTTP/1.1 200 OK\r\n\r\nuntil close');
      return undefined;
    });
    c.send(`GET / HTTP/1.1\r\nHost: ${g2.port}-misc.example.com\r\n\r\n`);
    await eventually(() => c.ended, { what: 'client end' });
    expect(c.text().endsWith('HTTP/1.1 200 OK\r\n\r\nuntil close')).toBe(true);
  });

  it('releases everything when clients go away mid-body or mid-response, and closes idle clients', async () => {
    await setup({ clientIdleTimeoutMs: 300 });
    const big = Buffer.alloc(8 * 1024 * 1024, 'b');
    const g = await guest((head) =>
      head.startsWith('GET /big')
        ? `HTTP/1.1 200 OK\r\nContent-Length: ${big.length}\r\n\r\n${big.toString('latin1')}`
        : undefined,
    );
    relay.setRoute('cut', '127.0.0.1');
    const host = `${g.port}-cut.example.com`;
    const a = client();
    a.send(`POST /up HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 1000000\r\n\r\n${'x'.repeat(1000)}`);
    const b = client();
    b.send(`GET /big HTTP/1.1\r\nHost: ${host}\r\n\r\n`);
    await eventually(() => b.data.length > 0 && g.connections === 2, { what: 'both exchanges started' });
    a.socket.destroy();
    b.socket.destroy();
    // No upstream stays tied to a client that went: a's (mid-body) is closed; b's is closed too,
    // or back in the pool when the relay had passed the whole answer on before b went (the
    // kernel's loopback buffers can take all 8 MiB).
    await eventually(
      () => {
        const s = relay.stats();
        return s.openClients === 0 && s.openUpstreams === s.idleUpstreams && s.idleUpstreams <= 1;
      },
      { what: 'clients and their exchanges closed' },
    );
    // Deleting the route closes what the pool kept for it.
    relay.deleteRoute('cut');
    await eventually(() => relay.stats().openUpstreams === 0, { what: 'all closed' });
    await eventually(() => g.sockets.size === 0, { what: 'guest sockets closed' });
    // A client that sends nothing is closed after the idle timeout.
    const idle = client();
    await eventually(() => idle.ended || idle.closed, { what: 'idle client closed' });
    expect(relay.stats().idleCloses).toBe(1);
  });

  it('answers a request whose client half-closed after sending it, then closes', async () => {
    await setup();
    const g = await guest();
    relay.setRoute('half', '127.0.0.1');
    const c = client();
    c.socket.end(`GET / HTTP/1.1\r\nHost: ${g.port}-half.example.com\r\n\r\n`);
    await eventually(() => c.ended, { what: 'answer then end' });
    expect(c.text()).toBe('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
    await eventually(() => relay.stats().openClients === 0, { what: 'client released' });
  });

  it('cuts both sides on broken chunked framing from a client, and on a guest that does not answer in time', async () => {
    await setup({ upstreamResponseTimeoutMs: 300 });
    const silent = await guest(() => undefined);
    relay.setRoute('bad', '127.0.0.1');
    const a = client();
    a.send(
      `POST / HTTP/1.1\r\nHost: ${silent.port}-bad.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n`,
    );
    await eventually(() => a.ended || a.closed, { what: 'client cut on bad framing' });
    expect(relay.stats().clientFramingErrors).toBe(1);
    const b = client();
    b.send(`GET / HTTP/1.1\r\nHost: ${silent.port}-bad.example.com\r\n\r\n`);
    await eventually(() => b.ended || b.closed, { what: 'client cut after the response timeout' });
    expect(b.data.length).toBe(0);
    expect(relay.stats()).toMatchObject({ upstreamErrors: 1, openClients: 0, openUpstreams: 0 });
    await eventually(() => silent.sockets.size === 0, { what: 'guest connections closed' });
  });

  it('drops the rest of a body the guest answered early, closes that upstream, and keeps the client', async () => {
    await setup();
    // Answers 413 as soon as it sees a POST head; 200 for anything else.
    const sockets = new Set<net.Socket>();
    const early = net.createServer((s) => {
      sockets.add(s);
      let seen = '';
      s.on('error', () => {});
      s.on('data', (d) => {
        seen += d.toString('latin1');
        if (seen.startsWith('POST') && seen.includes('\r\n\r\n')) {
          s.write('HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n');
          seen = '!';
        } else if (seen.startsWith('GET') && seen.includes('\r\n\r\n')) {
          s.write('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
          seen = '';
        }
      });
    });
    const port = await listen(early);
    try {
      relay.setRoute('early', '127.0.0.1');
      const c = client();
      const host = `${port}-early.example.com`;
      c.send(`POST / HTTP/1.1\r\nHost: ${host}\r\nContent-Length: 300000\r\n\r\n${'y'.repeat(1000)}`);
      await c.responses(1);
      c.send('y'.repeat(299_000));
      c.send(`GET / HTTP/1.1\r\nHost: ${host}\r\n\r\n`);
      const [first, second] = await c.responses(2);
      expect(first).toContain('413');
      expect(second).toBe('HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok');
      expect(relay.stats()).toMatchObject({ upstreamConnects: 2, requests: 2, openClients: 1 });
    } finally {
      for (const s of sockets) s.destroy();
      await new Promise((r) => early.close(r));
    }
  });

  it('carries a mixed load of many clients (bodies by length and chunked, both ways, closes) byte for byte', async () => {
    await setup({ threads: 2 });
    const up = http.createServer((req, res) => {
      const parts: Buffer[] = [];
      req.on('data', (p: Buffer) => parts.push(p));
      req.on('end', () => {
        const body = Buffer.concat(parts);
        const [, kind, arg] = req.url!.split('/');
        if (kind === 'echo') {
          // Chunked (no length), in two writes.
          res.write(body.subarray(0, body.length >> 1));
          res.end(body.subarray(body.length >> 1));
        } else if (kind === 'close') {
          res.setHeader('Connection', 'close');
          res.end(sha(body));
        } else {
          const n = Number(arg);
          res.setHeader('Content-Length', n);
          res.end(Buffer.alloc(n, n % 251));
        }
      });
    });
    const port = await listen(up);
    relay.setRoute('mixed', '127.0.0.1');
    const agent = new http.Agent({ keepAlive: true, maxSockets: 24 });
    let seed = 7;
    const rand = (n: number) => {
      seed = (seed * 1103515245 + 12345) % 2147483648;
      return seed % n;
    };
    try {
      const one = (i: number) => {
        const kind = ['echo', 'len', 'close', 'echo-len'][rand(4)]!;
        const size = rand(4) === 0 ? rand(300_000) : rand(3000);
        const body = kind === 'len' ? undefined : randomBytes(size);
        const path = kind === 'len' ? `/len/${size}` : kind === 'echo-len' ? '/echo' : `/${kind}`;
        return new Promise<void>((resolve, reject) => {
          const req = http.request(
            {
              port: front.port,
              host: '127.0.0.1',
              path,
              method: body ? 'POST' : 'GET',
              agent,
              headers: {
                host: `${port}-mixed.example.com`,
                ...(kind === 'echo-len' ? { 'content-length': body!.length } : {}),
              },
            },
            (res) => {
              const parts: Buffer[] = [];
              res.on('data', (p: Buffer) => parts.push(p));
              res.on('end', () => {
                const got = Buffer.concat(parts);
                try {
                  if (kind === 'len') expect(got.equals(Buffer.alloc(size, size % 251))).toBe(true);
                  else if (kind === 'close') expect(got.toString()).toBe(sha(body!));
                  else expect(sha(got)).toBe(sha(body!));
                  resolve();
                } catch (err) {
                  reject(new Error(`request ${i} ${kind} ${size}: ${String(err)}`));
                }
              });
            },
          );
          req.on('error', reject);
          if (body && kind === 'echo') {
            // Written in pieces: sent chunked.
            req.write(body.subarray(0, size >> 1));
            req.end(body.subarray(size >> 1));
          } else req.end(body);
        });
      };
      await Promise.all(Array.from({ length: 600 }, (_, i) => one(i)));
      const s = relay.stats();
      expect(s.requests).toBe(600);
      expect(s.handoffs + s.upstreamErrors + s.clientFramingErrors).toBe(0);
      expect(s.poolReuses).toBeGreaterThan(100);
    } finally {
      agent.destroy();
      up.closeAllConnections();
      await new Promise((r) => up.close(r));
    }
  });

  it('closes a pooled upstream connection after the idle timeout', async () => {
    await setup({ upstreamIdleTimeoutMs: 200 });
    const g = await guest();
    relay.setRoute('pool', '127.0.0.1');
    const c = client();
    c.send(`GET / HTTP/1.1\r\nHost: ${g.port}-pool.example.com\r\n\r\n`);
    await c.responses(1);
    await eventually(() => relay.stats().openUpstreams === 0 && g.sockets.size === 0, { what: 'idle upstream closed' });
    expect(relay.stats().openClients).toBe(1);
  });

  it('hands off with CONNECT_TIMEOUT when the guest port does not complete the connect in time', async () => {
    await setup({ upstreamConnectTimeoutMs: 300 });
    // A listener whose accept queue is full (backlog 0, one connection never accepted): the
    // kernel drops further SYNs, so a connect to it stays in progress.
    const libc = koffi.load('libc.so.6');
    const socket = libc.func('int socket(int domain, int type, int protocol)');
    const bind = libc.func('int bind(int fd, const uint8_t *addr, uint32_t len)');
    const listenFd = libc.func('int listen(int fd, int backlog)');
    const getsockname = libc.func('int getsockname(int fd, _Out_ uint8_t *addr, _Inout_ uint32_t *len)');
    const fd = socket(2, 1, 0) as number;
    const addr = Buffer.from([2, 0, 0, 0, 127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    expect(bind(fd, addr, 16)).toBe(0);
    expect(listenFd(fd, 0)).toBe(0);
    const len = new Uint32Array([16]);
    getsockname(fd, addr, len);
    const port = addr.readUInt16BE(2);
    const filler = net.connect({ port, host: '127.0.0.1' });
    filler.on('error', () => {});
    try {
      await new Promise((r) => filler.once('connect', r));
      relay.setRoute('slow', '127.0.0.1');
      const c = client();
      const req = `GET / HTTP/1.1\r\nHost: ${port}-slow.example.com\r\n\r\n`;
      c.send(req);
      await eventually(() => front.handoffs.length === 1, { what: 'handoff after the connect timeout' });
      expect(front.handoffs[0]).toMatchObject({ reason: 'CONNECT_TIMEOUT' });
      expect(front.handoffs[0]!.bytes.toString('latin1')).toBe(req);
      expect(relay.stats()).toMatchObject({ upstreamConnectFailures: 1, openUpstreams: 0 });
    } finally {
      filler.destroy();
      close(fd);
    }
  });

  it('destroy closes every client, upstream and queued handoff fd it owns', async () => {
    await setup({}, false);
    const hold = await guest(() => undefined); // never answers: the exchange stays open
    const g = await guest();
    relay.setRoute('hold', '127.0.0.1');
    const c = client();
    c.send(`GET / HTTP/1.1\r\nHost: ${hold.port}-hold.example.com\r\n\r\n`);
    const d = client();
    d.send('PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n');
    const e = client();
    e.send(`GET / HTTP/1.1\r\nHost: ${g.port}-hold.example.com\r\n\r\n`);
    await e.responses(1);
    await eventually(
      () => hold.heads.length === 1 && relay.stats().handoffs === 1 && relay.stats().idleUpstreams === 1,
      { what: 'an exchange open, a handoff queued (not taken), an idle pooled upstream' },
    );
    relay.destroy();
    await eventually(() => [c, d, e].every((x) => x.ended || x.closed), { what: 'every client connection closed' });
    await eventually(() => hold.sockets.size === 0 && g.sockets.size === 0, { what: 'guest connections closed' });
    // afterEach: the process's fd count is back where it was before the relay was made.
  });
});
