import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { fileExists, ServiceProcess } from '#test-kit';
import { openGuestDisk, type GuestDisk } from '../src/guest-disk.js';

/*
 * A drive on an NBD socket whose server goes away and comes back (a block-server restart):
 * requests wait and are sent again on a new connection; a server that stays away past the
 * reconnect timeout, or comes back with another size, fails the drive's I/O. nbdkit's file
 * plugin is the server, so the bytes outlive each nbdkit process as the block-server's do.
 */

const hasNbdkit = spawnSync('nbdkit', ['--version']).status === 0;
if (!hasNbdkit) console.warn('NBD reconnect tests skipped: nbdkit is not installed');

const SIZE = 4 * 1024 * 1024;
let dir: string;
let socket: string;
let image: string;
let server: ServiceProcess | undefined;
let disk: GuestDisk | undefined;

async function startServer(file = image): Promise<void> {
  await rm(socket, { force: true });
  server = await ServiceProcess.start({
    name: 'nbdkit',
    launcher: ['nbdkit'],
    args: ['-f', '--exit-with-parent', '-U', socket, 'file', `file=${file}`],
    ready: fileExists(socket),
    readyTimeoutMs: 10_000,
  });
}

async function killServer(): Promise<void> {
  await server?.kill();
  server = undefined;
}

beforeEach(async () => {
  if (!hasNbdkit) return;
  dir = await mkdtemp(join(tmpdir(), 'vmm-nbd-reconnect-'));
  socket = join(dir, 'nbd.sock');
  image = join(dir, 'disk.img');
  await writeFile(image, Buffer.alloc(0));
  await truncate(image, SIZE);
  await startServer();
});

afterEach(async () => {
  await disk?.close().catch(() => undefined);
  disk = undefined;
  await killServer();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!hasNbdkit)('NBD drive reconnect', () => {
  it('a flushed write reads back after the server restarts; a read sent during the outage completes', async () => {
    disk = await openGuestDisk(socket, { readOnly: false, reconnectTimeoutMs: 10_000 });
    const data = randomBytes(64 * 1024);
    await disk.writeAt(data, 512 * 1024);
    await disk.flush();

    await killServer();
    const got = Buffer.alloc(data.length);
    const pending = disk.readAt(got, 512 * 1024);
    await new Promise((r) => setTimeout(r, 300));
    await startServer();
    await pending;
    expect(got.equals(data)).toBe(true);

    const more = randomBytes(4096);
    await disk.writeAt(more, 0);
    const back = Buffer.alloc(4096);
    await disk.readAt(back, 0);
    expect(back.equals(more)).toBe(true);
  });

  it('fails I/O once the server stays away past the reconnect timeout, and keeps failing', async () => {
    disk = await openGuestDisk(socket, { readOnly: false, reconnectTimeoutMs: 500 });
    await killServer();
    await expect(disk.readAt(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'NBD_DEAD' });
    await startServer();
    await expect(disk.readAt(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'NBD_DEAD' });
  });

  it('refuses a server that comes back with a different size', async () => {
    disk = await openGuestDisk(socket, { readOnly: false, reconnectTimeoutMs: 5_000 });
    await killServer();
    const other = join(dir, 'other.img');
    await writeFile(other, Buffer.alloc(0));
    await truncate(other, SIZE * 2);
    await startServer(other);
    await expect(disk.readAt(Buffer.alloc(4096), 0)).rejects.toMatchObject({ code: 'NBD_RECONNECT' });
  });
});
