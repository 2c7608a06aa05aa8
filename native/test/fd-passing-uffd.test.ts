import { mkdtempSync, rmSync, writeFileSync, openSync, closeSync, readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  accept,
  close,
  listenUnix,
  mmap,
  munmap,
  MAP_PRIVATE,
  PROT_READ,
  receiveWithFds,
  uffdFeaturesOfFd,
  UffdFeature,
  watchReadable,
  ServeEngine,
  peerCredentials,
  pidfdOpen,
  UffdPeerProcess,
} from '#native';

/**
 * The must-show of native/: a SEPARATE process (the C uffd-peer) creates a userfaultfd over its
 * own memory and sends it with the region description over a Unix socket; this process serves
 * its faults through the bindings, and the peer checks the bytes it reads against the file.
 */
const SIZE = 8 * 1024 * 1024;

function openFds(): string[] {
  return readdirSync('/proc/self/fd').sort();
}

describe('userfaultfd passed over a Unix socket from another process', () => {
  let dir: string;
  let memfile: string;
  const cleanups: Array<() => void | Promise<void>> = [];

  beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'native-uffd-'));
    memfile = join(dir, 'memfile');
    writeFileSync(memfile, randomBytes(SIZE));
  });

  afterEach(async () => {
    for (const c of cleanups.reverse()) await c();
    cleanups.length = 0;
    rmSync(dir, { recursive: true, force: true });
  });

  async function handshake(peerArgs: string[]) {
    const sock = join(dir, 'uffd.sock');
    const listener = listenUnix(sock);
    cleanups.push(() => close(listener));
    const peer = new UffdPeerProcess(['--socket', sock, '--size', String(SIZE), ...peerArgs]);
    cleanups.push(() => peer.kill());
    const pid = await peer.ready();
    const conn = accept(listener);
    cleanups.push(() => close(conn));
    const msg = receiveWithFds(conn, 4096, 4);
    if (!msg) throw new Error('no handshake message');
    for (const fd of msg.fds) cleanups.push(() => close(fd));
    const regions = JSON.parse(Buffer.from(msg.payload).toString()) as Array<{
      base_host_virt_addr: number;
      size: number;
      offset: number;
      page_size: number;
    }>;
    expect(peerCredentials(conn).pid).toBe(pid);
    return { peer, pid, conn, fds: msg.fds, regions };
  }

  function mapFile(): number {
    const fd = openSync(memfile, 'r');
    const addr = mmap(0, SIZE, PROT_READ, MAP_PRIVATE, fd, 0);
    closeSync(fd);
    cleanups.push(() => munmap(addr, SIZE));
    return addr;
  }

  it('serves every 4 KiB fault of two regions through the C engine, one page each, and leaks no fd', async () => {
    const before = openFds();
    const { peer, conn, fds, regions } = await handshake(['--regions', '2']);
    expect(fds).toHaveLength(1);
    const uffd = fds[0] as number;
    expect(uffdFeaturesOfFd(uffd) & UffdFeature.WP_ASYNC).toBe(0);
    expect(regions).toHaveLength(2);
    const engine = new ServeEngine({
      uffd,
      peerFd: conn,
      peerKind: 'socket',
      sourceAddress: mapFile(),
      sourceSize: SIZE,
      allReady: true,
      prefetchBytes: 0,
      installWriteProtected: false,
      syncWriteProtect: false,
      regions: regions.map((r) => ({
        base: r.base_host_virt_addr,
        size: r.size,
        offset: r.offset,
        pageSize: r.page_size,
      })),
    });
    cleanups.push(() => engine.destroy());
    engine.start(1);
    expect(await peer.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');
    expect(engine.stats()).toMatchObject({ faults: SIZE / 4096, bytesServed: SIZE });
    expect(await peer.command(`checkrand ${memfile} 7 200 5000`)).toBe('ok');
    await peer.exit();
    for (const c of cleanups.reverse()) await c();
    cleanups.length = 0;
    expect(openFds()).toEqual(before);
  });

  it('serves a memfd-backed guest through the C engine on native threads, 2 MiB pages', async () => {
    const { peer, pid, fds, regions } = await handshake([
      '--memfd',
      '--page-size',
      '2097152',
      '--tracking',
      'wp-async',
    ]);
    expect(fds).toHaveLength(2);
    const uffd = fds[0] as number;
    expect(uffdFeaturesOfFd(uffd) & UffdFeature.WP_ASYNC).not.toBe(0);
    const src = mapFile();
    const pidfd = pidfdOpen(pid);
    cleanups.push(() => close(pidfd));
    const engine = new ServeEngine({
      uffd,
      peerFd: pidfd,
      peerKind: 'pidfd',
      sourceAddress: src,
      sourceSize: SIZE,
      allReady: true,
      prefetchBytes: 0,
      installWriteProtected: true,
      syncWriteProtect: false,
      regions: regions.map((r) => ({
        base: r.base_host_virt_addr,
        size: r.size,
        offset: r.offset,
        pageSize: r.page_size,
      })),
    });
    cleanups.push(() => engine.destroy());
    const gone = new Promise<void>((resolve) => {
      const w = watchReadable(engine.notifyFd, () => {
        for (let e = engine.nextEvent(); e; e = engine.nextEvent()) if (e.type === 'peer-gone') resolve();
      });
      cleanups.push(() => w.close());
    });
    engine.start(2);
    expect(await peer.command(`checkrand ${memfile} 3 100 9000`)).toBe('ok');
    expect(await peer.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');
    const st = engine.stats();
    expect(st.faults).toBe(SIZE / 2097152);
    expect(st.bytesServed).toBe(SIZE);
    // The memfd we received holds what the guest sees.
    const fromMemfd = Buffer.alloc(4096);
    const { readSync } = await import('node:fs');
    readSync(fds[1] as number, fromMemfd, 0, 4096, 4096 * 100);
    const fromFile = Buffer.alloc(4096);
    const f = openSync(memfile, 'r');
    readSync(f, fromFile, 0, 4096, 4096 * 100);
    closeSync(f);
    expect(fromMemfd.equals(fromFile)).toBe(true);
    await peer.exit();
    await gone;
  });
});
