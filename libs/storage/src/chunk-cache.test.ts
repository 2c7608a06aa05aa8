import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ChunkCache, type ChunkSource } from './chunk-cache.js';
import { ObjectNotFound, StorageClosed, StorageUnavailable } from './storage-errors.js';

const MiB = 1024 * 1024;
const FAST_RETRY = { attempts: 4, initialDelayMs: 1, maxDelayMs: 5, multiplier: 2 };

function remote(size: number): Buffer {
  const out = Buffer.alloc(size);
  for (let i = 0; i + 4 <= size; i += 4) out.writeUInt32LE(i, i);
  return out;
}

/** An in-memory remote object that counts fetches per offset and can fail on demand. */
class CountingSource implements ChunkSource {
  readonly calls = new Map<number, number>();
  failures: Array<() => Error> = [];
  constructor(
    readonly data: Buffer,
    readonly delayMs = 5,
  ) {}
  async readRange(offset: number, length: number): Promise<Buffer> {
    this.calls.set(offset, (this.calls.get(offset) ?? 0) + 1);
    await new Promise((r) => setTimeout(r, this.delayMs));
    const fail = this.failures.shift();
    if (fail !== undefined) throw fail();
    return Buffer.from(this.data.subarray(offset, offset + length));
  }
}

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sbx-chunk-cache-'));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe('ChunkCache', () => {
  it('fetches each chunk once under many concurrent readers and returns the right bytes', async () => {
    const data = remote(10 * MiB + 123);
    const source = new CountingSource(data, 20);
    const cache = await ChunkCache.open({
      source,
      size: data.length,
      cachePath: path.join(dir, 'sf', 'memfile'),
      chunkSize: 4 * MiB,
    });
    const reads = Array.from({ length: 40 }, (_, i) => {
      const offset = (i * 997_331) % (data.length - 70_000);
      const out = Buffer.alloc(i % 2 === 0 ? 70_000 : 4096);
      return cache.readAt(out, offset).then(() => ({ out, offset }));
    });
    for (const { out, offset } of await Promise.all(reads)) {
      expect(out.equals(data.subarray(offset, offset + out.length))).toBe(true);
    }
    expect([...source.calls.values()].every((n) => n === 1)).toBe(true);
    expect(cache.fetchCount).toBe(source.calls.size);
    const whole = Buffer.alloc(data.length);
    await cache.readAt(whole, 0);
    expect(whole.equals(data)).toBe(true);
    // every byte came once (adjacent chunks may have shared a request), the short tail included
    expect(cache.stats.bytesFetched).toBe(data.length);
    expect([...cache.present]).toEqual([0, 1, 2]);
    await cache.close();
  });

  it('keeps the cache file sparse: only fetched chunks take disk space', async () => {
    const data = remote(64 * MiB);
    const source = new CountingSource(data, 0);
    const cache = await ChunkCache.open({
      source,
      size: data.length,
      cachePath: path.join(dir, 'sparse'),
      chunkSize: 4 * MiB,
    });
    await cache.readAt(Buffer.alloc(100), 40 * MiB + 5);
    const st = await stat(cache.path);
    expect(st.size).toBe(64 * MiB);
    expect(await cache.diskUsage()).toBeLessThanOrEqual(5 * MiB);
    expect(await cache.diskUsage()).toBeGreaterThanOrEqual(4 * MiB);
    const onDisk = await readFile(cache.path);
    expect(onDisk.subarray(40 * MiB, 44 * MiB).equals(data.subarray(40 * MiB, 44 * MiB))).toBe(true);
    expect(onDisk.subarray(0, 4 * MiB).every((b) => b === 0)).toBe(true);
    await cache.close();
  });

  it('retries transient failures until they pass, and does not retry a missing object', async () => {
    const data = remote(2 * MiB);
    const source = new CountingSource(data, 0);
    const retries: number[] = [];
    const cache = await ChunkCache.open({
      source,
      size: data.length,
      cachePath: path.join(dir, 'retry'),
      chunkSize: MiB,
      retry: FAST_RETRY,
    });
    const transient = () => new StorageUnavailable('read range', 'b/memfile', new Error('timeout'));
    source.failures = [transient, transient, transient];
    const out = Buffer.alloc(10);
    await cache.ensure(5, 10, (e) => retries.push(e.attempt));
    await cache.readAt(out, 5);
    expect(out.equals(data.subarray(5, 15))).toBe(true);
    expect(source.calls.get(0)).toBe(4);
    expect(retries).toEqual([1, 2, 3]);

    source.failures = [transient, transient, transient, transient];
    await expect(cache.readAt(out, MiB)).rejects.toBeInstanceOf(StorageUnavailable);
    // the failure is not remembered: the next reader fetches again and succeeds
    await cache.readAt(out, MiB);
    expect(out.equals(data.subarray(MiB, MiB + 10))).toBe(true);

    const cache2 = await ChunkCache.open({
      source,
      size: data.length,
      cachePath: path.join(dir, 'missing'),
      retry: FAST_RETRY,
    });
    source.calls.clear();
    source.failures = [() => new ObjectNotFound('b/memfile', 'gs://x')];
    await expect(cache2.readAt(out, 0)).rejects.toBeInstanceOf(ObjectNotFound);
    expect(source.calls.get(0)).toBe(1);
    await cache.close();
    await cache2.close();
  });

  it('closes its fd and removes its file on close; reads after close fail', async () => {
    const fdsBefore = (await readdir('/proc/self/fd')).length;
    const data = remote(MiB);
    const cache = await ChunkCache.open({
      source: new CountingSource(data, 0),
      size: data.length,
      cachePath: path.join(dir, 'c'),
    });
    await cache.ensure(0, 100);
    expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore + 1);
    await cache.close();
    await cache.close();
    expect((await readdir('/proc/self/fd')).length).toBe(fdsBefore);
    expect(existsSync(path.join(dir, 'c'))).toBe(false);
    await expect(cache.readAt(Buffer.alloc(1), 0)).rejects.toBeInstanceOf(StorageClosed);
    await expect(cache.readAt(Buffer.alloc(1), MiB)).rejects.toBeInstanceOf(StorageClosed);
  });

  it('rejects ranges outside the object', async () => {
    const cache = await ChunkCache.open({
      source: new CountingSource(remote(100), 0),
      size: 100,
      cachePath: path.join(dir, 'r'),
    });
    await expect(cache.readAt(Buffer.alloc(10), 95)).rejects.toBeInstanceOf(RangeError);
    await expect(cache.ensure(-1, 2)).rejects.toBeInstanceOf(RangeError);
    await cache.close();
  });
});
