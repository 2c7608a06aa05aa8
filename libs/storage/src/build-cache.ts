import { randomBytes } from 'node:crypto';
import { mkdir, rm, statfs } from 'node:fs/promises';
import path from 'node:path';
import { normalizeBuildId } from './build-id.js';
import type { CachedFile } from './cached-file.js';
import type { Header } from './header-codec.js';
import type { BuildDataFile } from './object-paths.js';
import { StorageClosed } from './storage-errors.js';

export interface DiskUsage {
  usedBytes: number;
  totalBytes: number;
}

export interface BuildCacheOptions {
  /** Directory of the cache files (`SBX_CACHE_DIR`); one subdirectory per entry. */
  cacheDir: string;
  /** An entry not used for this long is deleted. Default 1 h. */
  ttlMs?: number;
  /**
   * Evicted entries are closed and their files deleted only after this delay, and a reader
   * that comes back meanwhile cancels it (seed build/cache.go: exposed slices, fetches in flight).
   * Default 60 s.
   */
  deleteDelayMs?: number;
  /** Past this share of the cache disk in use (percent), least recently used entries are evicted. Default 85. */
  maxDiskUsedPercent?: number;
  /** At most this many entries. Default 1000. */
  maxEntries?: number;
  /**
   * Memory the entries may hold (headers' mappings, chunk bitmaps), estimated; past it the
   * least recently used are evicted. E2B's unbounded cache grew a node to 37 GB RSS
   * (e2b-dev/infra#2957). Default 256 MiB.
   */
  maxMemoryBytes?: number;
  /** Period of the TTL and disk checks. Default 1 s. */
  checkIntervalMs?: number;
  /** statfs of the cache directory; replaceable in tests. */
  diskUsage?: (dir: string) => Promise<DiskUsage>;
  now?: () => number;
  /** Told about evictions and failures to release an entry. */
  onEvent?: (event: BuildCacheEvent) => void;
}

export type BuildCacheEvent =
  | { kind: 'evict-scheduled'; buildId: string; reason: 'ttl' | 'disk' | 'entries' | 'memory' | 'manual' }
  | { kind: 'evict-cancelled'; buildId: string }
  | { kind: 'deleted'; buildId: string }
  | { kind: 'error'; buildId: string; error: unknown };

export interface CachedBuildInfo {
  buildId: string;
  expiresAt: Date;
}

/** Rough in-memory cost of one mapping held in a decoded header. */
const MAPPING_MEMORY_BYTES = 160;
const ENTRY_MEMORY_BYTES = 2048;

/** What one build holds in the cache: its data files' caches, its headers, its snapfile. */
export class BuildCacheEntry {
  readonly buildId: string;
  /** Private directory of this entry's files. */
  readonly dir: string;
  expiresAt = 0;
  lastUsed = 0;
  pendingDelete: { timer: NodeJS.Timeout; bytes: number } | undefined;
  private readonly files = new Map<BuildDataFile, Promise<CachedFile>>();
  private readonly headers = new Map<BuildDataFile, Promise<Header | undefined>>();
  private snapfile: Promise<string> | undefined;
  private closed = false;
  private memory = ENTRY_MEMORY_BYTES;

  constructor(buildId: string, dir: string) {
    this.buildId = buildId;
    this.dir = dir;
  }

  /** The cached data file, opened once (single flight); a failed open is not remembered. */
  dataFile(file: BuildDataFile, open: (dir: string) => Promise<CachedFile>): Promise<CachedFile> {
    return this.once(this.files, file, async () => {
      const f = await open(this.dir);
      if (this.closed) {
        await f.close();
        throw new StorageClosed(`build cache entry ${this.buildId}`);
      }
      this.memory += 512 + Math.ceil(f.size / (4 * 1024 * 1024) / 8);
      return f;
    });
  }

  /** The header of a data file (undefined: the build has none, a plain base build). */
  header(file: BuildDataFile, load: () => Promise<Header | undefined>): Promise<Header | undefined> {
    return this.once(this.headers, file, async () => {
      const h = await load();
      if (h !== undefined) this.memory += 64 + h.mappings.length * MAPPING_MEMORY_BYTES;
      return h;
    });
  }

  /** Local path of the snapfile, fetched once into this entry's directory. */
  snapfilePath(fetch: (dest: string) => Promise<void>): Promise<string> {
    if (this.closed) return Promise.reject(new StorageClosed(`build cache entry ${this.buildId}`));
    if (this.snapfile === undefined) {
      const dest = path.join(this.dir, 'snapfile');
      this.snapfile = fetch(dest).then(
        () => dest,
        (err: unknown) => {
          this.snapfile = undefined;
          throw err;
        },
      );
    }
    return this.snapfile;
  }

  /** Estimated memory held by this entry. */
  get memoryBytes(): number {
    return this.memory;
  }

  /** Bytes this entry's files take on disk. */
  async diskBytes(): Promise<number> {
    let total = 0;
    for (const f of this.files.values()) {
      total += await f.then(
        (file) => file.diskUsage(),
        () => 0,
      );
    }
    return total;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const files = await Promise.allSettled([...this.files.values()]);
    await Promise.allSettled([this.snapfile]);
    for (const f of files) if (f.status === 'fulfilled') await f.value.close();
    await rm(this.dir, { recursive: true, force: true });
  }

  private once<K, V>(map: Map<K, Promise<V>>, key: K, load: () => Promise<V>): Promise<V> {
    if (this.closed) return Promise.reject(new StorageClosed(`build cache entry ${this.buildId}`));
    let p = map.get(key);
    if (p === undefined) {
      p = load();
      map.set(key, p);
      p.catch(() => {
        if (map.get(key) === p) map.delete(key);
      });
    }
    return p;
  }
}

/**
 * Builds fetched on this node (seed build/cache.go, bounded): entries live while used (a TTL
 * refreshed on every use), are evicted least-recently-used first when the cache disk passes a
 * usage threshold or the entry/memory limits are reached, and are deleted only after a delay
 * that a returning reader cancels.
 */
export class BuildCache {
  readonly cacheDir: string;
  private readonly ttlMs: number;
  private readonly deleteDelayMs: number;
  private readonly maxDiskUsedPercent: number;
  private readonly maxEntries: number;
  private readonly maxMemoryBytes: number;
  private readonly diskUsage: (dir: string) => Promise<DiskUsage>;
  private readonly now: () => number;
  private readonly onEvent: ((event: BuildCacheEvent) => void) | undefined;
  private readonly entries = new Map<string, BuildCacheEntry>();
  private readonly deleting = new Set<Promise<void>>();
  private readonly timer: NodeJS.Timeout;
  private checking = false;
  private closed = false;

  constructor(options: BuildCacheOptions) {
    this.cacheDir = path.resolve(options.cacheDir);
    this.ttlMs = options.ttlMs ?? 60 * 60 * 1000;
    this.deleteDelayMs = options.deleteDelayMs ?? 60_000;
    this.maxDiskUsedPercent = options.maxDiskUsedPercent ?? 85;
    this.maxEntries = options.maxEntries ?? 1000;
    this.maxMemoryBytes = options.maxMemoryBytes ?? 256 * 1024 * 1024;
    this.diskUsage = options.diskUsage ?? statfsUsage;
    this.now = options.now ?? Date.now;
    this.onEvent = options.onEvent;
    this.timer = setInterval(() => void this.check(), options.checkIntervalMs ?? 1000);
    this.timer.unref();
  }

  /**
   * The entry of a build, created when absent. Every call counts as a use: it refreshes the
   * TTL and cancels a pending delete.
   */
  async get(buildId: string): Promise<BuildCacheEntry> {
    if (this.closed) throw new StorageClosed('build cache');
    const id = normalizeBuildId(buildId);
    let entry = this.entries.get(id);
    if (entry === undefined) {
      const dir = path.join(this.cacheDir, `${id}-${randomBytes(4).toString('hex')}`);
      entry = new BuildCacheEntry(id, dir);
      this.entries.set(id, entry);
      await mkdir(dir, { recursive: true });
    } else if (entry.pendingDelete !== undefined) {
      clearTimeout(entry.pendingDelete.timer);
      entry.pendingDelete = undefined;
      this.onEvent?.({ kind: 'evict-cancelled', buildId: id });
    }
    entry.lastUsed = this.now();
    entry.expiresAt = entry.lastUsed + this.ttlMs;
    this.enforceLimits();
    return entry;
  }

  has(buildId: string): boolean {
    const entry = this.entries.get(buildId.toLowerCase());
    return entry !== undefined && entry.pendingDelete === undefined;
  }

  /** Cached builds that are not being deleted (for ListCachedBuilds). */
  list(): CachedBuildInfo[] {
    return [...this.entries.values()]
      .filter((e) => e.pendingDelete === undefined)
      .map((e) => ({ buildId: e.buildId, expiresAt: new Date(e.expiresAt) }));
  }

  get size(): number {
    return this.entries.size;
  }

  /** Estimated memory held by all entries. */
  memoryBytes(): number {
    let total = 0;
    for (const e of this.entries.values()) total += e.memoryBytes;
    return total;
  }

  /** Schedules the delayed delete of one build (a reader may still cancel it). */
  evict(buildId: string): boolean {
    const entry = this.entries.get(buildId.toLowerCase());
    if (entry === undefined || entry.pendingDelete !== undefined) return false;
    this.scheduleDelete(entry, 0, 'manual');
    return true;
  }

  /** Runs the TTL and disk checks now (also run every checkIntervalMs). */
  async check(): Promise<void> {
    if (this.checking || this.closed) return;
    this.checking = true;
    try {
      const now = this.now();
      for (const e of this.entries.values()) {
        if (e.pendingDelete === undefined && e.expiresAt <= now) this.scheduleDelete(e, await e.diskBytes(), 'ttl');
      }
      await this.enforceDisk();
    } catch (error) {
      this.onEvent?.({ kind: 'error', buildId: '', error });
    } finally {
      this.checking = false;
    }
  }

  /** Closes every entry at once and deletes their files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.timer);
    const all = [...this.entries.values()];
    this.entries.clear();
    for (const e of all) if (e.pendingDelete !== undefined) clearTimeout(e.pendingDelete.timer);
    await Promise.allSettled([...all.map((e) => e.close()), ...this.deleting]);
  }

  private async enforceDisk(): Promise<void> {
    // Nothing cached, nothing to evict; and a directory removed under an idle cache stays removed.
    if (this.entries.size === 0) return;
    for (;;) {
      const { usedBytes, totalBytes } = await this.diskUsage(this.cacheDir);
      // Entries waiting for their delete still take space but will free it: do not count them twice.
      let pending = 0;
      for (const e of this.entries.values()) if (e.pendingDelete !== undefined) pending += e.pendingDelete.bytes;
      const percent = totalBytes === 0 ? 0 : ((usedBytes - pending) / totalBytes) * 100;
      if (percent <= this.maxDiskUsedPercent) return;
      const victim = this.leastRecentlyUsed();
      if (victim === undefined) return;
      this.scheduleDelete(victim, await victim.diskBytes(), 'disk');
    }
  }

  private enforceLimits(): void {
    for (;;) {
      let live = 0;
      let memory = 0;
      for (const e of this.entries.values()) {
        if (e.pendingDelete !== undefined) continue;
        live++;
        memory += e.memoryBytes;
      }
      const reason = live > this.maxEntries ? 'entries' : memory > this.maxMemoryBytes ? 'memory' : undefined;
      if (reason === undefined) return;
      const victim = this.leastRecentlyUsed();
      if (victim === undefined) return;
      this.scheduleDelete(victim, 0, reason);
    }
  }

  private leastRecentlyUsed(): BuildCacheEntry | undefined {
    let victim: BuildCacheEntry | undefined;
    for (const e of this.entries.values()) {
      if (e.pendingDelete === undefined && (victim === undefined || e.lastUsed < victim.lastUsed)) victim = e;
    }
    return victim;
  }

  private scheduleDelete(
    entry: BuildCacheEntry,
    bytes: number,
    reason: 'ttl' | 'disk' | 'entries' | 'memory' | 'manual',
  ): void {
    const timer = setTimeout(() => {
      if (this.entries.get(entry.buildId) !== entry || entry.pendingDelete?.timer !== timer) return;
      this.entries.delete(entry.buildId);
      const done = entry
        .close()
        .then(
          () => this.onEvent?.({ kind: 'deleted', buildId: entry.buildId }),
          (error: unknown) => this.onEvent?.({ kind: 'error', buildId: entry.buildId, error }),
        )
        .finally(() => this.deleting.delete(done));
      this.deleting.add(done);
    }, this.deleteDelayMs);
    timer.unref();
    entry.pendingDelete = { timer, bytes };
    this.onEvent?.({ kind: 'evict-scheduled', buildId: entry.buildId, reason });
  }
}

async function statfsUsage(dir: string): Promise<DiskUsage> {
  const s = await statfs(dir);
  const totalBytes = s.blocks * s.bsize;
  return { totalBytes, usedBytes: totalBytes - s.bavail * s.bsize };
}
