import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { BuildCache, type BuildCacheEvent, type BuildCacheOptions } from './build-cache.js';
import type { CachedFile } from './cached-file.js';

const A = 'aaaaaaaa-0000-4000-8000-000000000001';
const B = 'bbbbbbbb-0000-4000-8000-000000000002';
const C = 'cccccccc-0000-4000-8000-000000000003';

/** A cached file that only records whether it was closed and claims a disk usage. */
class FakeFile implements CachedFile {
  closed = false;
  readonly complete = false;
  constructor(
    readonly path: string,
    readonly size = 1024,
    readonly disk = 10,
  ) {}
  async ensure(): Promise<void> {}
  async readAt(): Promise<void> {}
  async diskUsage(): Promise<number> {
    return this.closed ? 0 : this.disk;
  }
  async close(): Promise<void> {
    this.closed = true;
  }
}

let dir: string;
let cache: BuildCache | undefined;
let clock = 0;
let events: BuildCacheEvent[] = [];

function open(options: Partial<BuildCacheOptions> = {}): BuildCache {
  cache = new BuildCache({
    cacheDir: dir,
    ttlMs: 1000,
    deleteDelayMs: 40,
    checkIntervalMs: 3_600_000,
    now: () => clock,
    diskUsage: async () => ({ usedBytes: 0, totalBytes: 100 }),
    onEvent: (e) => events.push(e),
    ...options,
  });
  return cache;
}

beforeEach(async () => {
  dir = await mkdtemp(path.join(tmpdir(), 'sbx-build-cache-'));
  clock = 0;
  events = [];
});
afterEach(async () => {
  vi.useRealTimers();
  await cache?.close();
  cache = undefined;
  await rm(dir, { recursive: true, force: true });
});

describe('BuildCache', () => {
  it('opens each build file once and refreshes the TTL on use', async () => {
    const c = open();
    let opens = 0;
    const entry = await c.get(A);
    const [f1, f2] = await Promise.all([
      entry.dataFile('memfile', async (d) => (opens++, new FakeFile(path.join(d, 'memfile')))),
      entry.dataFile('memfile', async (d) => (opens++, new FakeFile(path.join(d, 'memfile')))),
    ]);
    expect(f1).toBe(f2);
    expect(opens).toBe(1);
    clock = 900;
    await c.get(A);
    clock = 1500;
    await c.check();
    expect(c.list()).toEqual([{ buildId: A, expiresAt: new Date(1900) }]);
  });

  it('deletes an expired build after the delay: files closed, directory removed', async () => {
    const c = open();
    const entry = await c.get(A);
    const file = (await entry.dataFile('rootfs.ext4', async (d) => new FakeFile(path.join(d, 'r')))) as FakeFile;
    expect(existsSync(entry.dir)).toBe(true);
    clock = 1001;
    await c.check();
    expect(events).toContainEqual({ kind: 'evict-scheduled', buildId: A, reason: 'ttl' });
    expect(c.list()).toEqual([]);
    expect(file.closed).toBe(false);
    await vi.waitFor(() => expect(c.size).toBe(0), { timeout: 10_000 });
    await vi.waitFor(() => expect(existsSync(entry.dir)).toBe(false), { timeout: 10_000 });
    expect(file.closed).toBe(true);
  });

  it('a reader that comes back during the delete delay cancels the delete', async () => {
    // The delete delay is a timer: fake ones let the test pass it without waiting.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout', 'setInterval', 'clearInterval'] });
    const c = open({ deleteDelayMs: 400 });
    const entry = await c.get(A);
    const file = (await entry.dataFile('memfile', async (d) => new FakeFile(path.join(d, 'm')))) as FakeFile;
    clock = 1001;
    await c.check();
    const again = await c.get(A);
    expect(again).toBe(entry);
    expect(events).toContainEqual({ kind: 'evict-cancelled', buildId: A });
    await vi.advanceTimersByTimeAsync(600);
    expect(file.closed).toBe(false);
    expect(existsSync(entry.dir)).toBe(true);
    expect(c.list().map((e) => e.buildId)).toEqual([A]);
  });

  it('evicts least recently used builds while the cache disk is past the threshold', async () => {
    // 70 bytes used by others, plus 10 per open build file, on a 100-byte disk; threshold 85 %.
    const files: FakeFile[] = [];
    const c = open({
      maxDiskUsedPercent: 85,
      diskUsage: async () => ({ usedBytes: 70 + files.filter((f) => !f.closed).length * 10, totalBytes: 100 }),
    });
    for (const [id, t] of [
      [B, 2],
      [A, 1],
      [C, 3],
    ] as const) {
      clock = t;
      const e = await c.get(id);
      files.push((await e.dataFile('memfile', async (d) => new FakeFile(path.join(d, 'm')))) as FakeFile);
    }
    clock = 4;
    await c.check();
    const scheduled = events.filter((e) => e.kind === 'evict-scheduled').map((e) => e.buildId);
    // 100 % → A goes (pending 10 → 90 %), then B (80 %): C, the most recently used, stays
    expect(scheduled).toEqual([A, B]);
    await vi.waitFor(() => expect(files.map((f) => f.closed)).toEqual([true, true, false]), { timeout: 10_000 });
    expect(c.list().map((e) => e.buildId)).toEqual([C]);
  });

  it('reads the real cache disk usage with statfs', async () => {
    // Any real disk is more than 0 % used: with a 0 % threshold every build is evicted, oldest first.
    const c = open({ maxDiskUsedPercent: 0, diskUsage: undefined });
    clock = 2;
    await c.get(B);
    clock = 1;
    await c.get(A);
    await c.check();
    expect(events.filter((e) => e.kind === 'evict-scheduled')).toEqual([
      { kind: 'evict-scheduled', buildId: A, reason: 'disk' },
      { kind: 'evict-scheduled', buildId: B, reason: 'disk' },
    ]);
  });

  it('keeps the number of entries and their memory bounded', async () => {
    const c = open({ maxEntries: 2, maxMemoryBytes: 50_000 });
    clock = 1;
    await c.get(A);
    clock = 2;
    await c.get(B);
    clock = 3;
    await c.get(C);
    expect(events).toContainEqual({ kind: 'evict-scheduled', buildId: A, reason: 'entries' });
    const e = await c.get(C);
    await e.header('memfile', async () => ({
      metadata: { version: 1, blockSize: 4096, size: 4096 * 1000, generation: 1, buildId: C, baseBuildId: C },
      mappings: Array.from({ length: 1000 }, (_, i) => ({
        offset: i * 4096,
        length: 4096,
        buildId: C,
        buildStorageOffset: i * 4096,
      })),
    }));
    clock = 4;
    await c.get(B);
    expect(events).toContainEqual({ kind: 'evict-scheduled', buildId: C, reason: 'memory' });
    expect(c.memoryBytes()).toBeGreaterThan(50_000);
    await vi.waitFor(() => expect(c.memoryBytes()).toBeLessThan(50_000), { timeout: 10_000 });
    expect(c.list().map((x) => x.buildId)).toEqual([B]);
  });

  it('close releases every entry at once', async () => {
    const c = open({ deleteDelayMs: 60_000 });
    const e = await c.get(A);
    const f = (await e.dataFile('memfile', async (d) => new FakeFile(path.join(d, 'm')))) as FakeFile;
    c.evict(A);
    await c.close();
    expect(f.closed).toBe(true);
    expect(existsSync(e.dir)).toBe(false);
    await expect(c.get(A)).rejects.toThrow(/closed/);
  });
});
