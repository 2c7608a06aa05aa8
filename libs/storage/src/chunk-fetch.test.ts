import { readdir } from 'node:fs/promises';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { baseHeader } from './header-codec.js';
import { backendSource, ChunkCache, type ChunkSource } from './chunk-cache.js';
import { DelayedBackend } from './delayed-backend.js';
import { DEMAND_ONLY_FETCH_POLICY, type FetchPolicy } from './fetch-policy.js';
import { LayeredFile } from './layered-file.js';
import { LocalBackend } from './local-backend.js';
import { ObjectNotFound, StorageClosed, StorageUnavailable } from './storage-errors.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const FAST_RETRY = { attempts: 3, initialDelayMs: 1, maxDelayMs: 2, multiplier: 2 };

/** Deterministic bytes (xorshift), so a misplaced piece cannot match by chance. */
function pseudoRandom(size: number, seed: number): Buffer {
  const out = Buffer.alloc(size);
  let x = seed | 1;
  for (let i = 0; i + 4 <= size; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.writeInt32LE(x | 0, i);
  }
  return out;
}

function rng(seed: number): () => number {
  let x = seed | 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

/** A source that records each range request, how many overlap, and fails ranges on demand. */
class RecordingSource implements ChunkSource {
  readonly requests: Array<{ offset: number; length: number }> = [];
  inFlight = 0;
  maxInFlight = 0;
  /** Decides per request whether it fails, and how. */
  fail: (offset: number, length: number) => Error | undefined = () => undefined;
  constructor(private readonly inner: ChunkSource) {}
  async readRange(offset: number, length: number): Promise<Buffer> {
    this.requests.push({ offset, length });
    this.inFlight++;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      const bytes = await this.inner.readRange(offset, length);
      const err = this.fail(offset, length);
      if (err !== undefined) throw err;
      return bytes;
    } finally {
      this.inFlight--;
    }
  }
  /** How many requests covered each chunk. */
  coverage(chunkSize: number): Map<number, number> {
    const out = new Map<number, number>();
    for (const r of this.requests)
      for (let c = r.offset / chunkSize; c < Math.ceil((r.offset + r.length) / chunkSize); c++)
        out.set(c, (out.get(c) ?? 0) + 1);
    return out;
  }
}

let dir: string;
let bucket: LocalBackend;
const data = pseudoRandom(24 * MiB + 12 * KiB, 7);

beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sbx-chunk-fetch-'));
  bucket = new LocalBackend(path.join(dir, 'bucket'));
  await bucket.write('b/memfile', data);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

let n = 0;
async function openCache(source: ChunkSource, fetch: FetchPolicy, chunkSize = 256 * KiB): Promise<ChunkCache> {
  return ChunkCache.open({
    source,
    size: data.length,
    cachePath: path.join(dir, 'cache', `c${n++}`),
    chunkSize,
    fetch,
    retry: FAST_RETRY,
  });
}

const POLICY: FetchPolicy = { concurrency: 4, maxRequestBytes: MiB, readAheadBytes: 2 * MiB };

describe('ChunkCache fetching in parallel', () => {
  it('returns byte-exact data for random reads under a delayed bucket, each chunk fetched once, within the bound', async () => {
    const delayed = new DelayedBackend(bucket, 5);
    const source = new RecordingSource(backendSource(delayed, 'b/memfile'));
    const cache = await openCache(source, POLICY);
    const random = rng(42);
    const reads = Array.from({ length: 120 }, () => {
      const length = 1 + Math.floor(random() * 300 * KiB);
      const offset = Math.floor(random() * (data.length - length));
      const out = Buffer.alloc(length);
      return cache.readAt(out, offset).then(() => ({ out, offset }));
    });
    const prefetched = cache.prefetch([{ offset: 3 * MiB + 17, length: 2 * MiB }]);
    for (const { out, offset } of await Promise.all(reads))
      expect(out.equals(data.subarray(offset, offset + out.length))).toBe(true);
    expect((await prefetched).failed).toBe(0);
    expect([...source.coverage(256 * KiB).values()].every((count) => count === 1)).toBe(true);
    expect(source.maxInFlight).toBeLessThanOrEqual(4);
    expect(source.maxInFlight).toBeGreaterThan(1);
    expect(cache.stats.bytesFetched).toBeLessThanOrEqual(data.length);
    // and the whole object afterwards, through what is there and what is not
    const whole = Buffer.alloc(data.length);
    await cache.readAt(whole, 0);
    expect(whole.equals(data)).toBe(true);
    expect(cache.stats.bytesFetched).toBe(data.length);
    expect(delayed.counters.rangeBytes).toBe(data.length);
    await cache.close();
  });

  it('fetches a chunk in flight once: readers, the prefetch set and read-ahead all wait on the same request', async () => {
    const source = new RecordingSource(backendSource(new DelayedBackend(bucket, 20), 'b/memfile'));
    const cache = await openCache(source, { concurrency: 8, maxRequestBytes: 256 * KiB, readAheadBytes: 4 * MiB });
    const prefetch = cache.prefetch([{ offset: 0, length: 2 * MiB }]);
    // sequential readers over the same chunks while the prefetch is in flight: read-ahead too
    const outs = await Promise.all(
      Array.from({ length: 16 }, async (_, i) => {
        const out = Buffer.alloc(128 * KiB);
        await cache.readAt(out, i * 128 * KiB);
        return out;
      }),
    );
    outs.forEach((out, i) => expect(out.equals(data.subarray(i * 128 * KiB, (i + 1) * 128 * KiB))).toBe(true));
    await prefetch;
    const coverage = source.coverage(256 * KiB);
    for (let c = 0; c < 8; c++) expect(coverage.get(c)).toBe(1);
    await cache.close();
  });

  it('coalesces adjacent chunks into one request up to the limit, and a demand-only policy does not', async () => {
    const source = new RecordingSource(backendSource(bucket, 'b/memfile'));
    const cache = await openCache(source, { concurrency: 1, maxRequestBytes: MiB, readAheadBytes: 0 });
    await cache.prefetch([{ offset: 0, length: 3 * MiB }]);
    expect(source.requests.map((r) => r.length)).toEqual([MiB, MiB, MiB]);
    await cache.close();

    const one = new RecordingSource(backendSource(bucket, 'b/memfile'));
    const before = await openCache(one, DEMAND_ONLY_FETCH_POLICY);
    await before.ensure(0, MiB);
    expect(one.requests.map((r) => r.length)).toEqual([256 * KiB, 256 * KiB, 256 * KiB, 256 * KiB]);
    await before.close();
  });

  it('reads ahead of a sequential reader in growing windows, and not ahead of a random one', async () => {
    const seq = new RecordingSource(backendSource(bucket, 'b/memfile'));
    const cache = await openCache(seq, { concurrency: 4, maxRequestBytes: 256 * KiB, readAheadBytes: 2 * MiB });
    for (let at = 0; at < 4 * MiB; at += 4 * KiB) await cache.ensure(at, 4 * KiB);
    // far fewer round trips than chunks: most chunks were there when the reader came
    const demand = cache.stats.requests - cache.stats.chunksAhead;
    expect(demand).toBeLessThan(6);
    expect(cache.stats.chunksAhead).toBeGreaterThan(8);
    // what was fetched past the reader is at most one window
    expect(cache.stats.bytesFetched).toBeLessThanOrEqual(4 * MiB + 2 * MiB);
    await cache.close();

    const random = new RecordingSource(backendSource(bucket, 'b/memfile'));
    const sparse = await openCache(random, { concurrency: 4, maxRequestBytes: 256 * KiB, readAheadBytes: 2 * MiB });
    for (const chunk of [40, 3, 77, 21, 90, 8]) await sparse.ensure(chunk * 256 * KiB + 100, 10);
    expect(sparse.stats.chunksAhead).toBe(0);
    expect(sparse.stats.bytesFetched).toBe(6 * 256 * KiB);
    await sparse.close();
  });

  it('reads nothing ahead of a reader following the prefetch set, and ahead again once it walks past the set', async () => {
    const source = new RecordingSource(backendSource(new DelayedBackend(bucket, 5), 'b/memfile'));
    const cache = await openCache(source, { concurrency: 4, maxRequestBytes: 256 * KiB, readAheadBytes: 2 * MiB });
    // The recorded start: two runs, chunks 10-17 and 40-43 (touched page after page).
    const runs = [
      [10, 18],
      [40, 44],
    ] as const;
    const prefetch = cache.prefetch(
      runs.map(([lo, hi]) => ({ offset: lo * 256 * KiB, length: (hi - lo) * 256 * KiB })),
    );
    for (const [lo, hi] of runs)
      for (let at = lo * 256 * KiB; at < hi * 256 * KiB; at += 4 * KiB) await cache.ensure(at, 4 * KiB);
    expect(await prefetch).toEqual({ chunks: 12, failed: 0 });
    expect(cache.isPresent(10 * 256 * KiB, 8 * 256 * KiB)).toBe(true);
    expect(cache.isPresent(17 * 256 * KiB + 5, 256 * KiB)).toBe(false); // runs into chunk 18
    const fetched = [...source.coverage(256 * KiB).keys()].sort((a, b) => a - b);
    expect(fetched).toEqual([10, 11, 12, 13, 14, 15, 16, 17, 40, 41, 42, 43]);
    expect(cache.stats.bytesFetched).toBe(12 * 256 * KiB);
    // A run the recording did not have: sequential again, read ahead as before.
    for (let at = 60 * 256 * KiB; at < 64 * 256 * KiB; at += 4 * KiB) await cache.ensure(at, 4 * KiB);
    expect(cache.stats.chunksAhead).toBeGreaterThan(12);
    // Reading on from the set's last chunk is sequential too: the chunks after it come ahead.
    const ahead = cache.stats.chunksAhead;
    for (let at = 44 * 256 * KiB; at < 46 * 256 * KiB; at += 4 * KiB) await cache.ensure(at, 4 * KiB);
    expect(cache.stats.chunksAhead).toBeGreaterThan(ahead);
    await cache.close();
  });

  it('retries a failing request per the retry policy, and a permanent failure fails only the reads that need it', async () => {
    const source = new RecordingSource(backendSource(new DelayedBackend(bucket, 2), 'b/memfile'));
    const cache = await openCache(source, { concurrency: 4, maxRequestBytes: 256 * KiB, readAheadBytes: MiB });
    // chunk 4 fails twice, then works: attempts 3 are enough
    let chunk4 = 0;
    source.fail = (offset) =>
      offset === 4 * 256 * KiB && chunk4++ < 2
        ? new StorageUnavailable('read range', 'b/memfile', new Error('503'))
        : undefined;
    const retries: number[] = [];
    await cache.ensure(4 * 256 * KiB, 10, (e) => retries.push(e.attempt));
    expect(retries).toEqual([1, 2]);
    expect(source.requests.filter((r) => r.offset === 4 * 256 * KiB)).toHaveLength(3);

    // chunk 20 is gone for good (every attempt transient, or not retryable at all); others are fine
    source.fail = (offset, length) =>
      offset <= 20 * 256 * KiB && offset + length > 20 * 256 * KiB
        ? new StorageUnavailable('read range', 'b/memfile', new Error('503'))
        : undefined;
    const bad = Buffer.alloc(100);
    const good = Buffer.alloc(100);
    const [badRead, goodRead] = await Promise.allSettled([
      cache.readAt(bad, 20 * 256 * KiB + 5),
      cache.readAt(good, 30 * 256 * KiB + 5),
    ]);
    expect(badRead.status).toBe('rejected');
    expect((badRead as PromiseRejectedResult).reason).toBeInstanceOf(StorageUnavailable);
    expect(source.requests.filter((r) => r.offset === 20 * 256 * KiB)).toHaveLength(3);
    expect(goodRead.status).toBe('fulfilled');
    expect(good.equals(data.subarray(30 * 256 * KiB + 5, 30 * 256 * KiB + 105))).toBe(true);

    // a read-ahead chunk that cannot be fetched does not fail the reader that started the window
    source.fail = (offset, length) =>
      offset <= 12 * 256 * KiB && offset + length > 12 * 256 * KiB ? new ObjectNotFound('b/memfile', 'x') : undefined;
    const seq = Buffer.alloc(256 * KiB);
    await cache.readAt(seq, 10 * 256 * KiB);
    await cache.readAt(seq, 11 * 256 * KiB); // sequential: a window over chunk 12 goes out
    expect(seq.equals(data.subarray(11 * 256 * KiB, 12 * 256 * KiB))).toBe(true);
    await expect(cache.readAt(seq, 12 * 256 * KiB)).rejects.toBeInstanceOf(ObjectNotFound);
    // not remembered: once the bucket answers again, so does the read
    source.fail = () => undefined;
    await cache.readAt(seq, 12 * 256 * KiB);
    expect(seq.equals(data.subarray(12 * 256 * KiB, 13 * 256 * KiB))).toBe(true);
    // the read-ahead that read started ends too: nothing stays pending
    while (cache.pendingCount > 0) await new Promise((r) => setTimeout(r, 5));
    await cache.close();
  });

  it('a resume cancelled mid-fetch leaves no fd, timer or pending chunk behind, and its readers fail', async () => {
    const fdsBefore = (await readdir('/proc/self/fd')).length;
    const delayed = new DelayedBackend(bucket, 30);
    const source = new RecordingSource(backendSource(delayed, 'b/memfile'));
    const cache = await openCache(source, { concurrency: 2, maxRequestBytes: 256 * KiB, readAheadBytes: 4 * MiB });
    const prefetch = cache.prefetch([{ offset: 0, length: data.length }]);
    const reads = Promise.allSettled([
      cache.ensure(10 * MiB, 4096),
      cache.ensure(20 * MiB, 4096),
      cache.ensure(0, 8192),
    ]);
    await new Promise((r) => setTimeout(r, 5));
    expect(cache.pendingCount).toBeGreaterThan(10);
    await cache.close();
    const settled = await reads;
    for (const s of settled) if (s.status === 'rejected') expect(s.reason).toBeInstanceOf(StorageClosed);
    expect(settled.some((s) => s.status === 'rejected')).toBe(true);
    const outcome = await prefetch;
    expect(outcome.failed).toBeGreaterThan(0);
    expect(cache.pendingCount).toBe(0);
    // requests that were waiting out their delay are released by the backend's close
    await delayed.close();
    expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore);
    await expect(cache.ensure(0, 1)).rejects.toBeInstanceOf(StorageClosed);
  });

  it('LayeredFile.prefetch sends each virtual range to the layer holding it, zeros to nobody', async () => {
    const source = new RecordingSource(backendSource(bucket, 'b/memfile'));
    const cache = await openCache(source, { concurrency: 4, maxRequestBytes: MiB, readAheadBytes: 0 });
    const size = 8 * MiB;
    const header = baseHeader('11111111-1111-4111-8111-111111111111', size, 4096);
    // the first 4 MiB are zeros, the rest maps to the layer at storage offset 1 MiB
    header.mappings = [
      { offset: 0, length: 4 * MiB, buildId: '00000000-0000-0000-0000-000000000000', buildStorageOffset: 0 },
      { offset: 4 * MiB, length: 4 * MiB, buildId: header.metadata.buildId, buildStorageOffset: MiB },
    ];
    const file = new LayeredFile({ header, resolve: () => cache });
    const result = await file.prefetch([
      { offset: MiB, length: 4096 },
      { offset: 5 * MiB, length: 512 * KiB },
    ]);
    expect(result).toEqual({ chunks: 2, failed: 0 });
    expect(source.requests).toEqual([{ offset: 2 * MiB, length: 512 * KiB }]);
    const out = Buffer.alloc(512 * KiB);
    await file.readAt(out, 5 * MiB);
    expect(out.equals(data.subarray(2 * MiB, 2 * MiB + 512 * KiB))).toBe(true);
    expect(source.requests).toHaveLength(1);
    await cache.close();
  });
});

describe('DelayedBackend', () => {
  it('delays each request, counts requests and bytes, and is read through chunk caches (not a LocalBackend)', async () => {
    const delayed = new DelayedBackend(bucket, 25);
    expect(delayed).not.toBeInstanceOf(LocalBackend);
    expect(delayed.location).toContain('+25 ms');
    const t0 = performance.now();
    const [a, b] = await Promise.all([delayed.readRange('b/memfile', 0, 10), delayed.readRange('b/memfile', 10, 10)]);
    expect(performance.now() - t0).toBeGreaterThanOrEqual(20);
    expect(Buffer.concat([a, b]).equals(data.subarray(0, 20))).toBe(true);
    expect(await delayed.size('b/memfile')).toBe(data.length);
    expect(delayed.counters).toEqual({ requests: 3, rangeBytes: 20 });
    await expect(delayed.read('b/absent')).rejects.toBeInstanceOf(ObjectNotFound);
    expect(() => new DelayedBackend(bucket, -1)).toThrow(RangeError);
    await delayed.close();
  });
});
