/**
 * Cold resume from the bucket (issue 17): a 1 GiB build whose guest touches 100 MiB at start,
 * resumed on a node with an empty cache from a bucket with real latency (a local-directory
 * bucket behind DelayedBackend, or fake-gcs-server behind a delaying TCP proxy), 5 ms and 50 ms
 * per request. Before (today's fetch path: 4 MiB chunks, each its own request, only what faults
 * ask for) and after (parallel coalesced fetches, read-ahead, and the recorded prefetch set
 * first), in the same run.
 *
 * What is timed is the storage side of a resume, with the real BuildStore and chunk caches:
 * resolve the snapshot (snapfile, both headers), read the recorded prefetch set, then the
 * guest's start: one vCPU faulting the working set page after page, each fault waiting until
 * its uffd-server window (--prefetch-bytes, 2 MiB, cut to the chunk size as the uffd-server
 * does over a layer still fetched from the bucket) is in the cache,
 * as the uffd-server's fault path does (SourceView.ensure, then UFFDIO_COPY from the mapping,
 * which costs well under a millisecond per window and is left out). The orchestrator's own
 * steps (VMM, envd /init) add what bench/orchestrator measures for a warm create.
 *
 *   bash bench/cold-resume/run.sh [--delays 5,50] [--size-mib 1024] [--touch-mib 100]
 *       [--run-kib 256-4096] [--fault-window-kib 2048] [--chunk-kib 1024,256] [--bucket local|gcs]
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import {
  baseHeader,
  BuildStore,
  type CachedFile,
  DEFAULT_FETCH_POLICY,
  DEMAND_ONLY_FETCH_POLICY,
  encodeHeader,
  encodePrefetch,
  type FetchPolicy,
  newBuildId,
  type DelayedBackend,
} from '#storage';
import { startBucketPeer } from './bucket-peer.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;

interface Variant {
  name: string;
  chunkSize: number;
  fetch: FetchPolicy;
  recordedPrefetch: boolean;
}

/** xorshift32: the same working set every run. */
function rng(seed: number): () => number {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/**
 * The pages the guest touches at start, in the order it touches them: runs of `minRun..maxRun`
 * bytes at random page-aligned places (no two overlapping), the runs in random order, each
 * run's pages in order — a kernel, page cache and heaps touched as a program starts.
 */
function workingSet(size: number, touch: number, minRun: number, maxRun: number): number[] {
  const random = rng(20261202);
  const taken = new Uint8Array(size / PAGE);
  const runs: number[][] = [];
  let total = 0;
  while (total < touch) {
    const pages = Math.min(
      Math.max(1, Math.round((minRun + random() * (maxRun - minRun)) / PAGE)),
      (touch - total) / PAGE,
    );
    const first = Math.floor(random() * (taken.length - pages));
    let free = true;
    for (let p = first; p < first + pages && free; p++) free = taken[p] === 0;
    if (!free) continue;
    const run: number[] = [];
    for (let p = first; p < first + pages; p++) {
      taken[p] = 1;
      run.push(p);
    }
    runs.push(run);
    total += pages * PAGE;
  }
  return runs.flat();
}

/** Writes the build into the bucket directory: memfile (data where touched, holes elsewhere), headers, snapfile. */
async function writeBuild(root: string, id: string, size: number, pages: number[]): Promise<Buffer> {
  const dir = path.join(root, id);
  await mkdir(dir, { recursive: true });
  const fh = await open(path.join(dir, 'memfile'), 'w');
  const page = Buffer.alloc(PAGE);
  const digest = createHash('sha256');
  try {
    await fh.truncate(size);
    for (const p of [...pages].sort((a, b) => a - b)) {
      page.fill(0);
      page.writeUInt32LE(p, 0);
      page.writeUInt32LE(0x5a5a5a5a ^ p, PAGE - 4);
      await fh.write(page, 0, PAGE, p * PAGE);
    }
  } finally {
    await fh.close();
  }
  for (const p of pages) {
    page.fill(0);
    page.writeUInt32LE(p, 0);
    page.writeUInt32LE(0x5a5a5a5a ^ p, PAGE - 4);
    digest.update(page);
  }
  await writeFile(path.join(dir, 'memfile.header'), encodeHeader(baseHeader(id, size, PAGE)));
  await writeFile(path.join(dir, 'rootfs.ext4'), Buffer.alloc(MiB));
  await writeFile(path.join(dir, 'snapfile'), Buffer.alloc(64 * KiB, 1));
  return digest.digest();
}

async function resume(
  backend: DelayedBackend,
  variant: Variant,
  id: string,
  pages: number[],
  faultWindow: number,
  expected: Buffer,
): Promise<{ ms: number; resolveMs: number; requests: number; fetched: number }> {
  const cacheDir = await mkdtemp(path.join(tmpdir(), 'sbx-cold-resume-cache-'));
  const store = new BuildStore({
    backend,
    cacheDir,
    owner: 'uffd-server',
    chunkSize: variant.chunkSize,
    fetch: variant.fetch,
  });
  const before = { ...backend.counters };
  try {
    const t0 = performance.now();
    const [, set, opened] = await Promise.all([
      store.resolveSnapshot(id),
      variant.recordedPrefetch ? store.readPrefetch(id) : undefined,
      store.openBuildFile(id, 'memfile'),
    ]);
    const spans = await opened.file.mappedSpans();
    const file = spans[0]!.file as CachedFile;
    const resolveMs = performance.now() - t0;
    if (set !== undefined) {
      // Not awaited: faults go on meanwhile and come first.
      void opened.file.prefetch(set.blocks.map((b) => ({ offset: b * set.blockSize, length: set.blockSize })));
    }
    // The uffd-server cuts its fault window to the chunk of a layer still being fetched.
    const window = Math.min(faultWindow, variant.chunkSize);
    const ready = new Set<number>();
    for (const p of pages) {
      const w = Math.floor((p * PAGE) / window);
      if (ready.has(w)) continue;
      const offset = w * window;
      await file.ensure(offset, Math.min(window, opened.file.size - offset));
      ready.add(w);
    }
    const ms = performance.now() - t0;
    // The guest saw the build's bytes: every touched page, read back through the layers.
    const digest = createHash('sha256');
    const page = Buffer.alloc(PAGE);
    for (const p of pages) {
      await opened.file.readAt(page, p * PAGE);
      digest.update(page);
    }
    if (!digest.digest().equals(expected)) throw new Error(`${variant.name}: the touched pages differ from the build`);
    return {
      ms,
      resolveMs,
      requests: backend.counters.requests - before.requests,
      fetched: backend.counters.rangeBytes - before.rangeBytes,
    };
  } finally {
    await store.close();
    await rm(cacheDir, { recursive: true, force: true });
  }
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      delays: { type: 'string', default: '5,50' },
      'size-mib': { type: 'string', default: '1024' },
      'touch-mib': { type: 'string', default: '100' },
      'run-kib': { type: 'string', default: '256-4096' },
      'fault-window-kib': { type: 'string', default: '2048' },
      'chunk-kib': { type: 'string', default: '1024,256' },
      bucket: { type: 'string', default: 'local' },
    },
  });
  const size = Number(values['size-mib']) * MiB;
  const touch = Number(values['touch-mib']) * MiB;
  const [minRun, maxRun] = values['run-kib']!.split('-').map((v) => Number(v) * KiB) as [number, number];
  const faultWindow = Number(values['fault-window-kib']) * KiB;
  if (!(touch > 0 && touch <= size && minRun >= PAGE && maxRun >= minRun && faultWindow >= PAGE))
    throw new Error('bad sizes: need 4 KiB <= run-kib min <= max, touch-mib <= size-mib, fault-window-kib >= 4');
  const chunkKibs = values['chunk-kib']!.split(',').map(Number);

  const work = await mkdtemp(path.join(tmpdir(), 'sbx-cold-resume-'));
  const bucketDir = path.join(work, 'bucket');
  const id = newBuildId();
  const pages = workingSet(size, touch, minRun, maxRun);
  const expected = await writeBuild(bucketDir, id, size, pages);
  const touched = pages.length * PAGE;
  // The recorded prefetch set: what this guest faulted at its last start, first fault first.
  await writeFile(
    path.join(bucketDir, id, 'memfile.prefetch'),
    encodePrefetch({ blockSize: PAGE, size, blocks: pages }),
  );
  const peer = await startBucketPeer(values.bucket!, bucketDir, id);
  const variants: Variant[] = [
    {
      name: 'before: 4 MiB chunks, demand only',
      chunkSize: 4 * MiB,
      fetch: DEMAND_ONLY_FETCH_POLICY,
      recordedPrefetch: false,
    },
    ...chunkKibs.flatMap((kib) => [
      {
        name: `after: ${kib} KiB chunks, read-ahead`,
        chunkSize: kib * KiB,
        fetch: DEFAULT_FETCH_POLICY,
        recordedPrefetch: false,
      },
      {
        name: `after: ${kib} KiB chunks, read-ahead + recorded set`,
        chunkSize: kib * KiB,
        fetch: DEFAULT_FETCH_POLICY,
        recordedPrefetch: true,
      },
    ]),
  ];
  console.log(
    `cold resume: ${size / MiB} MiB build, ${(touched / MiB).toFixed(1)} MiB touched at start in ${pages.length} pages` +
      ` (runs ${minRun / KiB}-${maxRun / KiB} KiB), fault window ${faultWindow / KiB} KiB, bucket ${peer.name};` +
      ` fetch policy after: ${DEFAULT_FETCH_POLICY.concurrency} requests in flight, ≤ ${DEFAULT_FETCH_POLICY.maxRequestBytes / MiB} MiB each, read-ahead ≤ ${DEFAULT_FETCH_POLICY.readAheadBytes / MiB} MiB`,
  );
  try {
    for (const delay of values.delays!.split(',').map(Number)) {
      console.log(`\n== ${delay} ms per bucket request ==`);
      console.log(
        `${'variant'.padEnd(52)} ${'ready ms'.padStart(9)} ${'resolve'.padStart(8)} ${'requests'.padStart(9)} ${'fetched MiB'.padStart(12)} ${'touched MiB'.padStart(12)} ${'ratio'.padStart(6)}`,
      );
      for (const variant of variants) {
        const backend = await peer.backend(delay);
        try {
          const r = await resume(backend, variant, id, pages, faultWindow, expected);
          console.log(
            `${variant.name.padEnd(52)} ${r.ms.toFixed(0).padStart(9)} ${r.resolveMs.toFixed(0).padStart(8)} ${String(r.requests).padStart(9)} ${(r.fetched / MiB).toFixed(1).padStart(12)} ${(touched / MiB).toFixed(1).padStart(12)} ${(r.fetched / touched).toFixed(2).padStart(6)}`,
          );
        } finally {
          await backend.close();
        }
      }
    }
    console.log('\ngoal (50 ms per request): ready ≤ 1500 ms, fetched ≤ 1.5 × touched');
  } finally {
    await peer.stop();
    await rm(work, { recursive: true, force: true });
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
