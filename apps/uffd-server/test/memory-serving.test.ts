import { randomBytes, randomUUID } from 'node:crypto';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UffdPeerProcess } from '#native';
import { UffdServerProcess } from './uffd-server-process.js';

/**
 * Must-show: random and sequential reads of guest memory equal the memory file byte for byte,
 * for 4 KiB and 2 MiB pages, with and without memfd. The guest is a separate process (the C
 * uffd-peer, playing Firecracker), the server is `./sbx uffd-server serve`.
 */
const SIZE = 32 * 1024 * 1024;

describe('uffd-server serves guest memory equal to the memory file', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  let baseBuild: string;
  let memfile: string;

  beforeAll(async () => {
    await server.start();
    baseBuild = randomUUID();
    mkdirSync(join(server.bucket, baseBuild));
    memfile = join(server.bucket, baseBuild, 'memfile');
    writeFileSync(memfile, randomBytes(SIZE));
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  const cases = [
    { pageSize: 4096, memfd: false, tracking: 'wp-async', regions: 1 },
    { pageSize: 4096, memfd: true, tracking: 'wp-async', regions: 4 },
    { pageSize: 2097152, memfd: false, tracking: 'wp-sync', regions: 2 },
    { pageSize: 2097152, memfd: true, tracking: 'none', regions: 1 },
  ] as const;

  it.each(cases)('page size $pageSize, memfd $memfd, tracking $tracking, $regions region(s)', async (c) => {
    const sandboxId = `sbx-${c.pageSize}-${c.memfd}`;
    const socketPath = join(server.dir, `${sandboxId}.sock`);
    const prepared = await server.prepare({ sandboxId, socketPath, buildId: baseBuild, pageSize: c.pageSize });
    expect(prepared.memorySize).toBe(SIZE);
    expect(existsSync(socketPath)).toBe(true);
    const peer = new UffdPeerProcess([
      '--socket',
      socketPath,
      '--size',
      String(SIZE),
      '--page-size',
      String(c.pageSize),
      '--regions',
      String(c.regions),
      '--tracking',
      c.tracking,
      ...(c.memfd ? ['--memfd'] : []),
      ...(c.pageSize === 2097152 ? ['--key', 'page_size_kib'] : []),
    ]);
    peers.push(peer);
    await peer.ready();
    const serving = await server.waitFor(sandboxId, (s) => s.state === 'serving');
    expect(serving.hasMemfd).toBe(c.memfd);
    expect(serving.tracking).toBe(c.tracking === 'none' ? 'present' : c.tracking);
    expect(existsSync(socketPath)).toBe(false); // one handshake per socket: the file is gone
    expect(await peer.command(`checkrand ${memfile} ${c.pageSize} 300 9000`)).toBe('ok');
    expect(await peer.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');
    const st = await server.stats(sandboxId);
    expect(st.bytesServed).toBe(SIZE);
    expect(st.faults).toBeGreaterThan(0);
    expect(st.pageSize).toBe(c.pageSize);
    expect(st.latencyCounts.reduce((a, b) => a + b, 0)).toBe(st.faults);
    await peer.exit();
    await server.waitFor(sandboxId, (s) => s.state === 'peer-gone');
    await server.stop(sandboxId);
    await expect(server.stats(sandboxId)).rejects.toThrow(/NOT_FOUND|no memory serving/);
  });

  it('serves a plain memory file given by path, and refuses a second prepare of the same sandbox', async () => {
    const socketPath = join(server.dir, 'plain.sock');
    await server.prepare({ sandboxId: 'plain', socketPath, memfilePath: memfile });
    await expect(server.prepare({ sandboxId: 'plain', socketPath, memfilePath: memfile })).rejects.toThrow(
      /ALREADY_EXISTS|already/,
    );
    const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'wp-async']);
    peers.push(peer);
    await peer.ready();
    expect(await peer.command(`checkrand ${memfile} 11 200 4096`)).toBe('ok');
    await peer.exit();
    await server.stop('plain');
  });

  it('refuses bad requests with a clear status', async () => {
    await expect(
      server.prepare({ sandboxId: '../x', socketPath: join(server.dir, 'x.sock'), buildId: baseBuild }),
    ).rejects.toThrow(/INVALID_ARGUMENT.*sandbox_id/);
    await expect(
      server.prepare({ sandboxId: 'nobuild', socketPath: join(server.dir, 'n.sock'), buildId: randomUUID() }),
    ).rejects.toThrow(/NOT_FOUND/);
    await expect(server.stopSourcing('nobody')).rejects.toThrow(/NOT_FOUND/);
  });
});
