import { randomBytes } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { HealthClient } from '#proto/grpc/health/v1/health';
import { UffdPeerProcess } from '#native';
import { freeTcpPort, reserveHugePages, type HugePageReservation } from '#test-kit';
import { UffdServerProcess } from './uffd-server-process.js';

const SIZE = 4 * 1024 * 1024;

describe('uffd-server as a service: health, metrics, hugetlb guests, clean SIGTERM', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  afterAll(async () => {
    for (const p of peers) p.kill();
    await server.shutdown();
  });

  it('answers health, counts faults in its metrics, and on SIGTERM releases the sandboxes it serves', async () => {
    const port = await freeTcpPort();
    await server.start(['--metrics-port', String(port)]);
    const health = dial(HealthClient, server.controlSocket);
    expect((await unary(health, health.check, { service: 'sbx.v1.UffdServer' })).status).toBe(1);
    health.close();

    const memfile = join(server.dir, 'memfile');
    writeFileSync(memfile, randomBytes(SIZE));
    const servingSocket = join(server.dir, 'serving.sock');
    const waitingSocket = join(server.dir, 'waiting.sock');
    await server.prepare({ sandboxId: 'serving', socketPath: servingSocket, memfilePath: memfile });
    await server.prepare({ sandboxId: 'waiting', socketPath: waitingSocket, memfilePath: memfile });
    const peer = new UffdPeerProcess(['--socket', servingSocket, '--size', String(SIZE), '--tracking', 'wp-async']);
    peers.push(peer);
    await peer.ready();
    expect(await peer.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');

    const metrics = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    const faults = Number(/^sbx_uffd_server_faults_total(?:\{[^}]*\})? (\d+)/m.exec(metrics)?.[1] ?? -1);
    expect(faults).toBeGreaterThan(0);
    expect(metrics).toMatch(/sbx_uffd_server_served_bytes_total(\{[^}]*\})? 4194304/);
    expect(metrics).toMatch(/sbx_uffd_server_sandboxes\{[^}]*state="listening"[^}]*\} 1/);

    // A sandbox that comes and goes between two scrapes still counts: its last faults are
    // folded in when it stops, and its per-sandbox state is dropped.
    const lateSocket = join(server.dir, 'late.sock');
    await server.prepare({ sandboxId: 'late', socketPath: lateSocket, memfilePath: memfile });
    const late = new UffdPeerProcess(['--socket', lateSocket, '--size', String(SIZE), '--tracking', 'wp-async']);
    peers.push(late);
    await late.ready();
    expect(await late.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');
    await late.exit();
    await server.stop('late');
    const afterLate = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
    expect(afterLate).toMatch(/sbx_uffd_server_served_bytes_total(\{[^}]*\})? 8388608/);

    expect(existsSync(waitingSocket)).toBe(true);
    expect(await server.shutdown()).toBe(0);
    expect(existsSync(waitingSocket)).toBe(false);
    expect(existsSync(server.controlSocket)).toBe(false);
  });
});

describe('hugetlb-backed guest memory (2 MiB pages from the kernel)', () => {
  // The pages are reserved here (vm.nr_hugepages, as root) and the setting put back after, so
  // this runs on every machine instead of being skipped where none were reserved.
  let server: UffdServerProcess;
  let reservation: HugePageReservation | undefined;
  const peers: UffdPeerProcess[] = [];
  beforeAll(() => {
    reservation = reserveHugePages((2 * SIZE) / 2097152);
    server = new UffdServerProcess();
  });
  afterAll(async () => {
    for (const p of peers) p.kill();
    await server?.shutdown();
    reservation?.release();
  });

  it.each([false, true])('serves a MAP_HUGETLB guest, memfd %s', async (memfd) => {
    if (!server.client) await server.start();
    const memfile = join(server.dir, `huge-${memfd}`);
    writeFileSync(memfile, randomBytes(SIZE));
    const socketPath = join(server.dir, `huge-${memfd}.sock`);
    await server.prepare({ sandboxId: `huge-${memfd}`, socketPath, memfilePath: memfile, pageSize: 2097152 });
    const peer = new UffdPeerProcess([
      '--socket',
      socketPath,
      '--size',
      String(SIZE),
      '--page-size',
      '2097152',
      '--hugetlb',
      '--tracking',
      'wp-async',
      ...(memfd ? ['--memfd'] : []),
    ]);
    peers.push(peer);
    await peer.ready();
    expect(await peer.command(`check ${memfile} 0 ${SIZE}`)).toBe('ok');
    await peer.exit();
    await server.stop(`huge-${memfd}`);
  });
});
