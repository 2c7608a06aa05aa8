import { execFile, spawn } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { once } from 'node:events';
import { createConnection, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  encodeClientFlags,
  encodeInfoRequest,
  encodeOptionReply,
  encodeOptionRequest,
  Option,
  OptionReply,
} from '#nbd';
import { acceptsConnections, eventually, openFds, sbx, ServiceProcess } from '#test-kit';

const run = promisify(execFile);
const PY = '/usr/bin/python3'; // Debian's python3-libnbd lives in the system interpreter
const CLIENT = join(import.meta.dirname, 'nbd-client.py');
const SIZE = 32 * 1024 * 1024;
const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

let dir: string;
let baseImage: string;
let baseBytes: Buffer;
let baseSum: string;
const servers: ServiceProcess[] = [];

/** `./sbx block-server serve` exporting the base image on `socket`; resolves once it accepts clients. */
async function startServer(socket: string, flags: string[]): Promise<ServiceProcess> {
  const server = await ServiceProcess.start({
    args: ['block-server', 'serve', '--base', baseImage, '--socket', socket, ...flags],
    ready: acceptsConnections(socket),
  });
  servers.push(server);
  return server;
}

const withOverlay = (overlay: string) => ['--overlay', overlay, '--export-name', 'rootfs', '--log-level', 'warn'];

/** A raw client past option haggling: resolves once the server acknowledged NBD_OPT_GO. */
async function transmitting(socket: string, exportName: string): Promise<Socket> {
  const client = createConnection(socket);
  const received: Buffer[] = [];
  client.on('data', (d: Buffer) => received.push(d)); // consume replies, or 'close' waits for them to be read
  await once(client, 'connect');
  client.write(encodeClientFlags(3));
  client.write(encodeOptionRequest(Option.GO, encodeInfoRequest(exportName, [])));
  const ack = encodeOptionReply(Option.GO, OptionReply.ACK);
  await eventually(() => Buffer.concat(received).includes(ack), { what: 'the GO acknowledgement' });
  return client;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'block-standalone-'));
  baseImage = join(dir, 'base.img');
  baseBytes = randomBytes(SIZE);
  await writeFile(baseImage, baseBytes);
  baseSum = sha256(baseBytes);
});

afterAll(async () => {
  await Promise.all(servers.map((s) => s.stop('SIGKILL')));
  await rm(dir, { recursive: true, force: true });
});

describe('standalone export with real NBD clients', () => {
  let socket: string;
  let uri: string;
  let server: ServiceProcess;
  const model = Buffer.alloc(0);
  let expected: Buffer = model;

  beforeAll(async () => {
    socket = join(dir, 'a.sock');
    uri = `nbd+unix:///rootfs?socket=${socket}`;
    server = await startServer(socket, withOverlay(join(dir, 'overlay-a')));
    expected = Buffer.from(baseBytes);
  });

  it('nbdinfo sees the size and the export name', async () => {
    const { stdout } = await run('nbdinfo', ['--json', uri]);
    const info = JSON.parse(stdout) as { exports: Array<Record<string, unknown>> };
    expect(info.exports[0]).toMatchObject({
      'export-name': 'rootfs',
      'export-size': SIZE,
      can_flush: true,
      can_trim: true,
    });
  });

  it('qemu-io patterns at scattered offsets read back; nbdcopy equals the base with the writes; base unchanged', async () => {
    const writes: Array<[number, number, number]> = [
      [0, 4000, 0x11],
      [4095, 3, 0x22], // straddles two blocks, unaligned
      [1024 * 1024 + 512, 512, 0x33], // one sector inside a fresh block
      [7 * 1024 * 1024, 300 * 1024, 0x44],
      [SIZE - 4096, 4096, 0x55], // the last block
      [13 * 1024 * 1024 + 100, 70_000, 0x66],
    ];
    const qemuUri = `nbd+unix:///rootfs?socket=${socket}`;
    await run('qemu-io', ['-f', 'raw', ...writes.flatMap(([o, l, p]) => ['-c', `write -P ${p} ${o} ${l}`]), qemuUri]);
    for (const [o, l, p] of writes) expected.fill(p, o, o + l);
    // A separate client process verifies: nothing cached in the writer.
    const { stdout } = await run('qemu-io', [
      '-f',
      'raw',
      ...writes.flatMap(([o, l, p]) => ['-c', `read -P ${p} ${o} ${l}`]),
      qemuUri,
    ]);
    expect(stdout).not.toMatch(/Pattern verification failed/);
    const copy = join(dir, 'copy-a.img');
    await run('nbdcopy', [uri, copy]);
    const copied = await readFile(copy);
    expect(copied.length).toBe(SIZE);
    expect(copied.equals(expected)).toBe(true);
    expect(sha256(await readFile(baseImage))).toBe(baseSum);
  });

  it('trim and write-zeroes read back as zeros', async () => {
    const qemuUri = `nbd+unix:///rootfs?socket=${socket}`;
    await run('qemu-io', ['-f', 'raw', '-c', 'discard 2097152 65536', '-c', 'write -z 3145728 8192', qemuUri]);
    expected.fill(0, 2097152, 2097152 + 65536);
    expected.fill(0, 3145728, 3145728 + 8192);
    await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0 2097152 65536', '-c', 'read -P 0 3145728 8192', qemuUri]);
    const copy = join(dir, 'copy-b.img');
    await run('nbdcopy', [uri, copy]);
    expect((await readFile(copy)).equals(expected)).toBe(true);
  });

  it('several clients at once doing random I/O, each verified, and all of it in the final image', async () => {
    const stripes = 4;
    const results = await Promise.all(
      Array.from({ length: stripes }, (_, k) =>
        run(PY, [CLIENT, 'random-io', uri, String(1000 + k), String(k), String(stripes), '300'], {
          maxBuffer: 1 << 24,
        }),
      ),
    );
    const copy = join(dir, 'copy-c.img');
    await run('nbdcopy', [uri, copy]);
    const device = await readFile(copy);
    let checked = 0;
    for (const { stdout } of results) {
      for (const [offset, sum] of Object.entries(JSON.parse(stdout) as Record<string, string>)) {
        const at = Number(offset);
        expect(sha256(device.subarray(at, at + 4096))).toBe(sum);
        device.copy(expected, at, at, at + 4096);
        checked++;
      }
    }
    expect(checked).toBe(stripes * 300);
    expect(sha256(await readFile(baseImage))).toBe(baseSum);
  });

  it('bad magic closes only that connection; a client vanishing mid-request leaks no fd', async () => {
    const before = openFds(server.pid);
    const bad = await transmitting(socket, 'rootfs');
    bad.write(Buffer.alloc(28, 0xee)); // not a request magic
    await once(bad, 'close');

    const vanishing = await transmitting(socket, '');
    const header = Buffer.alloc(28);
    header.writeUInt32BE(0x25609513, 0);
    header.writeUInt16BE(1, 6); // WRITE
    header.writeUInt32BE(65536, 24);
    vanishing.write(Buffer.concat([header, Buffer.alloc(1000)]));
    vanishing.destroy();

    const { stdout } = await run('nbdinfo', ['--size', uri]);
    expect(Number(stdout.trim())).toBe(SIZE);
    // The server's fds settle back to what they were.
    await eventually(() => expect(openFds(server.pid).length).toBe(before.length));
  });
});

describe('kill -9 during a stream of writes', () => {
  it('every write acknowledged before a completed FLUSH is there after restart', async () => {
    const socket = join(dir, 'k.sock');
    const overlay = join(dir, 'overlay-k');
    const uri = `nbd+unix:///rootfs?socket=${socket}`;
    const first = await startServer(socket, withOverlay(overlay));

    const writer = spawn(PY, [CLIENT, 'write-stream', uri, '8'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let flushed = 0;
    await new Promise<void>((resolve, reject) => {
      writer.stdout.on('data', (d: Buffer) => {
        for (const m of d.toString().matchAll(/flushed (\d+)/g)) flushed = Number(m[1]);
        if (flushed >= 400) resolve();
      });
      writer.once('exit', (code) => reject(new Error(`writer exited ${code} after ${flushed}`)));
    });
    // Mid-stream: the writer keeps sending while the server dies.
    await first.kill();
    const lastFlushed = flushed;
    await new Promise<void>((resolve) => {
      if (writer.exitCode !== null) resolve();
      else writer.once('exit', () => resolve());
    });

    const second = await startServer(socket, withOverlay(overlay));
    const { stdout } = await run(PY, [CLIENT, 'verify-stream', uri, String(lastFlushed)]);
    expect(stdout.trim()).toBe(`verified ${lastFlushed}`);
    expect(sha256(await readFile(baseImage))).toBe(baseSum);
    await second.stop();
  });
});

describe('command line', () => {
  it('a missing or bad flag is refused with the field named, exit code 2', async () => {
    const missing = await run(sbx, ['block-server', 'serve', '--base', baseImage]).catch(
      (e: { code: number; stderr: string }) => e,
    );
    expect(missing).toMatchObject({ code: 2 });
    expect((missing as { stderr: string }).stderr).toMatch(/--socket/);
    const bad = await run(sbx, [
      'block-server',
      'serve',
      '--base',
      baseImage,
      '--socket',
      join(dir, 'x.sock'),
      '--block-size',
      '1000',
    ]).catch((e: { code: number; stderr: string }) => e);
    expect(bad).toMatchObject({ code: 2 });
    expect((bad as { stderr: string }).stderr).toMatch(/--block-size/);
    const help = await run(sbx, ['block-server', '--help']);
    expect(help.stdout).toMatch(/serve --base <image> --socket <path>/);
  });

  it('without --overlay the temporary overlay is removed at SIGTERM; a killed run leaves one the next start sweeps', async () => {
    // A pid above the kernel's pid_max: no process can have it.
    const pidMax = Number((await readFile('/proc/sys/kernel/pid_max', 'utf8')).trim());
    const orphan = join(tmpdir(), `sbx-block-overlay-${pidMax + 1}-test`);
    await mkdir(orphan, { recursive: true });
    const socket = join(dir, 't.sock');
    const server = await startServer(socket, []);
    expect(existsSync(orphan)).toBe(false);
    const own = (await readdir(tmpdir())).filter((n) => n.startsWith(`sbx-block-overlay-${server.pid}-`));
    expect(own).toHaveLength(1);
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(existsSync(join(tmpdir(), own[0]!))).toBe(false);
    expect(existsSync(socket)).toBe(false);
  });
});
