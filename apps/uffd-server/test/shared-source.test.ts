import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UffdPeerProcess } from '#native';
import { mappings } from '#test-kit';
import { UffdServerProcess } from './uffd-server-process.js';

/**
 * Sandboxes of one build share one mapping of its memory file in the server (issue 17: each
 * sandbox mapping it on its own counted the page-cache pages it served once per sandbox in the
 * server's RSS); another build gets its own; the mapping goes with the last sandbox of its
 * build; bytes stay right; a restarted server takes the sandboxes back onto one mapping again.
 */
const SIZE = 8 * 1024 * 1024;

describe.each([
  { threads: 'threads of its own', args: [] as string[] },
  { threads: 'the shared pool', args: ['--serve-pool-threads', '2'] },
])('one mapping per memory file, shared by its sandboxes; faults served on $threads', ({ args }) => {
  const pooled = args.length > 0;
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  const builds: Record<'a' | 'b', { id: string; memfile: string }> = {} as never;
  let baseline: { fds: string[]; maps: string[] };
  let baselineThreads: number;

  const threads = () => readdirSync(`/proc/${server.pid}/task`).length;
  /** Mappings of `file` in the server now. */
  const mapped = (file: string) => mappings(server.pid).filter((m) => m.path === file).length;
  /** Fds of sandboxes (the build store keeps the builds' data files open, shared, until evicted). */
  const sandboxFds = (fds: string[]) => fds.filter((f) => !f.startsWith(`${server.bucket}/`));

  const start = async (sandboxId: string, build: 'a' | 'b') => {
    const socketPath = join(server.dir, `${sandboxId}.sock`);
    await server.prepare({ sandboxId, socketPath, buildId: builds[build].id });
    const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'wp-async']);
    peers.push(peer);
    await peer.ready();
    await server.waitFor(sandboxId, (s) => s.state === 'serving');
    return peer;
  };

  beforeAll(async () => {
    await server.start(args);
    for (const name of ['a', 'b'] as const) {
      const id = randomUUID();
      mkdirSync(join(server.bucket, id));
      const memfile = join(server.bucket, id, 'memfile');
      writeFileSync(memfile, randomBytes(SIZE));
      builds[name] = { id, memfile };
    }
    // Warm-up: the process's own lazily started threads and fds (libuv pool) exist from here on.
    const warm = await start('warm', 'b');
    expect(await warm.command(`check ${builds.b.memfile} 0 ${SIZE}`)).toBe('ok');
    await warm.exit();
    await server.stop('warm');
    baseline = server.resources();
    baselineThreads = threads();
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  it('maps a build once for all its sandboxes, another build apart, and unmaps with the last sandbox', async () => {
    expect(mapped(builds.a.memfile)).toBe(0);
    const a = await Promise.all(['a1', 'a2', 'a3'].map((id) => start(id, 'a')));
    const b = await start('b1', 'b');
    expect(mapped(builds.a.memfile)).toBe(1);
    expect(mapped(builds.b.memfile)).toBe(1);
    // On the pool, serving 4 sandboxes adds no thread (the warm-up started the pool's 2).
    if (pooled) expect(threads()).toBe(baselineThreads);
    // Every guest reads its whole memory through the one shared mapping, byte for byte.
    const answers = await Promise.all([
      ...a.map((p, i) => p.command(`checkrand ${builds.a.memfile} ${i + 1} 200 4000`)),
      ...a.map((p) => p.command(`check ${builds.a.memfile} 0 ${SIZE}`)),
      b.command(`check ${builds.b.memfile} 0 ${SIZE}`),
    ]);
    expect(answers.every((x) => x === 'ok')).toBe(true);
    for (const id of ['a1', 'a2', 'a3']) expect((await server.stats(id)).bytesServed).toBe(SIZE);

    await a[0]!.exit();
    await server.stop('a1');
    expect(mapped(builds.a.memfile)).toBe(1); // a2 and a3 still use it
    // A sandbox prepared while others hold the mapping joins it.
    const late = await start('a4', 'a');
    expect(mapped(builds.a.memfile)).toBe(1);
    expect(await late.command(`check ${builds.a.memfile} 0 ${SIZE}`)).toBe('ok');
    for (const [peer, id] of [
      [a[1]!, 'a2'],
      [a[2]!, 'a3'],
      [late, 'a4'],
    ] as const) {
      await peer.exit();
      await server.stop(id);
    }
    expect(mapped(builds.a.memfile)).toBe(0);
    expect(mapped(builds.b.memfile)).toBe(1);
    await b.exit();
    await server.stop('b1');
    expect(mapped(builds.b.memfile)).toBe(0);

    const after = server.resources();
    expect(after.maps).toEqual(baseline.maps);
    expect(sandboxFds(after.fds)).toEqual(sandboxFds(baseline.fds));
    expect(threads()).toBe(baselineThreads);
  });

  it('a sandbox prepared but never connected holds the mapping until it is stopped', async () => {
    await server.prepare({ sandboxId: 'idle', socketPath: join(server.dir, 'idle.sock'), buildId: builds.a.id });
    expect(mapped(builds.a.memfile)).toBe(1);
    await server.stop('idle');
    expect(mapped(builds.a.memfile)).toBe(0);
  });

  it('a restarted server takes the sandboxes back onto one mapping and serves them on', async () => {
    const a = await Promise.all(['r1', 'r2'].map((id) => start(id, 'a')));
    expect(await a[0]!.command(`check ${builds.a.memfile} 0 ${SIZE / 2}`)).toBe('ok');
    await server.service!.stop('SIGKILL');
    server.service = await server.service!.restart();
    for (const id of ['r1', 'r2']) await server.waitFor(id, (s) => s.state === 'serving');
    expect(mapped(builds.a.memfile)).toBe(1);
    const answers = await Promise.all(a.map((p) => p.command(`check ${builds.a.memfile} 0 ${SIZE}`)));
    expect(answers).toEqual(['ok', 'ok']);
    const fresh = await start('r3', 'a');
    expect(mapped(builds.a.memfile)).toBe(1);
    expect(await fresh.command(`check ${builds.a.memfile} 0 ${SIZE}`)).toBe('ok');
    for (const [peer, id] of [
      [a[0]!, 'r1'],
      [a[1]!, 'r2'],
      [fresh, 'r3'],
    ] as const) {
      await peer.exit();
      await server.stop(id);
    }
    expect(mapped(builds.a.memfile)).toBe(0);
    expect(server.resources().maps).toEqual([]);
  });
});

describe('one pool worker for every sandbox: sandboxes stopped while others fault', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];

  beforeAll(async () => {
    await server.start(['--serve-pool-threads', '1']);
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  it('serves the others byte for byte while killed peers are stopped one by one', async () => {
    const id = randomUUID();
    mkdirSync(join(server.bucket, id));
    const memfile = join(server.bucket, id, 'memfile');
    writeFileSync(memfile, randomBytes(SIZE));
    const all = Array.from({ length: 6 }, (_, i) => `p${i}`);
    const running = await Promise.all(
      all.map(async (sandboxId) => {
        const socketPath = join(server.dir, `${sandboxId}.sock`);
        await server.prepare({ sandboxId, socketPath, buildId: id });
        const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'wp-async']);
        peers.push(peer);
        await peer.ready();
        await server.waitFor(sandboxId, (s) => s.state === 'serving');
        return { sandboxId, peer };
      }),
    );
    const [stay, go] = [running.slice(0, 3), running.slice(3)];
    // The staying guests fault all the while; the others are killed mid-fault and stopped.
    const reads = stay.map((r, i) => r.peer.command(`checkrand ${memfile} ${i + 7} 400 4000`));
    for (const r of go) {
      void r.peer.command(`checkrand ${memfile} 3 400 4000`).catch(() => undefined);
      r.peer.kill();
      await server.waitFor(r.sandboxId, (s) => s.state === 'peer-gone');
      await server.stop(r.sandboxId);
    }
    expect(await Promise.all(reads)).toEqual(['ok', 'ok', 'ok']);
    const whole = await Promise.all(stay.map((r) => r.peer.command(`check ${memfile} 0 ${SIZE}`)));
    expect(whole).toEqual(['ok', 'ok', 'ok']);
    for (const r of stay) {
      await r.peer.exit();
      await server.stop(r.sandboxId);
    }
    expect((await server.list()).sandboxes).toEqual([]);
    expect(server.resources().maps).toEqual([]);
  });
});
