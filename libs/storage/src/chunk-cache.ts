import { type FileHandle, mkdir, open, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { CachedFile, RetryObserver } from './cached-file.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import { checkRange, readFully } from './file-blocks.js';
import { DEFAULT_RETRY_POLICY, isRetryableStorageError, type RetryPolicy, withRetries } from './retry-policy.js';
import type { StorageBackend } from './storage-backend.js';
import { StorageClosed } from './storage-errors.js';

/** DESIGN.md §2: data comes from the bucket in 4 MiB chunks. */
export const CHUNK_SIZE = 4 * 1024 * 1024;

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
  /** Removes the cache file on close (default true: the file is only a cache). */
  removeOnClose?: boolean;
}

export function backendSource(backend: StorageBackend, objectPath: string): ChunkSource {
  return { readRange: (offset, length) => backend.readRange(objectPath, offset, length) };
}

/**
 * One remote object read through a sparse local file: chunks are fetched on first use, each
 * exactly once however many readers want it at the same time (single flight), and kept. A
 * failed fetch is retried with backoff while the failure is transient, and is not remembered:
 * the next reader tries again.
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
  private readonly removeOnClose: boolean;
  private readonly inflight = new Map<number, Promise<void>>();
  private fetches = 0;

  private constructor(options: ChunkCacheOptions, fh: FileHandle, chunkSize: number) {
    this.path = options.cachePath;
    this.size = options.size;
    this.chunkSize = chunkSize;
    this.present = new DirtyBitmap(Math.ceil(options.size / chunkSize));
    this.fh = fh;
    this.source = options.source;
    this.retry = options.retry ?? DEFAULT_RETRY_POLICY;
    this.removeOnClose = options.removeOnClose ?? true;
  }

  static async open(options: ChunkCacheOptions): Promise<ChunkCache> {
    const chunkSize = options.chunkSize ?? CHUNK_SIZE;
    if (!Number.isSafeInteger(chunkSize) || chunkSize <= 0) throw new RangeError(`chunk size ${chunkSize} invalid`);
    if (!Number.isSafeInteger(options.size) || options.size < 0) throw new RangeError(`size ${options.size} invalid`);
    await mkdir(path.dirname(options.cachePath), { recursive: true });
    // A new file each time: what an earlier process left there is not known to be complete.
    const fh = await open(options.cachePath, 'w+', 0o600);
    try {
      await fh.truncate(options.size); // sparse: no blocks allocated until a chunk is written
      return new ChunkCache(options, fh, chunkSize);
    } catch (err) {
      await fh.close();
      await rm(options.cachePath, { force: true });
      throw err;
    }
  }

  /** Remote fetches done so far (each chunk at most once unless a fetch failed). */
  get fetchCount(): number {
    return this.fetches;
  }

  async ensure(offset: number, length: number, onRetry?: RetryObserver): Promise<void> {
    if (this.fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    checkRange(offset, length, this.size);
    if (length === 0) return;
    const first = Math.floor(offset / this.chunkSize);
    const last = Math.floor((offset + length - 1) / this.chunkSize);
    const waits: Promise<void>[] = [];
    for (let c = first; c <= last; c++) if (!this.present.has(c)) waits.push(this.fetchChunk(c, onRetry));
    await Promise.all(waits);
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

  /** Waits for fetches in flight, closes the file and (by default) removes it. Idempotent. */
  async close(): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) return;
    this.fh = undefined;
    await Promise.allSettled([...this.inflight.values()]);
    await fh.close();
    if (this.removeOnClose) await rm(this.path, { force: true });
  }

  /** Single flight: a reader that comes while a chunk is being fetched waits for that fetch. */
  private fetchChunk(chunk: number, onRetry: RetryObserver | undefined): Promise<void> {
    const running = this.inflight.get(chunk);
    if (running !== undefined) return running;
    const fetching = this.fetch(chunk, onRetry).finally(() => this.inflight.delete(chunk));
    this.inflight.set(chunk, fetching);
    return fetching;
  }

  private async fetch(chunk: number, onRetry: RetryObserver | undefined): Promise<void> {
    const offset = chunk * this.chunkSize;
    const length = Math.min(this.chunkSize, this.size - offset);
    const data = await withRetries(
      async () => {
        if (this.fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
        this.fetches++;
        const bytes = await this.source.readRange(offset, length);
        if (bytes.length !== length) throw new RangeError(`chunk ${chunk}: got ${bytes.length} bytes, want ${length}`);
        return bytes;
      },
      this.retry,
      isRetryableStorageError,
      (error, attempt) => onRetry?.({ attempt, error }),
    );
    const fh = this.fh;
    if (fh === undefined) throw new StorageClosed(`chunk cache ${this.path}`);
    let written = 0;
    while (written < data.length) {
      const { bytesWritten } = await fh.write(data, written, data.length - written, offset + written);
      written += bytesWritten;
    }
    this.present.set(chunk);
  }
}
