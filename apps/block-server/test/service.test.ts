import { execFile, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { BlockServerClient } from '#proto/sbx/block';
import {
  LayeredFile,
  baseMappings,
  mergeMappings,
  newBuildId,
  validateMappings,
  type BuildMapping,
  type ReadableBlocks,
} from '#storage';
import { acceptsConnections, eventually, freeTcpPort, grpcServing, openFds, ServiceProcess } from '#test-kit';

const run = promisify(execFile);

/**
 * The server's fds that belong to one device: files under its directory (overlay, journal,
 * state) and sockets bound to its NBD path (the listener and each accepted client, which
 * /proc/net/unix lists under the listener's path). Other fds the service opens meanwhile
 * (gRPC, metrics scrapes, logs) are not counted.
 */
function deviceFds(pid: number, deviceDir: string, socketPath: string): string[] {
  const inodes = new Set(
    readFileSync('/proc/net/unix', 'utf8')
      .split('\n')
      .map((line) => line.trim().split(/\s+/))
      .filter((cols) => cols[7] === socketPath)
      .map((cols) => `socket:[${cols[6]}]`),
  );
  return openFds(pid).filter((t) => t.startsWith(`${deviceDir}/`) || inodes.has(t));
}
const PY = '/usr/bin/python3';
const CLIENT = join(import.meta.dirname, 'nbd-client.py');
const SIZE = 16 * 1024 * 1024;
const BS = 4096;

let dir: string;
let bucket: string;
let dataDir: string;
let control: string;
let baseId: string;
let baseBytes: Buffer;
let server: ServiceProcess;
let client: BlockServerClient;
let metricsPort: number;
const started: ServiceProcess[] = [];

async function startService(): Promise<void> {
  server = await ServiceProcess.start({
    args: [
      'block-server',
      'serve',
      '--control-socket',
      control,
      '--data-dir',
      dataDir,
      '--bucket',
      bucket,
      '--metrics-port',
      String(metricsPort),
      '--release-timeout-ms',
      '1500',
      '--log-level',
      'warn',
    ],
    ready: grpcServing(control),
    readyTimeoutMs: 60_000,
  });
  started.push(server);
}

/** The device as the orchestrator will read it: the diff's mappings merged over the base build's. */
async function readMerged(newId: string, diff: Buffer, mappings: BuildMapping[]): Promise<Buffer> {
  const merged = mergeMappings(baseMappings(SIZE, baseId), mappings);
  validateMappings(merged, SIZE, BS);
  const files = new Map<string, ReadableBlocks>();
  for (const [id, bytes] of [
    [baseId, baseBytes],
    [newId, diff],
  ] as const) {
    files.set(id, {
      size: bytes.length,
      readAt: async (t, o) => void t.set(bytes.subarray(o, o + t.length)),
      close: async () => {},
    });
  }
  const layered = new LayeredFile({
    header: {
      metadata: { version: 3, blockSize: BS, size: SIZE, generation: 1, buildId: newId, baseBuildId: baseId },
      mappings: merged,
    },
    resolve: (id) => files.get(id)!,
  });
  const readBack = Buffer.alloc(SIZE);
  await layered.readAt(readBack, 0);
  return readBack;
}

function grpcCode(err: unknown): number | undefined {
  return (err as ServiceError).code;
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'block-service-'));
  bucket = join(dir, 'bucket');
  dataDir = join(dir, 'data');
  control = join(dir, 'block-server.sock');
  baseId = newBuildId();
  baseBytes = randomBytes(SIZE);
  metricsPort = await freeTcpPort();
  await mkdir(join(bucket, baseId), { recursive: true });
  await writeFile(join(bucket, baseId, 'rootfs.ext4'), baseBytes);
  await startService();
  client = dial(BlockServerClient, control);
});

afterAll(async () => {
  client?.close();
  await Promise.all(started.map((s) => s.stop('SIGKILL')));
  await rm(dir, { recursive: true, force: true });
});

describe('block-server service over its control socket', () => {
  it('open, write through NBD, stats, export: the diff merged over the base header reads back as the device', async () => {
    const device = await unary(client, client.open, { sandboxId: 'sbx-export', buildId: baseId, attachKernel: false });
    expect(device).toMatchObject({
      sandboxId: 'sbx-export',
      buildId: baseId,
      size: SIZE,
      blockSize: BS,
      devicePath: '',
    });
    const uri = `nbd+unix:///${device.exportName}?socket=${device.socketPath}`;
    const { stdout: size } = await run('nbdinfo', ['--size', uri]);
    expect(Number(size.trim())).toBe(SIZE);

    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      'write -P 0x41 8192 12288',
      '-c',
      'write -P 0x42 5000000 7000',
      '-c',
      'write -P 0 1048576 4096', // written, but zeros: exported as a nil mapping
      '-c',
      'discard 4194304 16384',
      '-c',
      'flush',
      uri,
    ]);
    const stats = await unary(client, client.stats, { sandboxId: 'sbx-export' });
    expect(stats.writes).toBeGreaterThanOrEqual(3);
    expect(stats.dirtyBlocks).toBeGreaterThan(0);
    expect(stats.zeroedBlocks).toBe(4);

    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/sbx_block_server_nbd_requests_total\{[^}]*command="write"[^}]*result="ok"[^}]*\} [1-9]/);
    expect(metrics).toMatch(/sbx_block_server_devices\{[^}]*\} 1/);

    const finalImage = join(dir, 'final.img');
    await run('nbdcopy', [uri, finalImage]);
    const final = await readFile(finalImage);

    const newId = newBuildId();
    const diffPath = join(bucket, newId, 'rootfs.ext4');
    const exported = await unary(client, client.export, {
      sandboxId: 'sbx-export',
      newBuildId: newId,
      diffPath,
      keepServing: false,
      parentBuildId: '',
      dedup: false,
    });
    expect(exported).toMatchObject({ blockSize: BS, size: SIZE, dirtyBlocks: 3 + 3 });
    const diff = await readFile(diffPath);
    expect(diff.length).toBe(exported.diffSize);

    expect((await readMerged(newId, diff, exported.mappings)).equals(final)).toBe(true);

    // The device is closed and its cache removed; the base build is untouched.
    expect((await unary(client, client.list, {})).devices.map((d) => d.sandboxId)).not.toContain('sbx-export');
    expect(existsSync(join(dataDir, 'devices', 'sbx-export'))).toBe(false);
    expect(existsSync(device.socketPath)).toBe(false);
    expect((await readFile(join(bucket, baseId, 'rootfs.ext4'))).equals(baseBytes)).toBe(true);
  });

  it('export with dedup: blocks a client rewrote with the bytes already there are left to the parent', async () => {
    const device = await unary(client, client.open, { sandboxId: 'sbx-dedup', buildId: baseId, attachKernel: false });
    const uri = `nbd+unix:///${device.exportName}?socket=${device.socketPath}`;
    const same = join(dir, 'same.bin');
    await writeFile(same, baseBytes.subarray(40 * BS, 48 * BS));
    await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `write -s ${same} ${40 * BS} ${8 * BS}`, // what the build holds there already
      '-c',
      `write -P 0x43 ${60 * BS} ${2 * BS}`,
      '-c',
      'flush',
      uri,
    ]);
    const final = Buffer.from(baseBytes);
    final.fill(0x43, 60 * BS, 62 * BS);
    const newId = newBuildId();
    const diffPath = join(bucket, newId, 'rootfs.ext4');
    const exported = await unary(client, client.export, {
      sandboxId: 'sbx-dedup',
      newBuildId: newId,
      diffPath,
      keepServing: false,
      parentBuildId: baseId,
      dedup: true,
    });
    expect(exported).toMatchObject({ dirtyBlocks: 2, dedupedBlocks: 8, zeroBlocks: 0, diffSize: 2 * BS });
    expect(exported.mappings.map((m) => [m.offset / BS, m.length / BS])).toEqual([[60, 2]]);
    expect((await readMerged(newId, await readFile(diffPath), exported.mappings)).equals(final)).toBe(true);
    const metrics = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
    expect(metrics).toMatch(/sbx_block_server_export_blocks_total\{[^}]*kind="deduped"[^}]*\} 8/);
  });

  it('export waits for the device to be released: a client that stays gets DeviceBusy and the device keeps serving', async () => {
    const basePath = join(bucket, baseId, 'rootfs.ext4');
    const baseFds = () => openFds(server.pid).filter((t) => t === basePath).length;
    const baseFdsBefore = baseFds();
    const device = await unary(client, client.open, { sandboxId: 'sbx-busy', buildId: baseId, attachKernel: false });
    const held = () => deviceFds(server.pid, join(dataDir, 'devices', 'sbx-busy'), device.socketPath);
    const uri = `nbd+unix:///?socket=${device.socketPath}`;
    // nbdsh keeps its connection open while it sleeps.
    const holder = spawn(
      PY,
      ['-c', `import nbd,time\nh=nbd.NBD()\nh.connect_uri("${uri}")\nprint("up",flush=True)\ntime.sleep(30)`],
      {
        stdio: ['ignore', 'pipe', 'inherit'],
      },
    );
    try {
      await new Promise<void>((resolve) => holder.stdout.once('data', () => resolve()));
      const err = await unary(client, client.export, {
        sandboxId: 'sbx-busy',
        newBuildId: newBuildId(),
        diffPath: join(dir, 'busy.diff'),
        keepServing: false,
        parentBuildId: '',
        dedup: false,
      }).catch((e: unknown) => e);
      expect(grpcCode(err)).toBe(status.FAILED_PRECONDITION);
      expect((err as ServiceError).details).toMatch(/export device: .*still has 1 client/);
      // Overlay files, the listening socket and the client's: what closing must give back.
      expect(held().filter((t) => t.startsWith('socket:')).length).toBeGreaterThanOrEqual(2);
      expect(held().some((t) => t.endsWith('overlay.img'))).toBe(true);
      const { stdout } = await run('nbdinfo', ['--size', uri]);
      expect(Number(stdout.trim())).toBe(SIZE);
    } finally {
      holder.kill('SIGKILL');
    }
    await unary(client, client.closeDevice, { sandboxId: 'sbx-busy' });
    expect(existsSync(join(dataDir, 'devices', 'sbx-busy'))).toBe(false);
    expect(existsSync(device.socketPath)).toBe(false);
    // Overlay, base file, listening and client sockets: all given back.
    await eventually(() => expect(held()).toEqual([]));
    expect(baseFds()).toBeLessThanOrEqual(baseFdsBefore);
  });

  it('bad requests get clear status codes and the service keeps serving', async () => {
    const codeOf = (p: Promise<unknown>) => p.then(() => 'ok', grpcCode);
    expect(
      await codeOf(unary(client, client.open, { sandboxId: '../etc', buildId: baseId, attachKernel: false })),
    ).toBe(status.INVALID_ARGUMENT);
    expect(
      await codeOf(unary(client, client.open, { sandboxId: 'x', buildId: 'not-a-uuid', attachKernel: false })),
    ).toBe(status.INVALID_ARGUMENT);
    expect(
      await codeOf(unary(client, client.open, { sandboxId: 'x', buildId: newBuildId(), attachKernel: false })),
    ).toBe(status.NOT_FOUND);
    expect(await codeOf(unary(client, client.stats, { sandboxId: 'nope' }))).toBe(status.NOT_FOUND);
    expect(
      await codeOf(
        unary(client, client.export, {
          sandboxId: 'nope',
          newBuildId: newBuildId(),
          diffPath: '/tmp/x',
          keepServing: false,
          parentBuildId: '',
          dedup: false,
        }),
      ),
    ).toBe(status.NOT_FOUND);
    await unary(client, client.open, { sandboxId: 'sbx-dup', buildId: baseId, attachKernel: false });
    expect(
      await codeOf(unary(client, client.open, { sandboxId: 'sbx-dup', buildId: baseId, attachKernel: false })),
    ).toBe(status.ALREADY_EXISTS);
    await unary(client, client.closeDevice, { sandboxId: 'sbx-dup' });
    // A failed open leaves nothing behind.
    expect(existsSync(join(dataDir, 'devices', 'x'))).toBe(false);
  });

  it('kill -9 of the service: devices are reopened on restart with every flushed write', async () => {
    const device = await unary(client, client.open, { sandboxId: 'sbx-restart', buildId: baseId, attachKernel: false });
    const uri = `nbd+unix:///?socket=${device.socketPath}`;
    const writer = spawn(PY, [CLIENT, 'write-stream', uri, '4'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let flushed = 0;
    await new Promise<void>((resolve, reject) => {
      writer.stdout.on('data', (d: Buffer) => {
        for (const m of d.toString().matchAll(/flushed (\d+)/g)) flushed = Number(m[1]);
        if (flushed >= 200) resolve();
      });
      writer.once('exit', (code) => reject(new Error(`writer exited ${code}`)));
    });
    // A device opened just before the kill, never written or flushed (a create's first
    // milliseconds): its first files are written without fsync, which a process crash keeps.
    const fresh = await unary(client, client.open, { sandboxId: 'sbx-fresh', buildId: baseId, attachKernel: false });
    await server.kill();
    const lastFlushed = flushed;
    client.close();

    await startService();
    client = dial(BlockServerClient, control);
    const listed = (await unary(client, client.list, {})).devices;
    expect(listed.map((d) => d.sandboxId)).toContain('sbx-restart');
    expect(listed.find((d) => d.sandboxId === 'sbx-fresh')).toMatchObject({ socketPath: fresh.socketPath, size: SIZE });
    await acceptsConnections(fresh.socketPath)(server, 60_000);
    const freshImage = join(dir, 'fresh-restart.img');
    await run('nbdcopy', [`nbd+unix:///?socket=${fresh.socketPath}`, freshImage]);
    expect((await readFile(freshImage)).equals(baseBytes)).toBe(true);
    await unary(client, client.closeDevice, { sandboxId: 'sbx-fresh' });
    await acceptsConnections(device.socketPath)(server, 60_000);
    const { stdout } = await run(PY, [CLIENT, 'verify-stream', uri, String(lastFlushed)]);
    expect(stdout.trim()).toBe(`verified ${lastFlushed}`);

    // Export after the restart: the reopened device's changes are all in the diff.
    const finalImage = join(dir, 'final-restart.img');
    await run('nbdcopy', [uri, finalImage]);
    const final = await readFile(finalImage);
    const newId = newBuildId();
    const diffPath = join(bucket, newId, 'rootfs.ext4');
    const exported = await unary(client, client.export, {
      sandboxId: 'sbx-restart',
      newBuildId: newId,
      diffPath,
      keepServing: false,
      parentBuildId: '',
      dedup: false,
    });
    expect(exported.dirtyBlocks).toBeGreaterThanOrEqual(Math.min(lastFlushed, SIZE / BS));
    expect((await readMerged(newId, await readFile(diffPath), exported.mappings)).equals(final)).toBe(true);
    expect(existsSync(join(dataDir, 'devices', 'sbx-restart'))).toBe(false);
  });

  it('SIGTERM stops cleanly: control and NBD sockets removed, device state kept for the next run', async () => {
    const device = await unary(client, client.open, { sandboxId: 'sbx-term', buildId: baseId, attachKernel: false });
    client.close();
    expect(await server.stop('SIGTERM')).toBe(0);
    expect(existsSync(control)).toBe(false);
    expect(existsSync(device.socketPath)).toBe(false);
    expect(existsSync(join(dataDir, 'devices', 'sbx-term', 'device.json'))).toBe(true);
    await startService();
    client = dial(BlockServerClient, control);
    expect((await unary(client, client.list, {})).devices.map((d) => d.sandboxId)).toContain('sbx-term');
    await unary(client, client.closeDevice, { sandboxId: 'sbx-term' });
  });
});
