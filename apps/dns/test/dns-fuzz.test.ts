import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { connect, type Socket } from 'node:net';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually, openFds, steadyFdCount } from '#test-kit';
import { decodeMessage, encodeQuery, frameTcp, Rcode, RrType } from '../src/dns-codec.js';
import { dig } from './dig.js';
import { startDnsProcess, type DnsProcess } from './dns-process.js';

// Random and mutated packets against the running server, over UDP and TCP, from fixed seeds so a
// failure replays. After each burst a valid query must still be answered; at the end the process
// must be alive, answering, and holding no more file descriptors than before.

let dns: DnsProcess;
let baselineFds = 0;
const fds = () => openFds(dns.pid).length;

beforeAll(async () => {
  dns = await startDnsProcess('127.0.0.93', ['--record', 'fuzzme=10.11.0.77', '--tcp-idle-timeout-ms', '2000']);
  baselineFds = await steadyFdCount(dns.pid);
});

afterAll(async () => {
  if (dns) expect(await dns.stop()).toBe(0);
});

const seeds = [
  encodeQuery({ id: 1, name: 'fuzzme', type: RrType.A }),
  encodeQuery({ id: 2, name: 'FUZZME-1.zone', type: RrType.AAAA, edns: { udpSize: 4096, flags: 0x8000 } }),
  encodeQuery({ id: 3, name: 'a.b.c', type: RrType.ANY, edns: { version: 3 } }),
  // A query with an answer record whose owner is compressed, and an OPT: more structure to break.
  (() => {
    const q = encodeQuery({ id: 4, name: 'fuzzme', type: RrType.A, edns: {} });
    const record = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    const out = Buffer.concat([q.subarray(0, q.length - 11), record, q.subarray(q.length - 11)]);
    out[7] = 1;
    return out;
  })(),
];

const mutatedPacket = fc
  .tuple(
    fc.constantFrom(...seeds),
    fc.array(fc.tuple(fc.nat(90), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 10 }),
    fc.nat(12),
    fc.uint8Array({ maxLength: 24 }),
  )
  .map(([seed, edits, cut, tail]) => {
    const copy = Buffer.concat([seed.subarray(0, Math.max(0, seed.length - cut)), tail]);
    for (const [at, value] of edits) if (at < copy.length) copy[at] = value;
    return copy;
  });

const handMade: Buffer[] = [
  Buffer.alloc(0),
  Buffer.from([1]),
  Buffer.alloc(12, 0xff),
  // Pointer loop in an additional record's owner name.
  Buffer.concat([encodeQuery({ id: 9, name: 'x', type: 1 }).subarray(0, 19), Buffer.from([0xc0, 19, 0, 1])]),
  // Counts far beyond the packet.
  Buffer.from([0, 9, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
  // Larger than a receive slot (dropped as cut) and near the UDP maximum.
  Buffer.concat([encodeQuery({ id: 10, name: 'fuzzme', type: 1 }), Buffer.alloc(5000)]),
  Buffer.alloc(65000, 0x41),
];

function packets(count: number, seed: number): Buffer[] {
  const arbitrary = fc.oneof(
    { weight: 2, arbitrary: fc.uint8Array({ maxLength: 700 }).map((b) => Buffer.from(b)) },
    { weight: 5, arbitrary: mutatedPacket },
  );
  return [...handMade, ...fc.sample(arbitrary, { numRuns: count, seed })];
}

function udpClient(): Promise<UdpSocket> {
  return new Promise((resolve) => {
    const socket = createSocket('udp4');
    socket.bind(0, '127.0.0.1', () => resolve(socket));
  });
}

/** Sends a valid query and waits (with retries, UDP may drop under a flood) for its answer. */
async function answeredOverUdp(socket: UdpSocket, id: number): Promise<boolean> {
  const query = encodeQuery({ id, name: 'FuzzMe-7', type: RrType.A });
  for (let attempt = 0; attempt < 5; attempt++) {
    const reply = await new Promise<Buffer | null>((resolve) => {
      const timer = setTimeout(() => done(null), 2000);
      const onMessage = (msg: Buffer) => {
        if (sameQuestion(msg, query)) done(msg);
      };
      const done = (msg: Buffer | null) => {
        clearTimeout(timer);
        socket.off('message', onMessage);
        resolve(msg);
      };
      socket.on('message', onMessage);
      socket.send(query, dns.port, dns.host);
    });
    if (reply) {
      const decoded = decodeMessage(reply);
      return decoded.rcode === Rcode.NOERROR && decoded.answers[0]?.address === '10.11.0.77';
    }
  }
  return false;
}

describe('fuzzing the running server', () => {
  it('UDP: thousands of random and mutated datagrams; every reply is a well-formed response; still answering', async () => {
    const socket = await udpClient();
    const malformedReplies: string[] = [];
    socket.on('message', (msg) => {
      try {
        if (!decodeMessage(msg).qr) malformedReplies.push(msg.toString('hex'));
      } catch (err) {
        malformedReplies.push(`${msg.toString('hex')}: ${(err as Error).message}`);
      }
    });
    try {
      const all = packets(4000, 20261123);
      for (let start = 0, round = 0; start < all.length; start += 250, round++) {
        for (const packet of all.slice(start, start + 250)) socket.send(packet, dns.port, dns.host);
        expect(await answeredOverUdp(socket, 0xf000 + round)).toBe(true);
      }
      expect(malformedReplies).toEqual([]);
      expect(dns.service.running).toBe(true);
    } finally {
      socket.close();
    }
  });

  it('TCP: mutated frames keep the connection answering; garbage and cut frames only close their own connection', async () => {
    // Mutated queries inside correct frames, followed by a valid one, on each connection.
    const frames = packets(600, 1035).filter((p) => p.length <= 65535);
    for (let c = 0; c < 6; c++) {
      const socket = await tcpConnect();
      try {
        const batch = frames.slice(c * 100, c * 100 + 100);
        const valid = encodeQuery({ id: 0xabc0 + c, name: 'fuzzme', type: RrType.A });
        socket.write(Buffer.concat([...batch.map((p) => frameTcp(p)), frameTcp(valid)]));
        const reply = await waitForTcpReply(socket, valid);
        expect(reply?.answers[0]?.address).toBe('10.11.0.77');
      } finally {
        socket.destroy();
      }
    }
    // Raw garbage streams, a frame cut short, a zero-length frame: the server must neither crash nor hang on to them.
    const garbage = fc.sample(fc.uint8Array({ minLength: 1, maxLength: 3000 }), { numRuns: 40, seed: 7 });
    await Promise.all(
      [...garbage, Uint8Array.from([0xff, 0xff, 1, 2, 3]), Uint8Array.from([0, 0])].map(async (bytes) => {
        const socket = await tcpConnect();
        socket.on('data', () => undefined);
        socket.write(bytes);
        await new Promise((r) => setTimeout(r, 20));
        socket.destroy();
      }),
    );
    const res = await dig(dns, ['+tcp', 'fuzzme-1', 'A']);
    expect(res.answers[0]?.data).toBe('10.11.0.77');
  });

  it('afterwards: alive, answering over UDP and TCP, no descriptor leaked, bad input counted', async () => {
    expect(dns.service.running).toBe(true);
    expect((await dig(dns, ['fuzzme', 'A'])).answers[0]?.data).toBe('10.11.0.77');
    expect((await dig(dns, ['+tcp', 'FUZZME', 'A'])).answers[0]?.data).toBe('10.11.0.77');
    await eventually(() => expect(fds()).toBe(baselineFds));
    const text = await (await fetch(`http://127.0.0.1:${dns.metricsPort}/metrics`)).text();
    const sum = (re: RegExp) => [...text.matchAll(re)].reduce((n, m) => n + Number(m[1]), 0);
    expect(sum(/sbx_dns_queries_total\{[^}]*result="formerr"[^}]*\} (\d+)/g)).toBeGreaterThan(100);
    expect(sum(/sbx_dns_queries_total\{[^}]*transport="udp"[^}]*result="dropped"[^}]*\} (\d+)/g)).toBeGreaterThan(0);
  });
});

function tcpConnect(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: dns.host, port: dns.port }, () => resolve(socket));
    socket.once('error', reject);
  });
}

/** A fuzzed packet may carry the same id: match the id and the question bytes. */
function sameQuestion(reply: Buffer, query: Buffer): boolean {
  return (
    reply.length >= query.length &&
    reply.readUInt16BE(0) === query.readUInt16BE(0) &&
    reply.subarray(12, query.length).equals(query.subarray(12))
  );
}

function waitForTcpReply(socket: Socket, query: Buffer): Promise<ReturnType<typeof decodeMessage> | null> {
  return new Promise((resolve) => {
    let buffered = Buffer.alloc(0);
    const timer = setTimeout(() => resolve(null), 10_000);
    socket.on('data', (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        const msg = buffered.subarray(2, 2 + buffered.readUInt16BE(0));
        buffered = buffered.subarray(2 + msg.length);
        if (sameQuestion(msg, query)) {
          clearTimeout(timer);
          resolve(decodeMessage(msg));
        }
      }
    });
  });
}
