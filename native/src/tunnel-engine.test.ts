import { createHash, randomBytes } from 'node:crypto';
import net from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { eventually, openFds } from '#test-kit';
import { close, dupCloexec } from './fd.js';
import { memfdCreate } from './memory.js';
import { TunnelEngine, type TunnelEnded } from './tunnel-engine.js';

const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');

/** What a peer received, and how its connection ended. */
class Peer {
  chunks: Buffer[] = [];
  ended = false;
  closed = false;
  error: NodeJS.ErrnoException | undefined;
  constructor(readonly socket: net.Socket) {
    socket.on('data', (c: Buffer) => this.chunks.push(c));
    socket.on('end', () => (this.ended = true));
    socket.on('close', () => (this.closed = true));
    socket.on('error', (err) => (this.error = err));
  }
  get received(): Buffer {
    return Buffer.concat(this.chunks);
  }
  get receivedLength(): number {
    return this.chunks.reduce((n, c) => n + c.length, 0);
  }
}

let server: net.Server;
let accepted: net.Socket[] = [];
let peers: Peer[] = [];
let engine: TunnelEngine | undefined;
let fdsBefore = 0;

beforeEach(async () => {
  fdsBefore = openFds(process.pid).length;
  accepted = [];
  peers = [];
  server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true }, (s) => accepted.push(s));
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
});

afterEach(async () => {
  engine?.destroy();
  engine = undefined;
  for (const p of peers) p.socket.destroy();
  for (const s of accepted) s.destroy();
  await new Promise<void>((r) => server.close(() => r()));
  await eventually(() => expect(openFds(process.pid).length).toBeLessThanOrEqual(fdsBefore));
});

/** A peer connected to the test server; its accepted end detached from Node as an fd for the engine. */
async function endpoint(): Promise<{ peer: Peer; fd: number }> {
  const socket = net.connect({
    port: (server.address() as net.AddressInfo).port,
    host: '127.0.0.1',
    allowHalfOpen: true,
  });
  const peer = new Peer(socket);
  peers.push(peer);
  // Tunnels are set up concurrently: find this peer's accepted end by its port.
  const mine = () => accepted.find((s) => s.remotePort === socket.localPort && socket.readyState === 'open');
  await eventually(() => mine() !== undefined, { what: 'accept' });
  const s = mine()!;
  const fd = dupCloexec((s as unknown as { _handle: { fd: number } })._handle.fd);
  s.destroy();
  return { peer, fd };
}

async function tunnel(e: TunnelEngine, first?: Buffer): Promise<{ a: Peer; b: Peer; id: number }> {
  const a = await endpoint();
  const b = await endpoint();
  return { a: a.peer, b: b.peer, id: e.adopt(a.fd, b.fd, first) };
}

function collectEvents(e: TunnelEngine): TunnelEnded[] {
  const events: TunnelEnded[] = [];
  e.onEnded((ev) => events.push(ev));
  return events;
}

describe('TunnelEngine', () => {
  for (const mode of ['splice', 'copy'] as const) {
    it(`${mode}: carries multi-MiB streams both ways at once, byte for byte, then ends 'done'`, async () => {
      engine = new TunnelEngine({ threads: 2, mode });
      const events = collectEvents(engine);
      const head = Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
      const { a, b, id } = await tunnel(engine, head);
      const up = randomBytes(12 * 1024 * 1024 + 17);
      const down = randomBytes(9 * 1024 * 1024 + 5);
      a.socket.end(up);
      b.socket.end(down);
      await eventually(() => a.ended && b.ended, { what: 'both ends' });
      expect(sha(b.received)).toBe(sha(Buffer.concat([head, up])));
      expect(sha(a.received)).toBe(sha(down));
      await eventually(() => events.length === 1, { what: 'ended event' });
      expect(events[0]).toEqual({
        id,
        bytesAtoB: head.length + up.length,
        bytesBtoA: down.length,
        reason: 'done',
        errno: 0,
      });
      await eventually(() => a.closed && b.closed, { what: 'both closed' });
      expect(a.error).toBeUndefined();
      expect(b.error).toBeUndefined();
      expect(engine.stats()).toMatchObject({ adopted: 1, open: 0, done: 1, bytesAtoB: head.length + up.length });
    });
  }

  it('many tunnels on two threads at once', async () => {
    engine = new TunnelEngine({ threads: 2 });
    const events = collectEvents(engine);
    const ts = await Promise.all(Array.from({ length: 12 }, () => tunnel(engine!)));
    const data = ts.map(() => [randomBytes(300_000), randomBytes(200_000)] as const);
    ts.forEach((t, i) => {
      t.a.socket.end(data[i]![0]);
      t.b.socket.end(data[i]![1]);
    });
    await eventually(() => events.length === ts.length && ts.every((t) => t.a.ended && t.b.ended), {
      what: 'all ended',
    });
    ts.forEach((t, i) => {
      expect(t.b.received.equals(data[i]![0])).toBe(true);
      expect(t.a.received.equals(data[i]![1])).toBe(true);
    });
    expect(new Set(events.map((e) => e.reason))).toEqual(new Set(['done']));
  });

  for (const first of ['a', 'b'] as const) {
    it(`a FIN from ${first} reaches the other side while the other direction keeps flowing`, async () => {
      engine = new TunnelEngine({ threads: 1 });
      const events = collectEvents(engine);
      const t = await tunnel(engine);
      const [closer, other] = first === 'a' ? [t.a, t.b] : [t.b, t.a];
      closer.socket.end(Buffer.from('last words'));
      await eventually(() => other.ended, { what: 'FIN passed on' });
      expect(other.received.toString()).toBe('last words');
      // The half-open connection still carries the other way.
      const late = randomBytes(3 * 1024 * 1024);
      other.socket.write(late);
      await eventually(() => closer.receivedLength === late.length, { what: 'late bytes' });
      expect(closer.received.equals(late)).toBe(true);
      expect(events).toEqual([]);
      other.socket.end();
      await eventually(() => events.length === 1 && closer.ended, { what: 'done' });
      expect(events[0]!.reason).toBe('done');
    });
  }

  it('holds bytes back while the reader pauses (the writer backs up), then delivers all of them', async () => {
    engine = new TunnelEngine({ threads: 1 });
    const { a, b } = await tunnel(engine);
    b.socket.pause();
    const data = randomBytes(48 * 1024 * 1024);
    a.socket.write(data);
    // Wait until nothing moves any more: the engine stops reading once B takes nothing.
    let last = -1;
    await eventually(
      () => {
        const now = a.socket.writableLength;
        const still = now === last;
        last = now;
        return still;
      },
      { what: 'writer stalled' },
    );
    expect(a.socket.writableLength).toBeGreaterThan(0);
    expect(b.receivedLength).toBe(0);
    b.socket.resume();
    await eventually(() => b.receivedLength === data.length, { what: 'all bytes after resume' });
    expect(b.received.equals(data)).toBe(true);
  });

  it('close(id) resets both peers and reports "closed"', async () => {
    engine = new TunnelEngine({ threads: 2 });
    const events = collectEvents(engine);
    const { a, b, id } = await tunnel(engine);
    a.socket.write('hello');
    await eventually(() => b.receivedLength === 5, { what: 'first bytes' });
    engine.close(id);
    await eventually(() => a.closed && b.closed, { what: 'both peers closed' });
    expect(a.error?.code).toBe('ECONNRESET');
    expect(b.error?.code).toBe('ECONNRESET');
    await eventually(() => events.length === 1, { what: 'event' });
    expect(events[0]).toMatchObject({ id, reason: 'closed', bytesAtoB: 5, bytesBtoA: 0 });
    engine.close(id); // ended already: ignored
    expect(engine.stats()).toMatchObject({ open: 0, closed: 1 });
  });

  it('a peer reset is passed on as a reset to the other peer', async () => {
    engine = new TunnelEngine({ threads: 1 });
    const events = collectEvents(engine);
    const { a, b } = await tunnel(engine);
    a.socket.write('x');
    await eventually(() => b.receivedLength === 1, { what: 'byte' });
    a.socket.resetAndDestroy();
    await eventually(() => b.closed, { what: 'b closed' });
    expect(b.error?.code).toBe('ECONNRESET');
    await eventually(() => events.length === 1, { what: 'event' });
    expect(events[0]!.reason).toBe('reset');
  });

  it('a peer that resets after its FIN is noticed at once (the other peer is reset, not left half-open)', async () => {
    engine = new TunnelEngine({ threads: 1 });
    const events = collectEvents(engine);
    const { a, b } = await tunnel(engine);
    a.socket.end();
    await eventually(() => b.ended, { what: 'FIN passed on' });
    a.socket.resetAndDestroy();
    await eventually(() => events.length === 1, { what: 'event' });
    expect(events[0]!.reason).toBe('reset');
    // b has read its FIN and reads no more: it learns of the reset when it next writes.
    b.socket.write('anyone there?');
    await eventually(() => b.closed, { what: 'b closed' });
    expect(b.error?.code).toMatch(/^(ECONNRESET|EPIPE)$/);
  });

  it('destroy() closes every socket and pipe it owns (open tunnels reset), no fd left', async () => {
    const before = openFds(process.pid).length;
    engine = new TunnelEngine({ threads: 3 });
    const ts = await Promise.all(Array.from({ length: 5 }, () => tunnel(engine!)));
    ts[0]!.a.socket.write(randomBytes(100_000));
    await eventually(() => ts[0]!.b.receivedLength === 100_000, { what: 'bytes' });
    expect(engine.stats().open).toBe(5);
    engine.destroy();
    engine = undefined;
    await eventually(() => ts.every((t) => t.a.closed && t.b.closed), { what: 'peers closed' });
    for (const t of ts) expect(t.a.error?.code).toBe('ECONNRESET');
    for (const p of peers) p.socket.destroy();
    for (const s of accepted) s.destroy();
    await eventually(() => expect(openFds(process.pid).length).toBeLessThanOrEqual(before));
  });

  it('refuses bad input with a clear error and takes no fd', async () => {
    expect(() => new TunnelEngine({ threads: 0 })).toThrow(/EINVAL/);
    expect(() => new TunnelEngine({ threads: 1, pipeBytes: 10 })).toThrow(/EINVAL/);
    engine = new TunnelEngine({ threads: 1 });
    const { fd } = await endpoint();
    const notSocket = memfdCreate('not-a-socket');
    expect(() => engine!.adopt(fd, notSocket)).toThrow(/ENOTSOCK/);
    expect(() => engine!.adopt(fd, fd)).toThrow(/EBADF/);
    // Neither fd was taken: still ours to close.
    close(notSocket);
    close(fd);
    engine.destroy();
    expect(() => engine!.adopt(1, 2)).toThrow(/after destroy/);
  });
});
