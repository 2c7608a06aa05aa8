import { existsSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { DnsClient } from '#proto/sbx/dns';
import { eventually, openFds, steadyFdCount } from '#test-kit';
import { decodeMessage, encodeQuery, frameTcp, Rcode, RrType, type DecodedMessage } from '../src/dns-codec.js';
import { dig } from './dig.js';
import { startDnsProcess, type DnsProcess } from './dns-process.js';

// The service runs as `./sbx dns serve` and is reached only through its sockets: UDP and TCP
// with the real dig, the control socket with the generated gRPC client, metrics over HTTP.

let dns: DnsProcess;
let client: DnsClient;

beforeAll(async () => {
  dns = await startDnsProcess('127.0.0.91', [
    '--zone',
    'sbx.test',
    '--record',
    'i1static=10.11.0.9',
    '--tcp-idle-timeout-ms',
    '1500',
    '--tcp-max-connections',
    '64',
  ]);
  client = dial(DnsClient, dns.controlSocket);
  await unary(client, client.set, { name: 'isbx1', ip: '10.11.0.2' });
});

afterAll(async () => {
  client?.close();
  if (dns) expect(await dns.stop()).toBe(0);
});

describe('answers over UDP and TCP, with and without EDNS', () => {
  const transports = [
    ['udp', []],
    ['tcp', ['+tcp']],
  ] as const;
  const ednsModes = [
    ['no EDNS', ['+noedns']],
    ['EDNS 0', ['+edns=0']],
  ] as const;

  for (const [transport, tArgs] of transports) {
    for (const [mode, eArgs] of ednsModes) {
      it(`${transport}, ${mode}: A for {id}, {id}-{anything}, any case, with and without the zone`, async () => {
        for (const name of ['isbx1', 'ISBX1-49983', 'isbx1.sbx.test', 'iSbx1-8080.SBX.Test.']) {
          const res = await dig(dns, [...tArgs, ...eArgs, name, 'A']);
          expect(res.status).toBe('NOERROR');
          expect(res.flags).toContain('aa');
          expect(res.flags).toContain('qr');
          expect(res.answers).toEqual([
            { name: name.endsWith('.') ? name : `${name}.`, ttl: 0, type: 'A', data: '10.11.0.2' },
          ]);
          if (mode === 'no EDNS') {
            expect(res.edns).toBeNull();
            expect(res.counts.additional).toBe(0);
          } else {
            expect(res.edns).toEqual({ version: 0, flags: '', udp: 1232 });
          }
        }
      });

      it(`${transport}, ${mode}: NXDOMAIN with the question echoed; empty NOERROR for AAAA and TXT`, async () => {
        const nx = await dig(dns, [...tArgs, ...eArgs, 'nobody-1.sbx.test', 'A']);
        expect(nx.status).toBe('NXDOMAIN');
        expect(nx.counts.query).toBe(1);
        expect(nx.question).toEqual(['nobody-1.sbx.test. IN A']);
        expect(nx.answers).toEqual([]);
        for (const type of ['AAAA', 'TXT']) {
          const res = await dig(dns, [...tArgs, ...eArgs, 'isbx1-80', type]);
          expect(res.status).toBe('NOERROR');
          expect(res.counts.answer).toBe(0);
          expect(res.question).toEqual([`isbx1-80. IN ${type}`]);
        }
      });
    }

    it(`${transport}: EDNS version 1 gets BADVERS with an OPT record of version 0`, async () => {
      const res = await dig(dns, [...tArgs, '+edns=1', '+noednsnegotiation', 'isbx1', 'A']);
      expect(res.status).toBe('BADVERS');
      expect(res.edns?.version).toBe(0);
      expect(res.answers).toEqual([]);
    });
  }

  it('names outside the zone or deeper than one label are NXDOMAIN', async () => {
    for (const name of ['isbx1.other.test', 'x.isbx1.sbx.test', 'sbx.test']) {
      expect((await dig(dns, [name, 'A'])).status).toBe('NXDOMAIN');
    }
  });

  it('serves records given with --record', async () => {
    expect((await dig(dns, ['I1STATIC-1.sbx.test', 'A'])).answers[0]?.data).toBe('10.11.0.9');
  });

  it('echoes the DO bit and keeps RD', async () => {
    const res = await dig(dns, ['+dnssec', '+rec', 'isbx1', 'A']);
    expect(res.edns?.flags).toBe('do');
    expect(res.flags).toContain('rd');
    expect(res.flags).not.toContain('ra');
  });

  it('dig +opcode=status: NOTIMP, with the OPT record echoed', async () => {
    const res = await dig(dns, ['+opcode=status', 'isbx1', 'A']);
    expect(res.status).toBe('NOTIMP');
    expect(res.edns?.version).toBe(0);
    expect(res.raw).not.toMatch(/WARNING: EDNS query returned status NOTIMP/);
  });

  it('answers other opcodes with NOTIMP and a second question with FORMERR', async () => {
    const notify = await udpQuery(encodeQuery({ id: 77, name: 'isbx1', type: RrType.A, opcode: 4 }));
    expect(notify).toMatchObject({ id: 77, qr: true, opcode: 4, rcode: Rcode.NOTIMP });
    const two = encodeQuery({ id: 78, name: 'isbx1', type: RrType.A });
    two[5] = 2;
    expect(await udpQuery(two)).toMatchObject({ id: 78, rcode: Rcode.FORMERR });
  });
});

describe('control socket', () => {
  it('set, list, remove-if-still-this-ip', async () => {
    await unary(client, client.set, { name: 'Ictl', ip: '10.11.0.50' });
    expect((await dig(dns, ['ictl-1', 'A'])).answers[0]?.data).toBe('10.11.0.50');
    // The name moves to a new sandbox's IP; the old sandbox's late remove must not take it away.
    await unary(client, client.set, { name: 'ictl', ip: '10.11.0.51' });
    expect(await unary(client, client.remove, { name: 'ictl', ip: '10.11.0.50' })).toEqual({ removed: false });
    expect((await dig(dns, ['ictl', 'A'])).answers[0]?.data).toBe('10.11.0.51');
    expect((await dig(dns, ['+tcp', 'ictl', 'A'])).answers[0]?.data).toBe('10.11.0.51');
    const listed = await unary(client, client.list, {});
    expect(listed.records).toContainEqual({ name: 'ictl', ip: '10.11.0.51' });
    expect(listed.records).toContainEqual({ name: 'i1static', ip: '10.11.0.9' });
    expect(await unary(client, client.remove, { name: 'ICTL', ip: '10.11.0.51' })).toEqual({ removed: true });
    expect((await dig(dns, ['ictl', 'A'])).status).toBe('NXDOMAIN');
    expect((await unary(client, client.list, {})).records).not.toContainEqual({ name: 'ictl', ip: '10.11.0.51' });
  });

  it('refuses a bad record with INVALID_ARGUMENT naming the problem, and keeps serving', async () => {
    await expect(unary(client, client.set, { name: 'a.b', ip: '10.0.0.1' })).rejects.toMatchObject({
      code: 3,
      details: expect.stringMatching(/one DNS label/),
    });
    await expect(unary(client, client.set, { name: 'ok', ip: 'fe80::1' })).rejects.toMatchObject({ code: 3 });
    expect((await dig(dns, ['isbx1', 'A'])).answers[0]?.data).toBe('10.11.0.2');
  });
});

describe('TCP connections', () => {
  it('answers several pipelined queries on one connection, in order, split across writes', async () => {
    const socket = await tcpConnect();
    try {
      const names = ['isbx1', 'nobody', 'ISBX1-2.sbx.test'];
      const bytes = Buffer.concat(names.map((name, i) => frameTcp(encodeQuery({ id: 100 + i, name, type: RrType.A }))));
      // One byte, then the rest: framing must not depend on how TCP cuts the stream.
      socket.write(bytes.subarray(0, 1));
      await new Promise((r) => setTimeout(r, 20));
      socket.write(bytes.subarray(1));
      const replies = await readTcpReplies(socket, names.length);
      expect(replies.map((r) => [r.id, r.rcode, r.answers[0]?.address])).toEqual([
        [100, Rcode.NOERROR, '10.11.0.2'],
        [101, Rcode.NXDOMAIN, undefined],
        [102, Rcode.NOERROR, '10.11.0.2'],
      ]);
    } finally {
      socket.destroy();
    }
  });

  it('closes an idle connection (idle timeout 1.5 s here)', async () => {
    const socket = await tcpConnect();
    const closed = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(() => resolve(false), 15_000);
      socket.once('close', () => {
        clearTimeout(timer);
        resolve(true);
      });
    });
    expect(closed).toBe(true);
  });

  it('refuses connections past --tcp-max-connections (64 here) and serves again once they close', async () => {
    const sockets = await Promise.all(Array.from({ length: 70 }, () => tcpConnect()));
    try {
      const outcomes = await Promise.all(
        sockets.map(async (s, i) => {
          const closed = new Promise<'closed'>((resolve) => s.once('close', () => resolve('closed')));
          s.on('error', () => undefined);
          s.write(frameTcp(encodeQuery({ id: i, name: 'isbx1', type: RrType.A })));
          const answered = readTcpReplies(s, 1).then(
            () => 'answered' as const,
            () => 'closed' as const,
          );
          return Promise.race([answered, closed]);
        }),
      );
      const answered = outcomes.filter((o) => o === 'answered').length;
      expect(answered).toBeGreaterThan(0);
      expect(answered).toBeLessThanOrEqual(64);
      expect(outcomes.filter((o) => o === 'closed').length).toBeGreaterThanOrEqual(6);
    } finally {
      for (const s of sockets) s.destroy();
    }
    await eventually(
      async () => {
        const s = await tcpConnect();
        s.on('error', () => undefined);
        s.write(frameTcp(encodeQuery({ id: 1, name: 'isbx1', type: RrType.A })));
        return readTcpReplies(s, 1).finally(() => s.destroy());
      },
      { intervalMs: 100, what: 'an answer once the connections closed' },
    );
  });

  it('leaves no file descriptor behind after many connections', async () => {
    const fds = () => openFds(dns.pid).length;
    const before = await steadyFdCount(dns.pid);
    for (let round = 0; round < 5; round++) {
      const sockets = await Promise.all(Array.from({ length: 20 }, () => tcpConnect()));
      await Promise.all(
        sockets.map(async (s, i) => {
          s.write(frameTcp(encodeQuery({ id: i, name: 'isbx1', type: RrType.A })));
          await readTcpReplies(s, 1);
          s.destroy();
        }),
      );
    }
    await eventually(() => expect(fds()).toBeLessThanOrEqual(before));
  });
});

describe('metrics', () => {
  it('counts queries by transport, type and result', async () => {
    await dig(dns, ['isbx1', 'A']);
    const text = await (await fetch(`http://127.0.0.1:${dns.metricsPort}/metrics`)).text();
    const value = (labels: string) =>
      Number(new RegExp(`sbx_dns_queries_total\\{${labels}[^}]*\\} (\\d+)`).exec(text)?.[1] ?? 0);
    expect(value('transport="udp",qtype="A",result="answer"')).toBeGreaterThan(0);
    expect(value('transport="tcp",qtype="A",result="answer"')).toBeGreaterThan(0);
    expect(value('transport="udp",qtype="A",result="nxdomain"')).toBeGreaterThan(0);
    expect(value('transport="udp",qtype="AAAA",result="nodata"')).toBeGreaterThan(0);
    expect(value('transport="udp",qtype="A",result="badvers"')).toBeGreaterThan(0);
    expect(value('transport="udp",qtype="none",result="notimp"')).toBeGreaterThan(0);
  });
});

describe('other engines and shutdown', () => {
  for (const [label, args] of [
    ['dgram engine', ['--udp-engine', 'dgram']],
    ['two SO_REUSEPORT sockets', ['--udp-sockets', '2']],
    ['two receives in flight', ['--udp-receivers', '2']],
  ] as const) {
    it(`${label}: same answers, clean SIGTERM`, async () => {
      const other = await startDnsProcess('127.0.0.92', [...args, '--record', 'abc=10.1.2.3', '--metrics-port', '0']);
      try {
        for (let i = 0; i < 10; i++) {
          const res = await dig(other, [`abc-${i}`, 'A']);
          expect(res.answers).toEqual([{ name: `abc-${i}.`, ttl: 0, type: 'A', data: '10.1.2.3' }]);
        }
        expect((await dig(other, ['+tcp', 'zzz', 'A'])).status).toBe('NXDOMAIN');
      } finally {
        expect(await other.stop()).toBe(0);
      }
      expect(existsSync(other.controlSocket)).toBe(false);
      expect(other.logs.some((l) => l.includes('stopped cleanly'))).toBe(true);
    });
  }

  it('stops cleanly on SIGTERM in the middle of a UDP flood', async () => {
    const other = await startDnsProcess('127.0.0.92', ['--record', 'abc=10.1.2.3', '--metrics-port', '0']);
    const { createSocket } = await import('node:dgram');
    const flood = createSocket('udp4');
    let answers = 0;
    flood.on('message', () => answers++);
    const query = encodeQuery({ id: 1, name: 'abc', type: RrType.A });
    const timer = setInterval(() => {
      for (let i = 0; i < 100; i++) flood.send(query, other.port, other.host);
    }, 2);
    try {
      await eventually(() => expect(answers).toBeGreaterThanOrEqual(500), { timeoutMs: 20_000, intervalMs: 10 });
      expect(await other.stop()).toBe(0);
    } finally {
      clearInterval(timer);
      flood.close();
      await other.stop();
    }
    expect(other.logs.some((l) => l.includes('stopped cleanly'))).toBe(true);
  });

  it('refuses a bad flag with a message naming it', async () => {
    await expect(startDnsProcess('127.0.0.92', ['--zone', 'bad zone!'])).rejects.toThrow(/--zone/);
    await expect(startDnsProcess('127.0.0.92', ['--record', 'noequals'])).rejects.toThrow(/--record/);
  });
});

async function udpQuery(msg: Buffer): Promise<DecodedMessage> {
  const { createSocket } = await import('node:dgram');
  const socket = createSocket('udp4');
  try {
    return await new Promise<DecodedMessage>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no UDP reply in 5 s')), 5000);
      socket.once('message', (reply) => {
        clearTimeout(timer);
        resolve(decodeMessage(reply));
      });
      socket.send(msg, dns.port, dns.host);
    });
  } finally {
    socket.close();
  }
}

function tcpConnect(): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const socket = connect({ host: dns.host, port: dns.port }, () => resolve(socket));
    socket.once('error', reject);
  });
}

function readTcpReplies(socket: Socket, count: number): Promise<DecodedMessage[]> {
  return new Promise((resolve, reject) => {
    let buffered = Buffer.alloc(0);
    const replies: DecodedMessage[] = [];
    const timer = setTimeout(() => reject(new Error(`only ${replies.length}/${count} TCP replies in 10 s`)), 10_000);
    socket.once('close', () => {
      clearTimeout(timer);
      reject(new Error(`connection closed after ${replies.length}/${count} TCP replies`));
    });
    const onData = (chunk: Buffer) => {
      buffered = Buffer.concat([buffered, chunk]);
      while (buffered.length >= 2 && buffered.length >= 2 + buffered.readUInt16BE(0)) {
        const length = buffered.readUInt16BE(0);
        replies.push(decodeMessage(buffered.subarray(2, 2 + length)));
        buffered = buffered.subarray(2 + length);
      }
      if (replies.length >= count) {
        clearTimeout(timer);
        socket.off('data', onData);
        resolve(replies);
      }
    };
    socket.on('data', onData);
  });
}
