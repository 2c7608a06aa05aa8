import { type FileHandle, mkdir, open, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { CachedFile, RetryObserver } from './cached-file.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { DEFAULT_FETCH_POLICY, type FetchPolicy } from './fetch-policy.js';
import { checkRange, readFully } from './file-blocks.js';
import { DEFAULT_RETRY_POLICY, isRetryableStorageError, type RetryPolicy, withRetries } from './retry-policy.js';
import type { StorageBackend } from './storage-backend.js';
import { StorageClosed } from './storage-errors.js';

/**
 * Unit of presence in a chunk cache (DESIGN.md §2 said 4 MiB). Requests are not limited to it:
 * adjacent chunks wanted together go out as one range request (FetchPolicy.maxRequestBytes),
 * so a small chunk costs no extra round trips and fetches less of what nobody reads
 * (bench/cold-resume, 100 MiB touched in runs of 256 KiB-4 MiB over 1 GiB: 4 MiB chunks on
 * demand fetched 2.8x the bytes touched; with the recorded set, 1 MiB chunks 1.48x, 256 KiB
 * 1.13x, 128 KiB 1.07x, in about as many requests).
 */
export const CHUNK_SIZE = 256 * 1024;

/** Where a chunk cache's bytes come from: one remote object. */
export interface ChunkSource {
  readRange(offset: number, length: number): Promise<Buffer>;
}

export interface ChunkCacheOptions {
  /** The remote object; `backendSource(backend, objectPath)` adapts a backend. */
  source: ChunkSource;
  /** Size of the remote object. */
  size: number;
  /** The sparse local file (created; its directory too). */
  cachePath: string;
  chunkSize?: number;
  /** Retries of transient fetch failures (StorageUnavailable) before a reader fails. */
  retry?: RetryPolicy;
  /** Concurrency, request coalescing and read-ahead. */
  fetch?: FetchPolicy;
  /** Removes the cache file on close (default true: the file is only a cache). */
  removeOnClose?: boolean;
}

export function backendSource(backend: StorageBackend, objectPath: string): ChunkSource {
  return { readRange: (offset, length) => backend.readRange(objectPath, offset, length) };
}

/** What a chunk is wanted for, most urgent first: a waiting reader, the recorded prefetch set, read-ahead. */
const Want = { Reader: 0, Prefetch: 1, ReadAhead: 2 } as const;
type Want = (typeof Want)[keyof typeof Want];

/** One chunk queued or being fetched; every reader of it waits on `done` (single flight). */
interface ChunkFetch {
  chunk: number;
  want: Want;
  started: boolean;
  done: Promise<void>;
  resolve: () => void;
  reject: (err: unknown) => void;
  observers: Set<RetryObserver>;
}

/** A FIFO of chunk numbers per urgency; entries whose chunk moved on are skipped when taken. */
class ChunkQueue {
  private items: number[] = [];
  private head = 0;
  push(chunk: number): void {
    this.items.push(chunk);
  }
  take(): number | undefined {
    if (this.head >= this.items.length) {
      this.items = [];
      this.head = 0;
      return undefined;
    }
    return this.items[this.head++];
  }
  clear(): void {
    this.items = [];
    this.head = 0;
  }
}

export interface ChunkCacheStats {
  /** Range requests sent (retries included). */
  requests: number;
  /** Bytes those requests returned. */
  bytesFetched: number;
  /** Chunks fetched because read-ahead or the prefetch set asked, before any reader did. */
  chunksAhead: number;
}

/**
 * One remote object read through a sparse local file: chunks are fetched on first use, each
 * exactly once however many readers want it at the same time (single flight), and kept.
 * Fetches run in parallel up to `fetch.concurrency` range requests, readers' chunks first, then
 * the recorded prefetch set, then read-ahead; adjacent chunks waiting together go out as one
 * request. A reader that keeps reading the next chunk starts a read-ahead window after it, which
 * doubles each time the reader reaches it. A failed fetch is retried with backoff while the
 * failure is transient, fails only the readers of its chunks, and is not remembered: the next
 * reader tries again.
 */
export class ChunkCache implements CachedFile {
  readonly path: string;
  readonly size: number;
  readonly chunkSize: number;
  readonly complete = false;
  /** Chunks present in the cache file. */
  readonly present: DirtyBitmap;
  private fh: FileHandle | undefined;
  private readonly source: ChunkSource;
  private readonly retry: RetryPolicy;
  private readonly policy: FetchPolicy;
  private readonly removeOnClose: boolean;
  private readonly chunkCount: number;
  /** Chunks queued or in flight. */
  private readonly pending = new Map<number, ChunkFetch>();
  private readonly queues = [new ChunkQueue(), new ChunkQueue(), new ChunkQueue()];
  /** Range requests in flight, for close to wait on. */
  private readonly running = new Set<Promise<void>>();
  /**
   * Chunks a prefetch set named (a build's recorded start). A reader walking through them follows
   * the recording, which already says where it stops: they drive no read-ahead, whose doubling
   * windows would run past the end of every recorded run (bench/cold-resume-node: ~2x the bytes
   * touched with the set). Readers past the set read ahead as usual.
   */
  private readonly planned: DirtyBitmap;
  /** Read-ahead marks: a reader reaching the chunk sends the next window (`from`, `size` chunks). */
  private readonly marks = new Map<number, { from: number; size: number }>();
  private readonly counters: ChunkCacheStats = { requests: 0, bytesFetched: 0, chunksAhead: 0 };

  private constructor(options: ChunkCacheOptions, fh: FileHandle, chunkSize: number, policy: FetchPolicy) {
    this.path = options.cachePath;
    this.size = options.size;
    this.chunkSize = chunkSize;
    this.chunkCount = Math.ceil(options.size / chunkSize);
    this.present = new DirtyBitmap(this.chunkCount);
    this.planned = new DirtyBitmap(this.chunkCount);
    this.fh = fh;
    this.source = options.source;
    this.retry = options.retry ?? DEFAULT_RETRY_POLICY;
    this.policy = policy;
    this.removeOnClose = options.removeOnClose ?? true;
  }

  static async open(options: ChunkCacheOptions): Promise<ChunkCache> {
    const chunkSize = options.chunkSize ?? CHUNK_SIZE;
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`chunk size ${chunkSize} invalid`);
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new RangeError(`size ${options.size} invalid`);
    const policy = options.fetch ?? DEFAULT_FETCH_POLICY;
    if (!(policy.concurrency >= 1)) throw new RangeError(`fetch concurrency ${policy.concurrency} invalid`);
    if (!(policy.readAheadBytes >= 0)) throw new RangeError(`read-ahead ${policy.readAheadBytes} invalid`);
    await mkdir(path.dirname(options.cachePath), { recursive: true });
    // A new file each time: what an earlier process left there is not known to be complete.
    const fh = await open(options.cachePath, 'w+', 0o600);
    try {
      await fh.truncate(options.size); // sparse: no blocks allocated until a chunk is written
      return new ChunkCache(options, fh, chunkSize, policy);
    } catch (err) {
      await fh.close();
      await rm(options.cachePath, { force: true });
      throw err;
    }
  }

  get fetchUnit(): number {
    return this.chunkSize;
  }

  /** Range requests sent so far (retries included). */
  get fetchCount(): number {
    return this.counters.requests;
  }

  get stats(): ChunkCacheStats {
    return { ...this.counters };
  }

  /** Chunks queued or being fetched (0 once everything wanted arrived, failed or was closed). */
  get pendingCount(): number {
    return this.pending.size;
  }

  async ensure(offset: number, length: number, onRetry?: RetryObserver): Promise<void> {
    if (this.fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    checkRange(offset, length, this.size);
    if (length === 0) return;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    const waits: Promise<void>[] = [];
    for (let c = first; c <= last; c++) if (!this.present.has(c)) waits.push(this.want(c, Want.Reader, onRetry));
    this.readAhead(first, last);
    this.pump();
    await Promise.all(waits);
  }

  /**
   * Fetches these ranges ahead of any reader (a build's recorded prefetch set), after what
   * readers wait for. Resolves when all were fetched; chunks whose fetch failed are counted,
   * not thrown: a reader that needs one fetches it again (and fails on its own if it must).
   */
  async prefetch(
    ranges: ReadonlyArray<{ offset: number; length: number }>,
  ): Promise<{ chunks: number; failed: number }> {
    if (this.fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    const waits: Promise<void>[] = [];
    for (const { offset, length } of ranges) {
      checkRange(offset, length, this.size);
      if (length === 0) continue;
      const last = Math.floor((offset + length - 1) / this.chunkSize);
      for (let c = Math.floor(offset / this.chunkSize); c <= last; c++) {
        this.planned.set(c);
        if (!this.present.has(c)) waits.push(this.want(c, Want.Prefetch, undefined));
      }
    }
    this.pump();
    const settled = await Promise.allSettled(waits);
    return { chunks: waits.length, failed: settled.filter((s) => s.status === 'rejected').length };
  }

  isPresent(offset: number, length: number): boolean {
    checkRange(offset, length, this.size);
    if (this.fh === undefined) return false;
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    for (let c = Math.floor(offset / this.chunkSize); c <= last; c++) if (!this.present.has(c)) return false;
    return true;
  }

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    await this.ensure(offset, target.length);
    const fh = this.fh;
    if (fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    await readFully(fh, target, offset, `chunk cache ${this.path}`);
  }

  async diskUsage(): Promise<number> {
    try {
      return (await stat(this.path)).blocks * 512;
    } catch {
      return 0;
    }
  }

  /**
   * Chunks only queued fail at once (StorageClosed); requests in flight are waited for; then
   * the file is closed and (by default) removed. Idempotent.
   */
  async close(): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) return;
    this.fh = undefined;
    const closed = new StorageClosed(`chunk cache ${this.path}`);
    for (const f of [...this.pending.values()]) {
      if (f.started) continue;
      this.pending.delete(f.chunk);
      f.reject(closed);
    }
    for (const q of this.queues) q.clear();
    this.marks.clear();
    await Promise.allSettled([...this.running]);
    await fh.close();
    if (this.removeOnClose) await rm(this.path, { force: true });
  }

  /** Single flight: a chunk already queued or in flight is waited for, made more urgent if need be. */
  private want(chunk: number, want: Want, onRetry: RetryObserver | undefined): Promise<void> {
    let f = this.pending.get(chunk);
    if (f === undefined) {
      let resolve!: () => void;
      let reject!: (err: unknown) => void;
      const done = new Promise<void>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      // Nobody may wait for a read-ahead chunk: its failure is only the failure of later readers.
      done.catch(() => undefined);
      f = { chunk, want, started: false, done, resolve, reject, observers: new Set() };
      this.pending.set(chunk, f);
      this.queues[want]!.push(chunk);
    } else if (!f.started && want < f.want) {
      f.want = want;
      this.queues[want]!.push(chunk);
    }
    if (onRetry !== undefined) f.observers.add(onRetry);
    return f.done;
  }

  /**
   * A reader in a window sent earlier sends the next one, twice as large, while it reads this
   * one; a reader missing the chunk right after one that is here (or coming) starts a window.
   * Random readers start none: what they read is all that is fetched.
   */
  private readAhead(first: number, last: number): void {
    const max = Math.floor(this.policy.readAheadBytes / this.chunkSize);
    if (max === 0) return;
    let sent = false;
    let planned = false;
    for (let c = first; c <= last; c++) {
      if (this.planned.has(c)) planned = true;
      const mark = this.marks.get(c);
      if (mark === undefined) continue;
      this.marks.delete(c);
      // A window that reached the prefetch set's chunks ends there: the set goes on from here.
      if (this.planned.has(c)) continue;
      this.window(mark.from, mark.size, max);
      sent = true;
    }
    if (sent || planned || first === 0 || this.present.has(first)) return;
    if (this.present.has(first - 1) || this.pending.has(first - 1)) this.window(last + 1, 2, max);
  }

  private window(from: number, size: number, max: number): void {
    const n = Math.min(size, max);
    const to = Math.min(from + n, this.chunkCount);
    if (from >= to) return;
    for (let c = from; c < to; c++) {
      if (this.present.has(c) || this.pending.has(c)) continue;
      this.want(c, Want.ReadAhead, undefined);
    }
    this.marks.set(from, { from: to, size: Math.min(n * 2, max) });
  }

  /** Starts requests while there is room: the most urgent chunk, with the queued chunks next to it. */
  private pump(): void {
    while (this.running.size < this.policy.concurrency && this.fh !== undefined) {
      const chunk = this.nextQueued();
      if (chunk === undefined) return;
      this.start(chunk);
    }
  }

  private nextQueued(): number | undefined {
    for (const want of [Want.Reader, Want.Prefetch, Want.ReadAhead]) {
      const queue = this.queues[want]!;
      for (let c = queue.take(); c !== undefined; c = queue.take()) {
        const f = this.pending.get(c);
        if (f !== undefined && !f.started && f.want === want) return c;
      }
    }
    return undefined;
  }

  private start(chunk: number): void {
    const most = Math.max(1, Math.floor(this.policy.maxRequestBytes / this.chunkSize));
    const waiting = (c: number) => {
      const f = this.pending.get(c);
      return f !== undefined && !f.started;
    };
    let lo = chunk;
    let hi = chunk;
    while (hi - lo + 1 < most && hi + 1 < this.chunkCount && waiting(hi + 1)) hi++;
    while (hi - lo + 1 < most && lo > 0 && waiting(lo - 1)) lo--;
    const run: ChunkFetch[] = [];
    for (let c = lo; c <= hi; c++) {
      const f = this.pending.get(c)!;
      f.started = true;
      if (f.want !== Want.Reader) this.counters.chunksAhead++;
      run.push(f);
    }
    const request = this.fetchRun(lo, hi, run).then(
      () => {
        for (const f of run) {
          this.pending.delete(f.chunk);
          f.resolve();
        }
      },
      (err: unknown) => {
        for (const f of run) {
          this.pending.delete(f.chunk);
          f.reject(err);
        }
      },
    );
    const tracked = request.finally(() => {
      this.running.delete(tracked);
      this.pump();
    });
    this.running.add(tracked);
  }

  private async fetchRun(lo: number, hi: number, run: ChunkFetch[]): Promise<void> {
    const offset = lo * this.chunkSize;
    const length = Math.min((hi + 1) * this.chunkSize, this.size) - offset;
    const data = await withRetries(
      async () => {
        if (this.fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
        this.counters.requests++;
        const bytes = await this.source.readRange(offset, length);
        if (bytes.length !== length)
          throw new RangeError(`chunks ${lo}-${hi}: got ${bytes.length} bytes, want ${length}`);
        this.counters.bytesFetched += bytes.length;
        return bytes;
      },
      this.retry,
      isRetryableStorageError,
      (error, attempt) => {
        const told = new Set<RetryObserver>();
        for (const f of run) for (const o of f.observers) told.add(o);
        for (const o of told) o({ attempt, error });
      },
    );
    const fh = this.fh;
    if (fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    let written = 0;
    while (written < data.length) {
      const { bytesWritten } = await fh.write(data, written, data.length - written, offset + written);
      written += bytesWritten;
    }
    for (let c = lo; c <= hi; c++) this.present.set(c);
  }
}
