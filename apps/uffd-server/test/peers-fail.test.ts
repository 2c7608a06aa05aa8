import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  close,
  connectUnix,
  memfdCreate,
  sendWithFds,
  unixSocket,
  UffdPeerProcess,
  userfaultfd,
  uffdApi,
} from '#native';
import { baseMappings, encodeHeader } from '#storage';
import { UffdServerProcess } from './uffd-server-process.js';

/**
 * Peers fail, the server does not: malformed handshakes, a socket closed early, a fault outside
 * every region and a peer killed mid-fault each fail (or end) only their sandbox, with an error
 * saying what was wrong, while another sandbox keeps being served; afterwards the server holds
 * no fd or mapping it took for them.
 */
const SIZE = 8 * 1024 * 1024;

describe('bad peers fail only their own sandbox', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  let build: string;
  let memfile: string;
  let baseline: { fds: string[]; maps: string[] };

  beforeAll(async () => {
    await server.start();
    build = randomUUID();
    mkdirSync(join(server.bucket, build));
    memfile = join(server.bucket, build, 'memfile');
    writeFileSync(memfile, randomBytes(SIZE));
    // Warm the server's lazy paths (grpc, first prepare) before taking the baseline.
    await server.list();
    baseline = server.resources();
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  function startPeer(socketPath: string, extra: string[] = []): UffdPeerProcess {
    const peer = new UffdPeerProcess([
      '--socket',
      socketPath,
      '--size',
      String(SIZE),
      '--tracking',
      'wp-async',
      ...extra,
    ]);
    peers.push(peer);
    return peer;
  }

  /** Sends a raw handshake message the way a broken Firecracker might. */
  function sendRaw(socketPath: string, payload: string, fdCount: number): void {
    const fds: number[] = [];
    for (let i = 0; i < fdCount; i++) {
      if (i === 0) {
        const u = userfaultfd();
        uffdApi(u, 0);
        fds.push(u);
      } else fds.push(memfdCreate(`extra-${i}`));
    }
    const sock = unixSocket();
    try {
      connectUnix(sock, socketPath);
      sendWithFds(sock, Buffer.from(payload), fds);
    } finally {
      for (const fd of [...fds, sock]) close(fd);
    }
  }

  const region = (o: Record<string, number>) =>
    JSON.stringify([{ base_host_virt_addr: 0x7f0000000000, size: SIZE, offset: 0, page_size: 4096, ...o }]);

  it.each([
    ['bad JSON', '[{"base_host_virt_addr": 1,', 1, 'BAD_JSON'],
    ['no fd', region({}), 0, 'FD_COUNT'],
    ['too many fds', region({}), 3, 'FD_COUNT'],
    ['a zero-size region', region({ size: 0 }), 1, 'ZERO_SIZE'],
    ['an unaligned region', region({ base_host_virt_addr: 0x7f0000000100 }), 1, 'UNALIGNED'],
    ['a region past the memory file', region({ offset: 4096 }), 1, 'PAST_MEMORY_FILE'],
    [
      'overlapping regions',
      JSON.stringify([
        { base_host_virt_addr: 0x7f0000000000, size: 8192, offset: 0, page_size: 4096 },
        { base_host_virt_addr: 0x7f0000001000, size: 8192, offset: 8192, page_size: 4096 },
      ]),
      1,
      'OVERLAP',
    ],
  ] as const)(
    '%s: that sandbox fails saying so, a good one beside it is served',
    async (_name, payload, fds, problem) => {
      const bad = `bad-${problem}-${fds}`;
      const badSocket = join(server.dir, `${bad}.sock`);
      const good = `good-${problem}-${fds}`;
      const goodSocket = join(server.dir, `${good}.sock`);
      await server.prepare({ sandboxId: bad, socketPath: badSocket, buildId: build });
      await server.prepare({ sandboxId: good, socketPath: goodSocket, buildId: build });
      const peer = startPeer(goodSocket);
      sendRaw(badSocket, payload, fds);
      const failed = await server.waitFor(bad, (s) => s.state === 'failed');
      expect(failed.error).toContain(`(${problem})`);
      await peer.ready();
      expect(await peer.command(`checkrand ${memfile} 5 50 8192`)).toBe('ok');
      await peer.exit();
      await server.stop(bad);
      await server.stop(good);
    },
  );

  it('a page size that is not a multiple of the header block size fails the sandbox', async () => {
    const huge = randomUUID();
    mkdirSync(join(server.bucket, huge));
    writeFileSync(join(server.bucket, huge, 'memfile'), randomBytes(SIZE));
    writeFileSync(
      join(server.bucket, huge, 'memfile.header'),
      encodeHeader({
        metadata: { version: 3, blockSize: 2097152, size: SIZE, generation: 0, buildId: huge, baseBuildId: huge },
        mappings: baseMappings(SIZE, huge),
      }),
    );
    const socketPath = join(server.dir, 'smallpages.sock');
    await server.prepare({ sandboxId: 'smallpages', socketPath, buildId: huge });
    const peer = startPeer(socketPath);
    await peer.ready();
    const st = await server.waitFor('smallpages', (s) => s.state === 'failed');
    expect(st.error).toMatch(/page size 4096 is not a multiple of the memory file's block size 2097152/);
    peer.kill();
    await server.stop('smallpages');
  });

  it('a socket closed before the handshake fails the sandbox', async () => {
    const socketPath = join(server.dir, 'early.sock');
    await server.prepare({ sandboxId: 'early', socketPath, buildId: build });
    const sock = unixSocket();
    connectUnix(sock, socketPath);
    close(sock);
    const st = await server.waitFor('early', (s) => s.state === 'failed');
    expect(st.error).toMatch(/closed the connection before sending the handshake/);
    await server.stop('early');
  });

  it('a fault outside every region fails that sandbox with a clear error', async () => {
    const socketPath = join(server.dir, 'outside.sock');
    await server.prepare({ sandboxId: 'outside', socketPath, buildId: build });
    const peer = startPeer(socketPath, ['--regions', '2', '--declare', '1']);
    await peer.ready();
    expect(await peer.command(`check ${memfile} 0 4096`)).toBe('ok');
    peer.child.stdin.write(`check ${memfile} ${SIZE / 2} 4096\n`); // never answered
    const st = await server.waitFor('outside', (s) => s.state === 'failed');
    expect(st.error).toMatch(/fault at 0x[0-9a-f]+ outside every region/);
    peer.kill();
    await server.stop('outside');
  });

  it('a peer killed mid-fault ends its sandbox; the server keeps serving others and leaks nothing', async () => {
    const socketPath = join(server.dir, 'victim.sock');
    await server.prepare({ sandboxId: 'victim', socketPath, buildId: build });
    const peer = startPeer(socketPath, ['--memfd']);
    await peer.ready();
    peer.child.stdin.write(`check ${memfile} 0 ${SIZE}\n`);
    peer.kill();
    await peer.exited;
    const st = await server.waitFor('victim', (s) => s.state === 'peer-gone');
    expect(st.error).toBe('');
    // Already before Stop: no uffd, no memfd of the dead guest is held any more.
    expect(server.resources().fds.filter((t) => t.includes('guest-memory') || t.includes('userfaultfd'))).toEqual([]);
    await expect(server.stopSourcing('victim')).rejects.toThrow(/FAILED_PRECONDITION/);
    await server.stop('victim');

    // And a sandbox stopped before its peer ever came gives back its socket too.
    const never = join(server.dir, 'never.sock');
    await server.prepare({ sandboxId: 'never', socketPath: never, buildId: build });
    await server.stop('never');

    expect((await server.list()).sandboxes).toEqual([]);
    const after = server.resources();
    expect(after.maps).toEqual(baseline.maps);
    // The builds' data files stay open in the build cache, shared by their sandboxes until evicted.
    const sandboxFds = (fds: string[]) => fds.filter((f) => !f.startsWith(`${server.bucket}/`));
    expect(sandboxFds(after.fds)).toEqual(sandboxFds(baseline.fds));
  });
});
