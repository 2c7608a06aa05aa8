import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { BlockServerClient } from '#proto/sbx/block';
import { newBuildId } from '#storage';
import { grpcServing, ServiceProcess } from '#test-kit';

const run = promisify(execFile);
const hasNbd = existsSync('/sys/module/nbd') && existsSync('/dev/nbd0');
if (!hasNbd) {
  console.warn(
    'skipping kernel attach tests: no kernel NBD module on this machine (/sys/module/nbd, /dev/nbd0 absent)',
  );
}

describe.skipIf(!hasNbd)('kernel /dev/nbdX attach (needs the nbd module)', () => {
  const SIZE = 8 * 1024 * 1024;
  let dir: string;
  let control: string;
  let dataDir: string;
  let baseId: string;
  let server: ServiceProcess;
  let client: BlockServerClient;
  const start = async () => {
    server = await ServiceProcess.start({
      args: [
        'block-server',
        'serve',
        '--control-socket',
        control,
        '--data-dir',
        dataDir,
        '--bucket',
        join(dir, 'bucket'),
        '--metrics-port',
        '0',
        '--log-level',
        'warn',
      ],
      ready: grpcServing(control),
      readyTimeoutMs: 60_000,
    });
    client = dial(BlockServerClient, control);
  };

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'block-kernel-'));
    control = join(dir, 'ctl.sock');
    dataDir = join(dir, 'data');
    baseId = newBuildId();
    await mkdir(join(dir, 'bucket', baseId), { recursive: true });
    await writeFile(join(dir, 'bucket', baseId, 'rootfs.ext4'), randomBytes(SIZE));
    await start();
  });
  afterAll(async () => {
    client?.close();
    await server?.stop('SIGKILL');
    await rm(dir, { recursive: true, force: true });
  });

  it('attaches, survives a kill -9 of block-server through reconfigure, and releases the device on close', async () => {
    const device = await unary(client, client.open, { sandboxId: 'k1', buildId: baseId, attachKernel: true });
    expect(device.devicePath).toMatch(/^\/dev\/nbd\d+$/);
    const pattern = Buffer.alloc(4096, 0x5c);
    const fh = await open(device.devicePath, 'r+');
    await fh.write(pattern, 0, 4096, 4096);
    await fh.sync();
    await fh.close();

    client.close();
    await server.kill();
    await start();

    const back = Buffer.alloc(4096);
    const again = await open(device.devicePath, 'r');
    await again.read(back, 0, 4096, 4096);
    await again.close();
    expect(back.equals(pattern)).toBe(true);

    await unary(client, client.closeDevice, { sandboxId: 'k1' });
    const index = device.devicePath.replace('/dev/nbd', '');
    const { stdout } = await run('cat', [`/sys/block/nbd${index}/size`]);
    expect(Number(stdout.trim())).toBe(0);
  });
});
