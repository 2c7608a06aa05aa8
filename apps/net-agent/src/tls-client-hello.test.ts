import { createServer, type AddressInfo } from 'node:net';
import { connect } from 'node:tls';
import fc from 'fast-check';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseConnectionHead } from './connection-head.js';
import { MAX_TLS_HEAD, parseClientHello } from './tls-client-hello.js';

/** The first bytes Node's TLS client sends for `servername` (a real ClientHello, TLS 1.3 style). */
function realHello(servername: string | undefined): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const server = createServer((sock) => {
      sock.once('data', (d: Buffer) => {
        resolve(d);
        sock.destroy();
        server.close();
      });
    });
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as AddressInfo;
      const client = connect({ host: '127.0.0.1', port, servername, rejectUnauthorized: false });
      client.on('error', () => undefined);
      client.on('close', () => undefined);
      setTimeout(() => client.destroy(), 2000).unref();
    });
    server.on('error', reject);
  });
}

/** A minimal hand-made ClientHello with the given extensions (type, body). */
function hello(extensions: Array<[number, Buffer]>, recordSplit?: number): Buffer {
  const exts = Buffer.concat(extensions.map(([type, body]) => Buffer.concat([u16(type), u16(body.length), body])));
  const body = Buffer.concat([
    Buffer.from([3, 3]),
    Buffer.alloc(32, 7),
    Buffer.from([0]), // session id
    u16(2),
    Buffer.from([0x13, 0x01]),
    Buffer.from([1, 0]),
    u16(exts.length),
    exts,
  ]);
  const hs = Buffer.concat([Buffer.from([1, body.length >> 16, (body.length >> 8) & 255, body.length & 255]), body]);
  const cut = recordSplit ?? hs.length;
  const record = (b: Buffer) => Buffer.concat([Buffer.from([22, 3, 1]), u16(b.length), b]);
  return cut < hs.length ? Buffer.concat([record(hs.subarray(0, cut)), record(hs.subarray(cut))]) : record(hs);
}

function u16(n: number): Buffer {
  return Buffer.from([n >> 8, n & 255]);
}

function sni(...names: string[]): [number, Buffer] {
  const list = Buffer.concat(
    names.map((n) => Buffer.concat([Buffer.from([0]), u16(n.length), Buffer.from(n, 'latin1')])),
  );
  return [0, Buffer.concat([u16(list.length), list])];
}

let withName: Buffer;
let withoutName: Buffer;

beforeAll(async () => {
  withName = await realHello('API.Example.com');
  withoutName = await realHello(undefined);
});

describe('TLS ClientHello SNI', () => {
  it("reads the server name of a real client's hello, normalized; none without one", () => {
    expect(parseClientHello(withName)).toEqual({ kind: 'name', name: 'api.example.com' });
    expect(parseClientHello(withoutName)).toEqual({ kind: 'none' });
    expect(parseConnectionHead(withName)).toEqual({ kind: 'name', name: 'api.example.com' });
  });

  it('asks for more on every prefix, and reads a hello split across records', () => {
    for (let n = 0; n < withName.length; n++) {
      expect(parseConnectionHead(withName.subarray(0, n)).kind).toBe('more');
    }
    expect(parseClientHello(hello([sni('a.com')], 20))).toEqual({ kind: 'name', name: 'a.com' });
  });

  it.each([
    ['two host names', hello([sni('a.com', 'b.com')])],
    ['the extension twice', hello([sni('a.com'), sni('b.com')])],
    ['a name that is not a host name', hello([sni('a b.com')])],
    ['an address as the name', hello([sni('1.2.3.4')])],
    ['an empty name', hello([sni('')])],
  ])('refuses %s', (_what, bytes) => {
    expect(parseClientHello(bytes).kind).toBe('invalid');
  });

  it('refuses lengths that run past their container, and non-hello handshakes', () => {
    const lying = hello([[0, Buffer.from([0, 50, 0, 0, 3, 97])]]); // list claims 50 bytes, has 4
    expect(parseClientHello(lying).kind).toBe('invalid');
    const serverHello = Buffer.from(withName);
    serverHello[5] = 2;
    expect(parseClientHello(serverHello).kind).toBe('invalid');
    expect(parseClientHello(Buffer.from([22, 3, 1, 0, 0])).kind).toBe('invalid'); // empty record
    expect(parseClientHello(Buffer.from([22, 9, 1, 0, 5])).kind).toBe('invalid'); // not TLS 1.x
  });

  it('is bounded: a hello claiming more than the bound is refused, not waited for', () => {
    const head = Buffer.from([22, 3, 1, 0x40, 0x00, 1, 0x10, 0, 0]); // hello of 1 MiB
    expect(parseClientHello(head)).toEqual({ kind: 'invalid', reason: `ClientHello of ${0x100000 + 4} bytes` });
    expect(MAX_TLS_HEAD).toBeLessThan(100_000);
  });

  it('never throws on random bytes or on a real hello with bytes changed', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 600 }), (bytes) => {
        const r = parseClientHello(Buffer.concat([Buffer.from([22, 3, 1]), Buffer.from(bytes)]));
        expect(['more', 'name', 'none', 'invalid']).toContain(r.kind);
      }),
      { numRuns: 3000 },
    );
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(withName.length - 1), fc.integer({ min: 0, max: 255 })), {
          minLength: 1,
          maxLength: 6,
        }),
        fc.nat(withName.length),
        (changes, cut) => {
          const b = Buffer.from(withName);
          for (const [at, v] of changes) b[at] = v;
          const r = parseConnectionHead(b.subarray(0, cut));
          if (r.kind === 'name') expect(r.name).toMatch(/^[a-z0-9_.-]+$/);
        },
      ),
      { numRuns: 5000 },
    );
  });
});
