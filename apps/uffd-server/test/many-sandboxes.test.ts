import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UffdPeerProcess } from '#native';
import { UffdServerProcess } from './uffd-server-process.js';

/** Must-show: at least 20 sandboxes served at once by one server process, each from its own build. */
const SANDBOXES = 24;
const SIZE = 4 * 1024 * 1024;

describe('many sandboxes on one server', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];

  beforeAll(async () => {
    await server.start();
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  it(`serves ${SANDBOXES} guests concurrently, each reading its own memory file`, async () => {
    const sandboxes = Array.from({ length: SANDBOXES }, (_, i) => {
      const build = randomUUID();
      mkdirSync(join(server.bucket, build));
      const memfile = join(server.bucket, build, 'memfile');
      writeFileSync(memfile, randomBytes(SIZE));
      return { id: `many-${i}`, build, memfile, socketPath: join(server.dir, `many-${i}.sock`) };
    });
    await Promise.all(
      sandboxes.map((s) => server.prepare({ sandboxId: s.id, socketPath: s.socketPath, buildId: s.build })),
    );
    const running = sandboxes.map((s, i) => {
      const peer = new UffdPeerProcess([
        '--socket',
        s.socketPath,
        '--size',
        String(SIZE),
        '--tracking',
        i % 3 === 0 ? 'wp-sync' : 'wp-async',
        ...(i % 2 ? ['--memfd'] : []),
      ]);
      peers.push(peer);
      return { ...s, peer };
    });
    await Promise.all(running.map((r) => r.peer.ready()));
    // A peer is ready once it sent its handshake; the server takes each a moment later.
    await Promise.all(running.map((r) => server.waitFor(r.id, (s) => s.state === 'serving')));
    const list = await server.list();
    expect(list.sandboxes.filter((s) => s.state === 'serving')).toHaveLength(SANDBOXES);
    // All guests fault at the same time; each checks every byte against its own file.
    const answers = await Promise.all(
      running.map(async (r, i) => [
        await r.peer.command(`checkrand ${r.memfile} ${i + 1} 100 5000`),
        await r.peer.command(`check ${r.memfile} 0 ${SIZE}`),
      ]),
    );
    expect(answers.flat().every((a) => a === 'ok')).toBe(true);
    for (const r of running) expect((await server.stats(r.id)).bytesServed).toBe(SIZE);
    await Promise.all(running.map((r) => r.peer.exit()));
    await Promise.all(running.map((r) => server.stop(r.id)));
    expect((await server.list()).sandboxes).toEqual([]);
  });
});
