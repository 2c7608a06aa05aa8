/**
 * Layered read benchmark: a 10-generation pause chain read through our LayeredFile (BuildStore,
 * local builds, header mappings) against the same chain as a qcow2 backing chain read by
 * qemu-img bench (the named peer: QEMU's own layered copy-on-write reader), same data, same run,
 * page cache warm for both. Reports sequential 1 MiB reads and scattered 4 KiB reads at queue
 * depth 1 and 32, with the ratio ours / qemu.
 *
 *   bash bench/storage/run.sh [--size-mib 128] [--generations 10] [--dirty-percent 2] [--reads 20000] [--rounds 3]
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { promisify } from 'node:util';
import {
  BuildStore,
  createMappings,
  type Header,
  LocalBackend,
  mergeMappings,
  baseMappings,
  newBuildId,
} from '#storage';

const run = promisify(execFile);
const BLOCK = 4096;
const MiB = 1024 * 1024;

interface Result {
  name: string;
  ours: number;
  qemu: number;
  unit: string;
}

async function qemuBench(image: string, args: string[]): Promise<number> {
  const { stdout } = await run(
    'qemu-img',
    ['bench', '-f', 'qcow2', '-t', 'writeback', '-i', 'threads', ...args, image],
    {
      maxBuffer: 1 << 20,
    },
  );
  const m = /Run completed in ([\d.]+) seconds/.exec(stdout);
  if (m === null) throw new Error(`unexpected qemu-img bench output: ${stdout}`);
  return Number(m[1]);
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      'size-mib': { type: 'string', default: '128' },
      generations: { type: 'string', default: '10' },
      'dirty-percent': { type: 'string', default: '2' },
      reads: { type: 'string', default: '20000' },
      rounds: { type: 'string', default: '3' },
    },
  });
  const size = Number(values['size-mib']) * MiB;
  const generations = Number(values.generations);
  const dirtyPercent = Number(values['dirty-percent']);
  const reads = Number(values.reads);
  const rounds = Number(values.rounds);
  const blocks = size / BLOCK;
  const work = await mkdtemp(path.join(tmpdir(), 'bench-storage-'));
  const store = new BuildStore({
    backend: new LocalBackend(path.join(work, 'bucket')),
    cacheDir: path.join(work, 'cache'),
    owner: 'bench',
  });
  try {
    console.log(
      `== chain: ${size / MiB} MiB base, ${generations} generations, ~${dirtyPercent}% of 4 KiB blocks dirty each (in runs of 1-16) in ${work}`,
    );
    const baseId = newBuildId();
    await writeFile(path.join(await store.stageBuild(baseId), 'rootfs.ext4'), randomBytes(size));
    await store.commitBuild(baseId, {});
    const baseDir = store.localDir(baseId);
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'qcow2',
      '-o',
      'cluster_size=65536',
      '-b',
      path.join(baseDir, 'rootfs.ext4'),
      '-F',
      'raw',
      path.join(work, 'g0.qcow2'),
    ]);
    let header: Header = {
      metadata: { version: 3, blockSize: BLOCK, size, generation: 0, buildId: baseId, baseBuildId: baseId },
      mappings: baseMappings(size, baseId),
    };
    let top = path.join(work, 'g0.qcow2');
    for (let g = 1; g <= generations; g++) {
      const dirty = new Set<number>();
      while (dirty.size < (blocks * dirtyPercent) / 100) {
        const start = Math.floor(Math.random() * blocks);
        const run = 1 + Math.floor(Math.random() * 16);
        for (let b = start; b < Math.min(blocks, start + run); b++) dirty.add(b);
      }
      const sorted = [...dirty].sort((a, b) => a - b);
      const id = newBuildId();
      const dir = await store.stageBuild(id);
      const pattern = g & 0xff;
      await writeFile(path.join(dir, 'rootfs.ext4'), Buffer.alloc(sorted.length * BLOCK, pattern));
      header = {
        metadata: { ...header.metadata, generation: g, buildId: id },
        mappings: mergeMappings(header.mappings, createMappings(sorted, BLOCK, id)),
      };
      await store.commitBuild(id, { 'rootfs.ext4': header });
      // the same writes as a qcow2 layer over the previous one
      const layer = path.join(work, `g${g}.qcow2`);
      await run('qemu-img', [
        'create',
        '-q',
        '-f',
        'qcow2',
        '-o',
        'cluster_size=65536',
        '-b',
        top,
        '-F',
        'qcow2',
        layer,
      ]);
      const cmds: string[] = [];
      for (const m of createMappings(sorted, BLOCK, id))
        cmds.push('-c', `write -q -P ${pattern} ${m.offset} ${m.length}`);
      for (let i = 0; i < cmds.length; i += 2000) {
        await run('qemu-io', ['-f', 'qcow2', ...cmds.slice(i, i + 2000), layer], { maxBuffer: 16 << 20 });
      }
      top = layer;
    }
    console.log(`   header: ${header.mappings.length} mappings; qcow2 chain depth ${generations + 1}`);

    const { file } = await store.openBuildFile(header.metadata.buildId, 'rootfs.ext4');
    // warm both page caches, and check both readers see the same bytes at a few places
    const whole = Buffer.alloc(MiB);
    for (let o = 0; o < size; o += MiB) await file.readAt(whole, o);
    await qemuBench(top, ['-c', String(size / MiB), '-s', String(MiB), '-d', '1']);
    for (const probe of [0, Math.floor(blocks / 3) * BLOCK, (blocks - 1) * BLOCK]) {
      const ours = Buffer.alloc(BLOCK);
      await file.readAt(ours, probe);
      const { stdout } = await run('qemu-io', ['-r', '-f', 'qcow2', '-c', `read -v ${probe} 16`, top]);
      const qemuHex = [...stdout.matchAll(/^[0-9a-f]{8}:\s+((?:[0-9a-f]{2}\s)+)/gm)]
        .map((x) => x[1]!.replace(/\s/g, ''))
        .join('');
      if (qemuHex !== ours.subarray(0, 16).toString('hex')) throw new Error(`readers disagree at ${probe}`);
    }

    // Each measurement alternates ours and qemu `rounds` times and keeps the medians: the machine
    // is shared, and alternating spreads its load over both sides.
    const results: Result[] = [];
    const passes = 2;
    const step = 7919 * BLOCK; // qemu-img bench steps by a large stride; ours reads the same offsets
    const offsets = Array.from({ length: reads }, (_, i) => ((i * step) % size) - (((i * step) % size) % BLOCK));
    const oursSeq = async (): Promise<number> => {
      const t = performance.now();
      for (let p = 0; p < passes; p++) for (let o = 0; o < size; o += MiB) await file.readAt(whole, o);
      return (passes * size) / MiB / ((performance.now() - t) / 1000);
    };
    const qemuSeq = async (): Promise<number> =>
      (passes * size) /
      MiB /
      (await qemuBench(top, ['-c', String((passes * size) / MiB), '-s', String(MiB), '-d', '1']));
    const oursScattered = async (depth: number): Promise<number> => {
      const t = performance.now();
      let next = 0;
      await Promise.all(
        Array.from({ length: depth }, async () => {
          const buf = Buffer.alloc(BLOCK);
          while (next < offsets.length) await file.readAt(buf, offsets[next++]!);
        }),
      );
      return reads / ((performance.now() - t) / 1000);
    };
    const qemuScattered = async (depth: number): Promise<number> =>
      reads /
      (await qemuBench(top, ['-c', String(reads), '-s', String(BLOCK), '-S', String(step), '-d', String(depth)]));
    const measure = async (name: string, unit: string, ours: () => Promise<number>, qemu: () => Promise<number>) => {
      const o: number[] = [];
      const q: number[] = [];
      for (let r = 0; r < rounds; r++) {
        o.push(await ours());
        q.push(await qemu());
      }
      results.push({ name, unit, ours: median(o), qemu: median(q) });
    };
    await measure('sequential 1 MiB reads, depth 1', 'MiB/s', oursSeq, qemuSeq);
    for (const depth of [1, 32]) {
      await measure(
        `scattered 4 KiB reads, depth ${depth}`,
        'IOPS',
        () => oursScattered(depth),
        () => qemuScattered(depth),
      );
    }
    await file.close();

    console.log('');
    console.log(`${'test'.padEnd(36)} ${'ours'.padStart(12)} ${'qemu-img'.padStart(12)}  ratio (ours/qemu)`);
    for (const r of results) {
      console.log(
        `${r.name.padEnd(36)} ${r.ours.toFixed(0).padStart(7)} ${r.unit.padEnd(5)}${r.qemu.toFixed(0).padStart(7)} ${r.unit.padEnd(5)} ${(r.ours / r.qemu).toFixed(2)}`,
      );
    }
    console.log(`(medians of ${rounds} alternating rounds on a shared 2-core machine under load from other work)`);
  } finally {
    await store.close();
    await rm(work, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
