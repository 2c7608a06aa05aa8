import { randomBytes, randomUUID } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { UffdPeerProcess } from '#native';
import { baseMappings, decodePrefetch, encodeHeader, encodePrefetch, PREFETCH_FILE } from '#storage';
import { eventually } from '#test-kit';
import { UffdServerProcess } from './uffd-server-process.js';

/**
 * Recorded prefetch (issue 15) through the service's sockets: a resumed sandbox's start faults
 * are recorded in first-fault order and written with the next build at ExportDiff; a resume of
 * that build gets them copied in by the prefetch pass, so its start takes (almost) no faults,
 * with every byte as the build holds it; a corrupt set never fails a resume.
 */
const SIZE = 16 * 1024 * 1024;
const PAGE = 4096;
/** The pages the guest's start touches, in this order (not ascending: the order is what is stored). */
const START_PAGES = [1500, 3, 4000, 4001, 4002, 17, 2048, 999, 1000, 3999, 64, 65, 66, 67, 1];

describe('recorded prefetch', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  let model: Buffer;
  let modelFile: string;
  let base: string;
  let baseline: { fds: string[]; maps: string[] };
  let baselineThreads: number;

  const threads = () => readdirSync(`/proc/${server.pid}/task`).length;

  beforeAll(async () => {
    // Pages only (no window around a fault): every fault is one page, so counts are exact.
    await server.start(['--prefetch-bytes', '0']);
    base = randomUUID();
    mkdirSync(join(server.bucket, base));
    model = randomBytes(SIZE);
    modelFile = join(server.dir, 'model');
    writeFileSync(modelFile, model);
    writeFileSync(join(server.bucket, base, 'memfile'), model);
    await server.list();
    baseline = server.resources();
    baselineThreads = threads();
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  async function resume(sandboxId: string, buildId: string): Promise<UffdPeerProcess> {
    const socketPath = join(server.dir, `${sandboxId}.sock`);
    await server.prepare({ sandboxId, socketPath, buildId });
    const peer = new UffdPeerProcess([
      '--socket',
      socketPath,
      '--size',
      String(SIZE),
      '--tracking',
      'wp-async',
      '--memfd',
    ]);
    peers.push(peer);
    await peer.ready();
    return peer;
  }

  async function touch(peer: UffdPeerProcess, pages: number[]): Promise<void> {
    for (const p of pages) expect(await peer.command(`check ${modelFile} ${p * PAGE} ${PAGE}`)).toBe('ok');
  }

  /** Pause into a new build (no page written: the header maps the base), the recorded set written with it. */
  async function pause(sandboxId: string): Promise<{ buildId: string; blocks: number }> {
    await server.stopSourcing(sandboxId);
    const buildId = randomUUID();
    const dir = join(server.bucket, buildId);
    mkdirSync(dir);
    const exported = await unary(
      server.client,
      server.client.exportDiff,
      {
        sandboxId,
        newBuildId: buildId,
        diffPath: join(dir, 'memfile'),
        memfilePath: '',
        vmmDirtyLog: false,
        keepServing: false,
        dedup: false,
        prefetchPath: join(dir, PREFETCH_FILE),
      },
      60_000,
    );
    expect(exported.dirtyPages).toBe(0);
    writeFileSync(
      join(dir, 'memfile.header'),
      encodeHeader({
        metadata: { version: 3, blockSize: PAGE, size: SIZE, generation: 1, buildId, baseBuildId: base },
        mappings: baseMappings(SIZE, base),
      }),
    );
    await server.stop(sandboxId);
    return { buildId, blocks: exported.prefetchBlocks };
  }

  it('records the start in first-fault order, stores it with the build, and a resume of it starts without faults', async () => {
    // First resume: no set; the start's faults are recorded.
    const first = await resume('first', base);
    await touch(first, START_PAGES);
    await touch(first, [START_PAGES[0]!]); // a second touch is not a fault, nor recorded twice
    let st = await server.stats('first');
    expect(st).toMatchObject({ recording: true, faults: START_PAGES.length, startFaults: START_PAGES.length });
    expect(st.recordedBlocks).toBe(START_PAGES.length);
    // envd answered: the orchestrator ends the recording; later faults are not part of the start.
    st = await unary(server.client, server.client.stopRecording, { sandboxId: 'first' });
    expect(st).toMatchObject({ recording: false, recordedBlocks: START_PAGES.length });
    await touch(first, [2500]);
    st = await server.stats('first');
    expect(st).toMatchObject({ faults: START_PAGES.length + 1, startFaults: START_PAGES.length });
    const g1 = await pause('first');
    await first.exit();
    expect(g1.blocks).toBe(START_PAGES.length);
    const stored = decodePrefetch(readFileSync(join(server.bucket, g1.buildId, PREFETCH_FILE)));
    expect(stored).toEqual({ blockSize: PAGE, size: SIZE, blocks: START_PAGES });

    // Second resume: the pass copies the set in; the same start takes no fault and reads the build's bytes.
    const second = await resume('second', g1.buildId);
    st = await server.waitFor('second', (s) => s.recordedPrefetchPages === START_PAGES.length);
    expect(st).toMatchObject({ prefetchSetBlocks: START_PAGES.length, recordedPrefetchLate: 0 });
    await touch(second, START_PAGES);
    st = await server.stats('second');
    expect(st).toMatchObject({ faults: 0, startFaults: 0 });
    // What the set missed is a fault, recorded after what the pass installed (the set follows the workload).
    await touch(second, [77]);
    expect(await server.stats('second')).toMatchObject({ faults: 1, startFaults: 1 });
    await unary(server.client, server.client.stopRecording, { sandboxId: 'second' });
    expect(await second.command(`check ${modelFile} 0 ${SIZE}`)).toBe('ok');
    const g2 = await pause('second');
    await second.exit();
    expect(decodePrefetch(readFileSync(join(server.bucket, g2.buildId, PREFETCH_FILE))).blocks).toEqual([
      ...START_PAGES,
      77,
    ]);

    // Faults win over the pass: a guest touching at once reads right bytes whoever installs a page.
    const third = await resume('third', g2.buildId);
    await touch(third, [...START_PAGES].reverse());
    st = await server.waitFor(
      'third',
      (s) => s.recordedPrefetchPages + s.recordedPrefetchLate === START_PAGES.length + 1,
    );
    // Each set page was installed once, by the pass or by a fault that came first.
    expect(st.startFaults).toBeGreaterThanOrEqual(st.recordedPrefetchLate);
    expect(st.startFaults).toBeLessThanOrEqual(START_PAGES.length + 1);
    expect(await third.command(`check ${modelFile} 0 ${SIZE}`)).toBe('ok');
    await server.stop('third');
    await third.exit();

    // Nothing left behind: fds, mappings, and the pass's thread.
    expect((await server.list()).sandboxes).toEqual([]);
    const after = server.resources();
    expect(after.maps).toEqual(baseline.maps);
    const sandboxFds = (fds: string[]) => fds.filter((f) => !f.startsWith(`${server.bucket}/`));
    expect(sandboxFds(after.fds)).toEqual(sandboxFds(baseline.fds));
    await eventually(() => expect(threads()).toBe(baselineThreads));
  });

  it('a checkpoint (keep serving) stores the set too, and the sandbox serves on', async () => {
    const peer = await resume('ck', base);
    await touch(peer, START_PAGES.slice(0, 5));
    const dir = join(server.bucket, randomUUID());
    mkdirSync(dir);
    const exported = await unary(
      server.client,
      server.client.exportDiff,
      {
        sandboxId: 'ck',
        newBuildId: randomUUID(),
        diffPath: join(dir, 'memfile'),
        memfilePath: '',
        vmmDirtyLog: false,
        keepServing: true,
        dedup: false,
        prefetchPath: join(dir, PREFETCH_FILE),
      },
      60_000,
    );
    expect(exported.prefetchBlocks).toBe(5);
    expect(decodePrefetch(readFileSync(join(dir, PREFETCH_FILE))).blocks).toEqual(START_PAGES.slice(0, 5));
    await touch(peer, [START_PAGES[5]!]);
    expect(await server.stats('ck')).toMatchObject({ state: 'serving', recordedBlocks: 6 });
    await server.stop('ck');
    await peer.exit();
  });

  it('a corrupt, truncated or mismatched set is warned about and the resume goes on without it', async () => {
    const good = encodePrefetch({ blockSize: PAGE, size: SIZE, blocks: START_PAGES });
    const cases: Array<[string, Buffer, RegExp]> = [
      ['truncated', good.subarray(0, good.length - 3), /truncated/],
      ['flipped', Buffer.from(good).fill(0x55, 40, 41), /checksum/],
      ['garbage', randomBytes(100), /bad magic/],
      [
        'other size',
        encodePrefetch({ blockSize: PAGE, size: SIZE * 2, blocks: START_PAGES }),
        /does not match the memfile header/,
      ],
    ];
    for (const [name, bytes, warning] of cases) {
      const buildId = randomUUID();
      const dir = join(server.bucket, buildId);
      mkdirSync(dir);
      writeFileSync(join(dir, 'memfile'), model);
      writeFileSync(join(dir, PREFETCH_FILE), bytes);
      const sandboxId = `corrupt-${name.replace(' ', '-')}`;
      const peer = await resume(sandboxId, buildId);
      await touch(peer, START_PAGES);
      expect(await server.stats(sandboxId)).toMatchObject({
        state: 'serving',
        prefetchSetBlocks: 0,
        faults: START_PAGES.length,
      });
      const log = server.service!.findLog((e) => e['sandboxId'] === sandboxId && e['level'] === 'warn');
      expect(JSON.stringify(log)).toMatch(warning);
      await server.stop(sandboxId);
      await peer.exit();
    }
  });

  it('a restart while the pass runs takes the sandbox back: it serves on, byte-exact, without recording', async () => {
    const g = randomUUID();
    const dir = join(server.bucket, g);
    mkdirSync(dir);
    writeFileSync(join(dir, 'memfile'), model);
    const all = Array.from({ length: SIZE / PAGE }, (_, i) => (i * 7919) % (SIZE / PAGE));
    writeFileSync(join(dir, PREFETCH_FILE), encodePrefetch({ blockSize: PAGE, size: SIZE, blocks: all }));
    const peer = await resume('restarted', g);
    // The handshake taken (and so recorded for the next process) before the crash.
    await server.waitFor('restarted', (s) => s.state === 'serving');
    await server.service!.stop('SIGKILL');
    server.service = await server.service!.restart();
    const st = await server.waitFor('restarted', (s) => s.state === 'serving');
    expect(st.recording).toBe(false);
    expect(await peer.command(`check ${modelFile} 0 ${SIZE}`)).toBe('ok');
    await server.stopSourcing('restarted');
    const exported = await unary(
      server.client,
      server.client.exportDiff,
      {
        sandboxId: 'restarted',
        newBuildId: randomUUID(),
        diffPath: join(server.dir, 'restarted.diff'),
        memfilePath: '',
        vmmDirtyLog: false,
        keepServing: false,
        dedup: false,
        prefetchPath: join(server.dir, 'restarted.prefetch'),
      },
      60_000,
    );
    // The recording lived in the process that died: no set is written rather than a partial one.
    expect(exported.prefetchBlocks).toBe(0);
    await server.stop('restarted');
    await peer.exit();
  });
});
