import { createSocket } from 'node:dgram';
import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { BatchUdpListener } from './batch-udp-listener.js';
import { decodeMessage, encodeQuery, RrType } from './dns-codec.js';
import { DnsResponder } from './dns-responder.js';
import { loadLibc } from '#native';
import { QueryCounters } from './query-counters.js';
import { RecordTable } from './record-table.js';

const hasLibc = loadLibc() !== null;
if (!hasLibc) console.warn('batch UDP tests skipped: libc recvmmsg/sendmmsg not loadable (not LP64 Linux)');

const logger = createLogger({ service: 'dns-test', level: 'silent' });
const openFds = () => readdirSync('/proc/self/fd').length;

function setup() {
  const table = new RecordTable();
  table.set('abc', '10.11.0.3');
  const counters = new QueryCounters();
  return { counters, responder: new DnsResponder({ table, counters }) };
}

/**
 * Sends `count` queries from one client socket in waves of 50 (a bigger burst in one tick would
 * overflow the default 208 KiB socket buffers of this test process: real UDP loss, not the
 * server's) and collects the answers by id.
 */
async function ask(port: number, count: number): Promise<Map<number, string | undefined>> {
  const client = createSocket('udp4');
  const answers = new Map<number, string | undefined>();
  let waiting: (() => void) | undefined;
  client.on('message', (msg) => {
    const reply = decodeMessage(msg);
    answers.set(reply.id, reply.answers[0]?.address);
    waiting?.();
  });
  try {
    await new Promise<void>((resolve) => client.bind(0, '127.0.0.1', () => resolve()));
    for (let start = 0; start < count; start += 50) {
      const end = Math.min(count, start + 50);
      await new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error(`${answers.size}/${end} answers in 10 s`)), 10_000);
        waiting = () => {
          if (answers.size >= end) {
            clearTimeout(timer);
            resolve();
          }
        };
        for (let id = start; id < end; id++) {
          client.send(encodeQuery({ id, name: `ABC-${id}`, type: RrType.A }), port, '127.0.0.94');
        }
      });
    }
  } finally {
    client.close();
  }
  return answers;
}

describe('BatchUdpListener', () => {
  it.skipIf(!hasLibc)('answers waves of queries in batches, one answer per query', async () => {
    const { responder, counters } = setup();
    const listener = BatchUdpListener.start({ host: '127.0.0.94', port: 0, responder, counters, logger, sockets: 1 });
    try {
      const answers = await ask(listener.port, 300);
      expect(answers.size).toBe(300);
      expect([...answers.values()].every((a) => a === '10.11.0.3')).toBe(true);
      expect(counters.get('udp', 'A', 'answer')).toBe(300);
    } finally {
      await listener.close();
    }
  });

  it.skipIf(!hasLibc)('gives back its fds and its port on close, idle or busy, every time', async () => {
    const { responder, counters } = setup();
    const before = openFds();
    let port = 0;
    for (let round = 0; round < 5; round++) {
      const listener = BatchUdpListener.start({
        host: '127.0.0.94',
        port,
        responder,
        counters,
        logger,
        sockets: 2,
        receivers: 1,
      });
      port = listener.port;
      if (round % 2 === 0) expect((await ask(port, 20)).size).toBe(20);
      await listener.close();
    }
    expect(openFds()).toBe(before);
    // The port is free again: a plain socket can bind it without SO_REUSEPORT.
    const probe = createSocket('udp4');
    await new Promise<void>((resolve, reject) => {
      probe.once('error', reject);
      probe.bind(port, '127.0.0.94', () => resolve());
    });
    probe.close();
  });

  it.skipIf(!hasLibc)('refuses a port another socket holds, naming the address', async () => {
    const holder = createSocket('udp4');
    await new Promise<void>((resolve) => holder.bind(0, '127.0.0.94', () => resolve()));
    const { responder, counters } = setup();
    const before = openFds();
    try {
      expect(() =>
        BatchUdpListener.start({
          host: '127.0.0.94',
          port: holder.address().port,
          responder,
          counters,
          logger,
          sockets: 1,
        }),
      ).toThrow(/bind on udp 127\.0\.0\.94:\d+ failed: errno 98/);
      expect(openFds()).toBe(before);
    } finally {
      holder.close();
    }
  });
});
