import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { createConnection, Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  Command,
  CommandFlag,
  decodeOptionReply,
  decodeSimpleReplyHeader,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOptionRequest,
  encodeRequestHeader,
  NbdErrno,
  Option,
  OptionReply,
} from '#nbd';
import { createLogger } from '#logging';
import { unixSocketPair } from '#native';
import { MemoryBlocks, type ReadableBlocks } from '#storage';
import { CowOverlay } from './cow-overlay.js';
import { NbdServer } from './nbd-server.js';

const run = promisify(execFile);
const logger = createLogger({ service: 'block-server-test', level: 'silent' });
const SIZE = 1024 * 1024;
let dir: string;
let memory: MemoryBlocks;
let server: NbdServer;
let socketPath: string;

beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'nbd-server-'));
  socketPath = join(dir, 'nbd.sock');
  memory = new MemoryBlocks(randomBytes(SIZE));
  server = await NbdServer.listen({
    socketPath,
    logger,
    exports: {
      find: (name) => (name === '' || name === 'disk' ? { name: 'disk', blocks: memory, blockSize: 4096 } : undefined),
      names: () => ['disk'],
    },
  });
});
afterEach(async () => {
  await server.close();
  await rm(dir, { recursive: true, force: true });
});

/** A hand-driven client for the cases real clients never produce (bad magic, out-of-range). */
class RawClient {
  private buffered = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;
  constructor(readonly socket: Socket) {
    socket.on('data', (chunk: Buffer) => {
      this.buffered = Buffer.concat([this.buffered, chunk]);
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
  }
  static async connect(path: string): Promise<RawClient> {
    const socket = createConnection(path);
    await new Promise((resolve, reject) => socket.once('connect', resolve).once('error', reject));
    return new RawClient(socket);
  }
  async take(n: number): Promise<Buffer> {
    while (this.buffered.length < n) {
      if (this.closed) throw new Error(`closed with ${this.buffered.length}/${n} bytes`);
      await new Promise<void>((resolve) => this.waiters.push(resolve));
    }
    const out = this.buffered.subarray(0, n);
    this.buffered = this.buffered.subarray(n);
    return out;
  }
  async waitClosed(): Promise<void> {
    while (!this.closed) await new Promise<void>((resolve) => this.waiters.push(resolve));
  }
  async optionReply(): Promise<{ type: number; data: Buffer }> {
    const head = await this.take(20);
    const rest = await this.take(head.readUInt32BE(16));
    const reply = decodeOptionReply(Buffer.concat([head, rest]))!;
    return { type: reply.type, data: reply.data };
  }
  /** Greeting, flags, NBD_OPT_GO for the default export. */
  async handshake(): Promise<void> {
    await this.take(18);
    this.socket.write(encodeClientFlags(3));
    this.socket.write(encodeOptionRequest(Option.GO, encodeInfoRequest('', [])));
    for (;;) {
      const reply = await this.optionReply();
      if (reply.type === OptionReply.ACK) return;
      if (reply.type !== OptionReply.INFO) throw new Error(`GO failed: ${reply.type}`);
    }
  }
  request(type: number, offset: number, length: number, cookie: bigint, flags = 0, payload?: Buffer): void {
    this.socket.write(encodeRequestHeader({ flags, type, cookie, offset, length }));
    if (payload) this.socket.write(payload);
  }
  async reply(): Promise<{ error: number; cookie: bigint }> {
    return decodeSimpleReplyHeader(await this.take(16));
  }
}

describe('NbdServer with real clients over an in-memory export', () => {
  it('nbdinfo sees the size and export name', async () => {
    const { stdout } = await run('nbdinfo', ['--json', `nbd+unix:///disk?socket=${socketPath}`]);
    const info = JSON.parse(stdout) as { exports: Array<{ 'export-name': string; 'export-size': number }> };
    expect(info.exports[0]).toMatchObject({ 'export-name': 'disk', 'export-size': SIZE });
  });

  it('nbdinfo --list lists the export', async () => {
    const { stdout } = await run('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${socketPath}`]);
    expect(
      (JSON.parse(stdout) as { exports: Array<{ 'export-name': string }> }).exports.map((e) => e['export-name']),
    ).toEqual(['disk']);
  });

  it('qemu-io writes a pattern and reads it back; the bytes land in the export', async () => {
    const uri = `nbd+unix:///disk?socket=${socketPath}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 12288 8192', '-c', 'read -P 0x5a 12288 8192', uri]);
    expect(memory.bytes().subarray(12288, 12288 + 8192)).toEqual(Buffer.alloc(8192, 0x5a));
  });
});

describe('transmission flags come from what the stack can do', () => {
  it('a copy-on-write stack offers trim, zero, FUA and multi-conn; a read-only one is read-only', async () => {
    const overlay = await CowOverlay.open({ base: new MemoryBlocks(SIZE), dir: join(dir, 'cow') });
    const readOnly = { size: SIZE, readAt: async (t: Uint8Array) => void t.fill(7), close: async () => {} };
    const exports = new Map<string, ReadableBlocks>([
      ['cow', overlay],
      ['ro', readOnly],
    ]);
    const path = join(dir, 'caps.sock');
    const caps = await NbdServer.listen({
      socketPath: path,
      logger,
      exports: {
        find: (name) => (exports.has(name) ? { name, blocks: exports.get(name)!, blockSize: 4096 } : undefined),
        names: () => [...exports.keys()],
      },
    });
    try {
      const info = async (name: string, on = path) =>
        (
          JSON.parse((await run('nbdinfo', ['--json', `nbd+unix:///${name}?socket=${on}`])).stdout) as {
            exports: Array<Record<string, unknown>>;
          }
        ).exports[0];
      expect(await info('cow')).toMatchObject({
        is_read_only: false,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_zero: true,
        can_multi_conn: true,
      });
      expect(await info('ro')).toMatchObject({ is_read_only: true, can_trim: false, can_zero: false });
      // The in-memory export says nothing of multi-conn: not offered.
      expect(await info('disk', socketPath)).toMatchObject({ can_multi_conn: false });
      const c = await RawClient.connect(path);
      await c.take(18);
      c.socket.write(encodeClientFlags(3));
      c.socket.write(encodeOptionRequest(Option.GO, encodeInfoRequest('ro', [])));
      while ((await c.optionReply()).type !== OptionReply.ACK);
      c.request(Command.WRITE, 0, 4, 1n, 0, Buffer.from('nope'));
      expect(await c.reply()).toEqual({ error: NbdErrno.EPERM, cookie: 1n });
      c.request(Command.TRIM, 0, 4096, 2n);
      expect(await c.reply()).toEqual({ error: NbdErrno.EINVAL, cookie: 2n });
      c.request(Command.READ, 0, 4, 3n);
      expect(await c.reply()).toEqual({ error: 0, cookie: 3n });
      expect(await c.take(4)).toEqual(Buffer.alloc(4, 7));
      c.socket.destroy();
    } finally {
      await caps.close();
      await overlay.close();
    }
  });
});

describe('NbdServer against bad input', () => {
  it('out-of-range and oversized requests get EINVAL/ENOSPC/EOVERFLOW and the connection stays usable', async () => {
    const c = await RawClient.connect(socketPath);
    await c.handshake();
    c.request(Command.READ, SIZE - 10, 20, 1n);
    expect(await c.reply()).toEqual({ error: NbdErrno.EINVAL, cookie: 1n });
    c.request(Command.WRITE, SIZE - 1, 2, 2n, 0, Buffer.alloc(2, 1));
    expect(await c.reply()).toEqual({ error: NbdErrno.ENOSPC, cookie: 2n });
    c.request(Command.READ, 0, 64 * 1024 * 1024, 3n);
    expect(await c.reply()).toEqual({ error: NbdErrno.EOVERFLOW, cookie: 3n });
    c.request(Command.TRIM, SIZE, 4096, 4n);
    expect(await c.reply()).toEqual({ error: NbdErrno.ENOSPC, cookie: 4n });
    c.request(99, 0, 0, 5n);
    expect(await c.reply()).toEqual({ error: NbdErrno.EINVAL, cookie: 5n });
    c.request(Command.READ, 0, 8, 6n, CommandFlag.DF);
    expect(await c.reply()).toEqual({ error: NbdErrno.EINVAL, cookie: 6n });
    // Still in step: a good write and read after all that.
    c.request(Command.WRITE, 4096, 4, 7n, CommandFlag.FUA, Buffer.from('abcd'));
    expect(await c.reply()).toEqual({ error: 0, cookie: 7n });
    c.request(Command.READ, 4096, 4, 8n);
    expect(await c.reply()).toEqual({ error: 0, cookie: 8n });
    expect((await c.take(4)).toString()).toBe('abcd');
    c.socket.destroy();
  });

  it('bad magic closes only that connection', async () => {
    const good = await RawClient.connect(socketPath);
    await good.handshake();
    const bad = await RawClient.connect(socketPath);
    await bad.handshake();
    const header = encodeRequestHeader({ flags: 0, type: Command.READ, cookie: 1n, offset: 0, length: 8 });
    header[0] = 0xde;
    bad.socket.write(header);
    await bad.waitClosed();
    good.request(Command.READ, 0, 8, 9n);
    expect(await good.reply()).toEqual({ error: 0, cookie: 9n });
    expect(await good.take(8)).toEqual(memory.bytes().subarray(0, 8));
    good.socket.destroy();
  });

  it('unknown options get NBD_REP_ERR_UNSUP, unknown exports ERR_UNKNOWN, bad option data ERR_INVALID', async () => {
    const c = await RawClient.connect(socketPath);
    await c.take(18);
    c.socket.write(encodeClientFlags(1));
    c.socket.write(encodeOptionRequest(0x4242, Buffer.from('x')));
    expect((await c.optionReply()).type).toBe(OptionReply.ERR_UNSUP);
    c.socket.write(encodeOptionRequest(Option.STRUCTURED_REPLY));
    expect((await c.optionReply()).type).toBe(OptionReply.ERR_UNSUP);
    c.socket.write(encodeOptionRequest(Option.GO, encodeInfoRequest('nope', [])));
    expect((await c.optionReply()).type).toBe(OptionReply.ERR_UNKNOWN);
    c.socket.write(encodeOptionRequest(Option.INFO, Buffer.from([0, 0, 0, 9])));
    expect((await c.optionReply()).type).toBe(OptionReply.ERR_INVALID);
    c.socket.write(encodeOptionRequest(Option.ABORT));
    expect((await c.optionReply()).type).toBe(OptionReply.ACK);
    await c.waitClosed();
  });

  it('unknown client flags close the connection before any option', async () => {
    const c = await RawClient.connect(socketPath);
    await c.take(18);
    c.socket.write(encodeClientFlags(0x80));
    await c.waitClosed();
  });

  it('a client vanishing mid-request leaves no connection behind; the server keeps serving', async () => {
    const c = await RawClient.connect(socketPath);
    await c.handshake();
    // Half a write payload, then gone.
    c.request(Command.WRITE, 0, 65536, 1n, 0, Buffer.alloc(1000));
    for (let i = 0; i < 32; i++) c.request(Command.READ, i * 4096, 4096, BigInt(i + 10));
    c.socket.destroy();
    const idle = await server.waitForIdle(5000);
    expect(idle).toBe(true);
    expect(server.connectionCount).toBe(0);
    const { stdout } = await run('nbdinfo', ['--size', `nbd+unix:///?socket=${socketPath}`]);
    expect(Number(stdout.trim())).toBe(SIZE);
  });

  it('many requests in flight are all answered, each with its own cookie', async () => {
    const c = await RawClient.connect(socketPath);
    await c.handshake();
    const n = 200;
    for (let i = 0; i < n; i++) c.request(Command.READ, (i * 4096) % SIZE, 4096, BigInt(i));
    const seen = new Set<bigint>();
    const contents = memory.bytes();
    for (let i = 0; i < n; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      const data = await c.take(4096);
      const at = (Number(r.cookie) * 4096) % SIZE;
      expect(data.equals(contents.subarray(at, at + 4096))).toBe(true);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(n);
    c.request(Command.DISC, 0, 0, 0n);
    await c.waitClosed();
  });

  it('fuzz: random and mutated byte streams never crash the server, which keeps serving', async () => {
    const valid = Buffer.concat([
      encodeClientFlags(3),
      encodeOptionRequest(Option.GO, encodeInfoRequest('disk', [0, 1, 3])),
      encodeRequestHeader({ flags: 0, type: Command.READ, cookie: 1n, offset: 4096, length: 512 }),
      encodeRequestHeader({ flags: CommandFlag.FUA, type: Command.WRITE, cookie: 2n, offset: 0, length: 8 }),
      Buffer.alloc(8, 7),
      encodeRequestHeader({ flags: 0, type: Command.TRIM, cookie: 3n, offset: 8192, length: 4096 }),
      encodeRequestHeader({ flags: 0, type: Command.FLUSH, cookie: 4n, offset: 0, length: 0 }),
    ]);
    const rng = (n: number) => Math.floor(Math.random() * n);
    for (let round = 0; round < 60; round++) {
      const bytes = round % 3 === 0 ? randomBytes(1 + rng(300)) : Buffer.from(valid);
      if (round % 3 !== 0) for (let e = 0; e < 1 + rng(4); e++) bytes[rng(bytes.length)] = rng(256);
      const c = await RawClient.connect(socketPath);
      c.socket.on('error', () => undefined);
      c.socket.write(bytes);
      await new Promise((r) => setTimeout(r, 5));
      c.socket.destroy();
    }
    expect(await server.waitForIdle(5000)).toBe(true);
    const { stdout } = await run('nbdinfo', ['--size', `nbd+unix:///?socket=${socketPath}`]);
    expect(Number(stdout.trim())).toBe(SIZE);
  });

  it('a pre-negotiated socket (the kernel side of /dev/nbdX) is served without a handshake', async () => {
    const [ours, theirs] = unixSocketPair();
    server.adopt(new Socket({ fd: ours, readable: true, writable: true }), 'disk');
    const kernel = new RawClient(new Socket({ fd: theirs, readable: true, writable: true }));
    kernel.request(Command.WRITE, 8192, 4, 1n, 0, Buffer.from('kern'));
    expect(await kernel.reply()).toEqual({ error: 0, cookie: 1n });
    kernel.request(Command.READ, 8192, 4, 2n);
    expect(await kernel.reply()).toEqual({ error: 0, cookie: 2n });
    expect((await kernel.take(4)).toString()).toBe('kern');
    kernel.request(Command.DISC, 0, 0, 3n);
    await kernel.waitClosed();
    expect(await server.waitForIdle(5000)).toBe(true);
  });
});
