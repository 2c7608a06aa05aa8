import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import { connect, createServer, type Server } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { dial, SocketInUse, unary } from '#grpc';
import { createLogger } from '#logging';
import { BlockServerClient } from '#proto/sbx/block';
import { newBuildId } from '#storage';
import { freeTcpPort } from '#test-kit';
import { startBlockServer } from './block-service.js';
import { serviceConfigSchema } from './service-config.js';

const logger = createLogger({ service: 'block-server', level: 'silent' });
const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const c of cleanups.splice(0).reverse()) await c();
});

const refused = (path: string) =>
  new Promise<boolean>((resolve) => {
    const socket = connect(path);
    socket.once('connect', () => resolve(socket.destroy() && false));
    socket.once('error', () => resolve(true));
  });

describe('startBlockServer', () => {
  it('closes the devices it reopened and its metrics port when the control socket is taken', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'sbx-block-rollback-'));
    cleanups.push(() => rm(dir, { recursive: true, force: true }));
    const buildId = newBuildId();
    await mkdir(join(dir, 'bucket', buildId), { recursive: true });
    await writeFile(join(dir, 'bucket', buildId, 'rootfs.ext4'), Buffer.alloc(1 << 20, 7));
    const config = serviceConfigSchema.parse({
      controlSocket: join(dir, 'control.sock'),
      dataDir: join(dir, 'data'),
      bucket: join(dir, 'bucket'),
      kernelAttach: 'off',
      metricsPort: 0,
    });
    // A device from an earlier run, kept on disk by a clean stop.
    const first = await startBlockServer(config, logger);
    const client = dial(BlockServerClient, config.controlSocket);
    const device = await unary(client, client.open, { sandboxId: 'sbx-1', buildId, attachKernel: false });
    client.close();
    await first.stop();

    const holder: Server = createServer();
    await new Promise<void>((resolve) => holder.listen(config.controlSocket, resolve));
    cleanups.push(() => new Promise((resolve) => holder.close(resolve)));
    const metricsPort = await freeTcpPort();
    await expect(startBlockServer({ ...config, metricsPort }, logger)).rejects.toBeInstanceOf(SocketInUse);
    // The reopened device was shut again (kept on disk), and the metrics port is free.
    expect(await refused(device.socketPath)).toBe(true);
    expect(existsSync(join(config.dataDir, 'devices', 'sbx-1'))).toBe(true);
    const probe = createServer();
    await new Promise<void>((resolve, reject) => probe.once('error', reject).listen(metricsPort, '127.0.0.1', resolve));
    await new Promise((resolve) => probe.close(resolve));
  });
});
