import { execFile, execFileSync } from 'node:child_process';
import { promisify } from 'node:util';
import { createServer, type Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DelayProxy } from './delay-proxy.js';

let server: Server;
let port: number;
beforeAll(async () => {
  server = createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => res.end(`${req.method} ${req.url} ${Buffer.concat(chunks).length}`));
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  port = (server.address() as AddressInfo).port;
});
afterAll(async () => {
  await new Promise<void>((r) => server.close(() => r()));
});

describe('DelayProxy', () => {
  it('passes requests and bodies through whole and in order, each held at least the delay', async () => {
    const proxy = await DelayProxy.start({ host: '127.0.0.1', port }, 30);
    const body = Buffer.alloc(3 * 1024 * 1024, 7);
    const t0 = performance.now();
    const answers = await Promise.all([
      fetch(`${proxy.endpoint}/a`).then((r) => r.text()),
      fetch(`${proxy.endpoint}/b`, { method: 'POST', body }).then((r) => r.text()),
    ]);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(30);
    expect(answers).toEqual(['GET /a 0', `POST /b ${body.length}`]);
    // Two requests seen (the 3 MiB body holds no request line), every answer byte counted.
    expect(proxy.counters.requests).toBe(2);
    expect(proxy.counters.bytesAnswered).toBeGreaterThan(answers.join('').length);
    await proxy.stop();
    await expect(fetch(`${proxy.endpoint}/c`)).rejects.toThrow();
  });

  it('passes on a body and a FIN the client sent before the delay ran out, then the whole answer', async () => {
    const proxy = await DelayProxy.start({ host: '127.0.0.1', port }, 50);
    try {
      const body = Buffer.alloc(16 * 1024 * 1024, 3);
      const answer = await new Promise<string>((resolve, reject) => {
        const socket = connect(Number(new URL(proxy.endpoint).port), '127.0.0.1');
        const chunks: Buffer[] = [];
        socket.on('data', (c: Buffer) => chunks.push(c));
        socket.on('error', reject);
        socket.on('close', () => resolve(Buffer.concat(chunks).toString('latin1')));
        // The request, its body and the client's FIN all leave before the 50 ms delay is over.
        socket.write(`PUT /up HTTP/1.1\r\nHost: x\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n`);
        socket.end(body);
      });
      expect(answer).toMatch(/^HTTP\/1\.1 200/);
      expect(answer.endsWith(`PUT /up ${body.length}`)).toBe(true);
    } finally {
      await proxy.stop();
    }
  });

  it('listens inside a network namespace given, still reaching its target from here', async () => {
    const ns = `dp${process.pid % 100000}`;
    execFileSync('ip', ['netns', 'add', ns]);
    try {
      execFileSync('ip', ['-n', ns, 'link', 'set', 'lo', 'up']);
      const proxy = await DelayProxy.start({ host: '127.0.0.1', port }, 0, { netns: `/run/netns/${ns}` });
      try {
        // Not execFileSync: the proxy relays on this process's event loop.
        const { stdout } = await promisify(execFile)('ip', ['netns', 'exec', ns, 'curl', '-s', `${proxy.endpoint}/x`]);
        expect(stdout).toBe('GET /x 0');
        expect(proxy.counters.requests).toBe(1);
        // Not on this namespace's loopback.
        await expect(fetch(`${proxy.endpoint}/y`)).rejects.toThrow();
      } finally {
        await proxy.stop();
      }
    } finally {
      execFileSync('ip', ['netns', 'del', ns]);
    }
  });

  it('refuses a negative delay', async () => {
    await expect(DelayProxy.start({ host: '127.0.0.1', port }, -1)).rejects.toThrow(RangeError);
  });
});
