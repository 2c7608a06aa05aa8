import { randomBytes, randomUUID } from 'node:crypto';
import {
  closeSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  writeFileSync,
  writeSync,
  readFileSync,
  statSync,
} from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { UffdPeerProcess } from '#native';
import { baseMappings, encodeHeader, mergeMappings, NIL_UUID, type BuildMapping } from '#storage';
import { UffdServerProcess } from './uffd-server-process.js';
import { peerPattern } from './guest-writes.js';

/**
 * Must-show: serve, the guest writes known data, pause (stop sourcing), export the diff, merge
 * it over the parent's mappings, serve again from the merged layers and read back exactly, three
 * generations deep; with write tracking the diff holds exactly the written pages although the
 * server prefetched 2 MiB around every fault.
 */
const SIZE = 16 * 1024 * 1024;
const PAGE = 4096;

type Write = { offset: number; length: number } & ({ seed: number } | { byte: number });

describe('pause chain: serve, write, pause, export, merge, serve again', () => {
  const server = new UffdServerProcess();
  const peers: UffdPeerProcess[] = [];
  let model: Buffer;
  let base: string;

  beforeAll(async () => {
    await server.start(['--prefetch-bytes', String(2 * 1024 * 1024)]);
    base = randomUUID();
    mkdirSync(join(server.bucket, base));
    model = randomBytes(SIZE);
    writeFileSync(join(server.bucket, base, 'memfile'), model);
  });

  afterAll(async () => {
    for (const p of peers) p.kill();
    expect(await server.shutdown()).toBe(0);
  });

  function apply(w: Write): void {
    if ('seed' in w) peerPattern(w.length, w.seed).copy(model, w.offset);
    else model.fill(w.byte, w.offset, w.offset + w.length);
  }

  function pagesOf(writes: Write[]): Set<number> {
    const pages = new Set<number>();
    for (const w of writes) for (let p = Math.floor(w.offset / PAGE); p * PAGE < w.offset + w.length; p++) pages.add(p);
    return pages;
  }

  it('keeps every byte across three generations, and each diff is exactly the written pages', async () => {
    let parent = base;
    let mappings: BuildMapping[] = baseMappings(SIZE, base);
    const gens = [
      { tracking: 'wp-async', memfd: true },
      { tracking: 'wp-sync', memfd: false },
      { tracking: 'wp-async', memfd: false },
    ] as const;
    for (const [g, gen] of gens.entries()) {
      const sandboxId = `chain-${g}`;
      const socketPath = join(server.dir, `${sandboxId}.sock`);
      await server.prepare({ sandboxId, socketPath, buildId: parent });
      const peer = new UffdPeerProcess([
        '--socket',
        socketPath,
        '--size',
        String(SIZE),
        '--tracking',
        gen.tracking,
        ...(gen.memfd ? ['--memfd'] : []),
      ]);
      peers.push(peer);
      await peer.ready();
      // What the guest sees now is the previous generation's memory.
      const modelFile = join(server.dir, `model-${g}`);
      writeFileSync(modelFile, model);
      // A few reads only: most of memory stays absent (no page tables), which PAGEMAP_SCAN must not count as written.
      expect(await peer.command(`checkrand ${modelFile} ${g + 1} 3 12000`)).toBe('ok');
      const writes: Write[] = [
        { offset: (g * 37 + 5) * PAGE + 100, length: 300, seed: g + 10 }, // part of one page
        { offset: (g * 11 + 700) * PAGE, length: 3 * PAGE, seed: g + 20 }, // three whole pages
        { offset: (g * 13 + 2000) * PAGE + PAGE / 2, length: PAGE, seed: g + 30 }, // straddles two pages
        { offset: (g * 7 + 3000) * PAGE, length: 2 * PAGE, byte: 0 }, // zeroed: nil mappings
      ];
      for (const w of writes) {
        const cmd = 'seed' in w ? `write ${w.offset} ${w.length} ${w.seed}` : `fill ${w.offset} ${w.length} ${w.byte}`;
        expect(await peer.command(cmd)).toBe('ok');
        apply(w);
      }
      const written = pagesOf(writes);
      const serving = await server.stats(sandboxId);
      expect(serving.tracking).toBe(gen.tracking);
      expect(serving.prefetchPages).toBeGreaterThan(written.size * 10); // far more present than written

      await server.stopSourcing(sandboxId);
      // Without a memfd Firecracker writes the memory file; faults for it now get zero pages.
      let memfilePath = '';
      if (!gen.memfd) {
        memfilePath = join(server.dir, `full-${g}`);
        expect(await peer.command(`dump ${memfilePath}`)).toBe('ok');
      }
      const newBuild = randomUUID();
      mkdirSync(join(server.bucket, newBuild));
      const diffPath = join(server.bucket, newBuild, 'memfile');
      const exported = await server.exportDiff(sandboxId, newBuild, diffPath, memfilePath);
      expect(exported.tracking).toBe(gen.tracking);
      expect(exported.dirtyPages + exported.zeroPages).toBe(written.size);
      expect(exported.zeroPages).toBe(2);
      expect(exported.diffSize).toBe(exported.dirtyPages * PAGE);
      expect(statSync(diffPath).size).toBe(exported.diffSize);
      const mapped = new Set<number>();
      for (const m of exported.mappings)
        for (let o = m.offset; o < m.offset + m.length; o += PAGE) mapped.add(o / PAGE);
      expect([...mapped].sort((a, b) => a - b)).toEqual([...written].sort((a, b) => a - b));
      expect(exported.mappings.filter((m) => m.buildId === NIL_UUID).reduce((n, m) => n + m.length, 0)).toBe(2 * PAGE);
      // The diff's bytes are the written pages, in ascending order.
      const diff = readFileSync(diffPath);
      for (const m of exported.mappings.filter((x) => x.buildId !== NIL_UUID))
        expect(
          diff
            .subarray(m.buildStorageOffset, m.buildStorageOffset + m.length)
            .equals(model.subarray(m.offset, m.offset + m.length)),
        ).toBe(true);

      mappings = mergeMappings(mappings, exported.mappings);
      writeFileSync(
        join(server.bucket, newBuild, 'memfile.header'),
        encodeHeader({
          metadata: {
            version: 3,
            blockSize: PAGE,
            size: SIZE,
            generation: g + 1,
            buildId: newBuild,
            baseBuildId: base,
          },
          mappings,
        }),
      );
      await peer.exit();
      await server.stop(sandboxId);
      parent = newBuild;
    }

    // Generation 3 served from four layers: every byte as written.
    const socketPath = join(server.dir, 'final.sock');
    await server.prepare({ sandboxId: 'final', socketPath, buildId: parent });
    const peer = new UffdPeerProcess([
      '--socket',
      socketPath,
      '--size',
      String(SIZE),
      '--memfd',
      '--tracking',
      'wp-async',
    ]);
    peers.push(peer);
    await peer.ready();
    const finalModel = join(server.dir, 'model-final');
    writeFileSync(finalModel, model);
    expect(await peer.command(`check ${finalModel} 0 ${SIZE}`)).toBe('ok');
    await peer.exit();
    await server.stop('final');
  });

  it.each([false, true])(
    'pages the guest gave back (balloon, UFFD_EVENT_REMOVE) read as zeros and are in the diff as nil, memfd %s',
    async (memfd) => {
      const sandboxId = `balloon-${memfd}`;
      const socketPath = join(server.dir, `${sandboxId}.sock`);
      const baseFile = join(server.bucket, base, 'memfile');
      const baseBytes = readFileSync(baseFile);
      await server.prepare({ sandboxId, socketPath, buildId: base });
      const peer = new UffdPeerProcess([
        '--socket',
        socketPath,
        '--size',
        String(SIZE),
        '--tracking',
        'wp-async',
        '--events-remove',
        ...(memfd ? ['--memfd'] : []),
      ]);
      peers.push(peer);
      await peer.ready();
      const dropped = 1000 * PAGE;
      expect(await peer.command(`check ${baseFile} ${dropped} ${4 * PAGE}`)).toBe('ok');
      expect(await peer.command(`drop ${dropped} ${2 * PAGE}`)).toBe('ok');
      const expected = Buffer.from(baseBytes);
      expected.fill(0, dropped, dropped + 2 * PAGE);
      const expectedFile = join(server.dir, `${sandboxId}-expected`);
      writeFileSync(expectedFile, expected);
      expect(await peer.command(`check ${expectedFile} ${dropped - PAGE} ${4 * PAGE}`)).toBe('ok');
      await server.stopSourcing(sandboxId);
      let memfilePath = '';
      if (!memfd) {
        memfilePath = join(server.dir, `${sandboxId}-full`);
        expect(await peer.command(`dump ${memfilePath}`)).toBe('ok');
      }
      const exported = await server.exportDiff(
        sandboxId,
        randomUUID(),
        join(server.dir, `${sandboxId}.diff`),
        memfilePath,
      );
      expect(exported.dirtyPages).toBe(0);
      expect(exported.zeroPages).toBe(2);
      expect(exported.mappings).toEqual([
        { offset: dropped, length: 2 * PAGE, buildId: NIL_UUID, buildStorageOffset: 0 },
      ]);
      await peer.exit();
      await server.stop(sandboxId);
    },
  );

  it.each([false, true])(
    "without write-protect, the written pages come from the VMM's Diff snapshot (its dirty log), prefetch on, memfd %s",
    async (memfd) => {
      const sandboxId = `dirty-log-${memfd}`;
      const socketPath = join(server.dir, `${sandboxId}.sock`);
      await server.prepare({ sandboxId, socketPath, buildId: base });
      const peer = new UffdPeerProcess([
        '--socket',
        socketPath,
        '--size',
        String(SIZE),
        '--tracking',
        'none',
        ...(memfd ? ['--memfd'] : []),
      ]);
      peers.push(peer);
      await peer.ready();
      const baseFile = join(server.bucket, base, 'memfile');
      expect(await peer.command(`checkrand ${baseFile} 99 40 100`)).toBe('ok');
      expect(await peer.command(`write ${PAGE * 10} ${PAGE * 3} 7`)).toBe('ok');
      // A written page of zeros is a written page too (its parent's bytes are not).
      expect(await peer.command(`fill ${PAGE * 40} ${PAGE} 0`)).toBe('ok');
      const st = await server.stats(sandboxId);
      expect(st.tracking).toBe('present');
      expect(st.prefetchPages).toBeGreaterThan(0);
      const { pagesPresent } = await server.stopSourcing(sandboxId);
      expect(pagesPresent).toBeGreaterThan(40);
      // Firecracker's Diff with dirty tracking (dump_dirty): the written pages at their offsets,
      // holes elsewhere.
      const full = join(server.dir, `${sandboxId}-full`);
      expect(await peer.command(`dump ${full}`)).toBe('ok');
      const memory = readFileSync(full);
      const vmmDiff = join(server.dir, `${sandboxId}-vmm-diff`);
      const fd = openSync(vmmDiff, 'w');
      ftruncateSync(fd, SIZE);
      writeSync(fd, memory, PAGE * 10, PAGE * 3, PAGE * 10);
      writeSync(fd, memory, PAGE * 40, PAGE, PAGE * 40);
      closeSync(fd);
      const diffPath = join(server.dir, `${sandboxId}.diff`);
      const exported = await server.exportDiff(sandboxId, randomUUID(), diffPath, vmmDiff, true);
      expect(exported.tracking).toBe('vmm-dirty-log');
      expect(exported.dirtyPages).toBe(3);
      expect(exported.zeroPages).toBe(1);
      expect(readFileSync(diffPath).equals(memory.subarray(PAGE * 10, PAGE * 13))).toBe(true);
      expect(exported.mappings.map((m) => [m.offset, m.length, m.buildId === NIL_UUID])).toEqual([
        [PAGE * 10, PAGE * 3, false],
        [PAGE * 40, PAGE, true],
      ]);
      await peer.exit();
      await server.stop(sandboxId);
    },
  );

  it("without write-protect and without the VMM's dirty log, every present page is exported (the fallback)", async () => {
    const socketPath = join(server.dir, 'present.sock');
    await server.prepare({ sandboxId: 'present', socketPath, buildId: base });
    const peer = new UffdPeerProcess(['--socket', socketPath, '--size', String(SIZE), '--tracking', 'none', '--memfd']);
    peers.push(peer);
    await peer.ready();
    const baseFile = join(server.bucket, base, 'memfile');
    expect(await peer.command(`checkrand ${baseFile} 99 40 100`)).toBe('ok');
    expect(await peer.command(`write ${PAGE * 10} 10 1`)).toBe('ok');
    const st = await server.stats('present');
    expect(st.tracking).toBe('present');
    const { pagesPresent } = await server.stopSourcing('present');
    expect(pagesPresent).toBeGreaterThanOrEqual(st.presentPages);
    const diffPath = join(server.dir, 'present.diff');
    const exported = await server.exportDiff('present', randomUUID(), diffPath);
    expect(exported.tracking).toBe('present');
    expect(exported.dirtyPages + exported.zeroPages).toBe(pagesPresent);
    await peer.exit();
    await server.stop('present');
  });
});
