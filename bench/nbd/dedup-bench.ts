/**
 * Disk export dedup benchmark: block-server's dirty-block export of a device over a local build
 * (BuildStore, header mappings, copy-on-write overlay: the service's own stack, in process),
 * with and without dedup against the parent, on a guest that rewrites identical data.
 *
 *   bash bench/nbd/run.sh dedup [--size-mib 256] [--identical-mib 64] [--changed-mib 8] [--rounds 3]
 *
 * Per round, fresh devices over one base build, the same writes each:
 *  - identical: `identical` MiB rewritten with the bytes already there + `changed` MiB new;
 *    exported without and with dedup (diff bytes, export ms);
 *  - changed: (identical + changed) MiB all new, without and with dedup: the compare's pure
 *    cost, nothing to find;
 *  - after a checkpoint: the same identical + changed writes, a checkpoint, then `changed` MiB
 *    elsewhere; the next pause over the checkpoint (tracking restarted: only the later writes)
 *    against the whole since-open set (what the export held before the restart).
 * The base build's bytes are in the page cache for every run.
 */
import { randomBytes } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { createLogger } from '#logging';
import { BuildStore, baseMappings, encodeHeader, mergeMappings, newBuildId, type BuildMapping } from '#storage';
import { DeviceManager } from '../../apps/block-server/src/device-manager.js';

const MiB = 1024 * 1024;
const BS = 4096;

const { values } = parseArgs({
  options: {
    'size-mib': { type: 'string', default: '256' },
    'identical-mib': { type: 'string', default: '64' },
    'changed-mib': { type: 'string', default: '8' },
    rounds: { type: 'string', default: '3' },
  },
});
const size = Number(values['size-mib']) * MiB;
const identical = Number(values['identical-mib']) * MiB;
const changed = Number(values['changed-mib']) * MiB;
const rounds = Number(values.rounds);
if (identical + changed > size) throw new Error('identical + changed must fit in the device');

interface Sample {
  bytes: number;
  ms: number;
}
const samples = new Map<string, Sample[]>();
const record = (name: string, s: Sample): void => void samples.set(name, [...(samples.get(name) ?? []), s]);

const work = await mkdtemp(join(tmpdir(), 'bench-dedup-'));
const cacheDir = join(work, 'cache');
const baseId = newBuildId();
await mkdir(join(cacheDir, 'builds', baseId), { recursive: true });
const baseBytes = randomBytes(size);
await writeFile(join(cacheDir, 'builds', baseId, 'rootfs.ext4'), baseBytes);
await readFile(join(cacheDir, 'builds', baseId, 'rootfs.ext4'));
const manager = new DeviceManager({
  dataDir: join(work, 'data'),
  nbdDir: join(work, 'nbd'),
  builds: new BuildStore({ cacheDir, owner: 'bench' }),
  logger: createLogger({ service: 'dedup-bench', level: 'warn' }),
  releaseTimeoutMs: 5000,
});

let sandboxes = 0;
async function openDevice() {
  const sandboxId = `dedup-${++sandboxes}`;
  return { sandboxId, device: await manager.open({ sandboxId, buildId: baseId }) };
}

type Device = Awaited<ReturnType<typeof openDevice>>['device'];

/** Identical rewrites at the front of the device, the changed bytes right after them, 1 MiB writes. */
async function guestWrites(device: Device, allNew: boolean): Promise<void> {
  for (let at = 0; at < identical + changed; at += MiB) {
    const n = Math.min(MiB, identical + changed - at);
    const bytes = !allNew && at < identical ? baseBytes.subarray(at, at + n) : randomBytes(n);
    await device.overlay.writeAt(bytes, at);
  }
}

/** `changed` MiB of new bytes past the first writes (wrapping at the device end). */
async function laterWrites(device: Device): Promise<void> {
  for (let done = 0; done < changed; done += MiB) {
    const at = (identical + changed + done) % size;
    await device.overlay.writeAt(randomBytes(Math.min(MiB, changed - done, size - at)), at);
  }
}

async function exportOnce(
  sandboxId: string,
  options: { parentBuildId: string; dedup: boolean; keepServing?: boolean },
) {
  const id = newBuildId();
  const diffPath = join(cacheDir, 'builds', id, 'rootfs.ext4');
  const started = performance.now();
  const result = await manager.export(sandboxId, id, diffPath, options);
  return { id, result, ms: performance.now() - started };
}

for (let round = 0; round < rounds; round++) {
  for (const allNew of [false, true]) {
    for (const dedup of [false, true]) {
      const { sandboxId, device } = await openDevice();
      await guestWrites(device, allNew);
      const { result, ms } = await exportOnce(sandboxId, { parentBuildId: baseId, dedup });
      record(`${allNew ? 'changed' : 'identical'} ${dedup ? 'dedup' : 'plain'}`, { bytes: result.diffSize, ms });
    }
  }
  for (const overCheckpoint of [false, true]) {
    const { sandboxId, device } = await openDevice();
    await guestWrites(device, false);
    const cp = await exportOnce(sandboxId, { parentBuildId: baseId, dedup: true, keepServing: true });
    const mappings: BuildMapping[] = mergeMappings(baseMappings(size, baseId), cp.result.mappings);
    const header = {
      metadata: { version: 3, blockSize: BS, size, generation: 1, buildId: cp.id, baseBuildId: baseId },
      mappings,
    };
    await writeFile(join(cacheDir, 'builds', cp.id, 'rootfs.ext4.header'), encodeHeader(header));
    await laterWrites(device);
    // Over the base: what a pause after a checkpoint exported before tracking restarted (every
    // block since open; here the base is a valid parent too, the checkpoint's blocks only add to it).
    const { result, ms } = await exportOnce(sandboxId, {
      parentBuildId: overCheckpoint ? cp.id : baseId,
      dedup: false,
    });
    record(`after checkpoint ${overCheckpoint ? 'since checkpoint' : 'since open'}`, { bytes: result.diffSize, ms });
  }
}
await manager.shutdown();
await rm(work, { recursive: true, force: true });

const median = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const row = (name: string): { mib: string; ms: string } => {
  const s = samples.get(name)!;
  return { mib: (median(s.map((x) => x.bytes)) / MiB).toFixed(2), ms: median(s.map((x) => x.ms)).toFixed(0) };
};
console.log(`\n== disk export dedup: ${size / MiB} MiB device over a local build, ${rounds} rounds (medians)`);
console.log(`${'workload'.padEnd(52)} ${'diff MiB'.padStart(9)} ${'export ms'.padStart(10)}`);
const lines: Array<[string, string]> = [
  [`${identical / MiB} MiB rewritten identical + ${changed / MiB} MiB changed, no dedup`, 'identical plain'],
  [`${identical / MiB} MiB rewritten identical + ${changed / MiB} MiB changed, dedup`, 'identical dedup'],
  [`${(identical + changed) / MiB} MiB all changed, no dedup`, 'changed plain'],
  [`${(identical + changed) / MiB} MiB all changed, dedup (compare, nothing found)`, 'changed dedup'],
  [`pause after a checkpoint, every block since open`, 'after checkpoint since open'],
  [`pause after a checkpoint, tracking restarted`, 'after checkpoint since checkpoint'],
];
for (const [label, name] of lines) {
  const r = row(name);
  console.log(`${label.padEnd(52)} ${r.mib.padStart(9)} ${r.ms.padStart(10)}`);
}
console.log(`(uptime: ${execFileSync('uptime', { encoding: 'utf8' }).trim()})`);
