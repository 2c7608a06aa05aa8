import { access, readFile, rename, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { BuildCache } from './build-cache.js';
import { normalizeBuildId } from './build-id.js';
import type { CachedFile } from './cached-file.js';
import { backendSource, ChunkCache } from './chunk-cache.js';
import { FileBlocks } from './file-blocks.js';
import { decodeHeader, encodeHeader, type Header } from './header-codec.js';
import { LayeredFile } from './layered-file.js';
import { baseMappings } from './mappings.js';
import { type BuildDataFile, type BuildFileName, buildObjectPath, headerFileName } from './object-paths.js';
import { isRetryableStorageError, type RetryPolicy, withRetries } from './retry-policy.js';
import type { StorageBackend } from './storage-backend.js';
import { BuildNotFound, ObjectNotFound, StorageClosed, UploadFailed } from './storage-errors.js';

export interface BuildStoreOptions {
  backend: StorageBackend;
  cache: BuildCache;
  /** Block size of a plain base build that has no header. Default 4096 for both files. */
  baseBlockSize?: Partial<Record<BuildDataFile, number>>;
  /** Chunk size of the data caches. Default 4 MiB. */
  chunkSize?: number;
  /** Retries of transient failures when fetching chunks. */
  fetchRetry?: RetryPolicy;
  /** Retries of transient failures per uploaded file. */
  uploadRetry?: RetryPolicy;
  /** Told about every upload's start, progress, end and failure. */
  onUploadEvent?: (event: UploadEvent) => void;
}

export type UploadEvent =
  | { kind: 'started'; buildId: string }
  | { kind: 'progress'; buildId: string; file: BuildFileName; bytes: number; fileBytes: number }
  | { kind: 'retry'; buildId: string; file: BuildFileName; attempt: number; error: unknown }
  | { kind: 'done'; buildId: string; bytes: number }
  | { kind: 'failed'; buildId: string; error: UploadFailed };

export type UploadState =
  { state: 'uploading' } | { state: 'done'; bytes: number } | { state: 'failed'; error: UploadFailed };

export interface UploadBuildOptions {
  /** Retries per file after the first attempt (overrides the store's upload policy). */
  retries?: number;
  onProgress?: (event: { file: BuildFileName; bytes: number; fileBytes: number }) => void;
}

export interface OpenedBuildFile {
  header: Header;
  file: LayeredFile;
}

interface LocalBuild {
  dir: string;
  files: Map<BuildDataFile, Promise<FileBlocks>>;
}

const DEFAULT_UPLOAD_RETRY: RetryPolicy = { attempts: 6, initialDelayMs: 500, maxDelayMs: 30_000, multiplier: 2 };

/**
 * The builds API the services use: headers and layered files of any build, read from this
 * node's own fresh builds first (registered local directories, readable before their upload
 * finishes), else from the bucket through the build cache; uploads of local builds.
 */
export class BuildStore {
  readonly backend: StorageBackend;
  readonly cache: BuildCache;
  private readonly baseBlockSize: Record<BuildDataFile, number>;
  private readonly chunkSize: number | undefined;
  private readonly fetchRetry: RetryPolicy | undefined;
  private readonly uploadRetry: RetryPolicy;
  private readonly onUploadEvent: ((event: UploadEvent) => void) | undefined;
  private readonly local = new Map<string, LocalBuild>();
  private readonly uploads = new Map<string, { state: UploadState; done: Promise<void> }>();
  private closed = false;

  constructor(options: BuildStoreOptions) {
    this.backend = options.backend;
    this.cache = options.cache;
    this.baseBlockSize = { memfile: 4096, 'rootfs.ext4': 4096, ...options.baseBlockSize };
    this.chunkSize = options.chunkSize;
    this.fetchRetry = options.fetchRetry;
    this.uploadRetry = options.uploadRetry ?? DEFAULT_UPLOAD_RETRY;
    this.onUploadEvent = options.onUploadEvent;
  }

  /**
   * Makes a build written on this node readable at once from `dir`, which holds its files under
   * their object names (`memfile`, `memfile.header`, `rootfs.ext4`, ..., `snapfile`).
   */
  registerLocalBuild(buildId: string, dir: string): void {
    this.open();
    const id = normalizeBuildId(buildId);
    if (this.local.has(id)) throw new RangeError(`build ${id} is already registered locally`);
    this.local.set(id, { dir: path.resolve(dir), files: new Map() });
  }

  /** Writes headers into a local build directory and registers it (its data files are already there). */
  async writeBuild(buildId: string, dir: string, headers: Partial<Record<BuildDataFile, Header>>): Promise<void> {
    for (const [file, header] of Object.entries(headers) as Array<[BuildDataFile, Header]>) {
      const dest = path.join(dir, headerFileName(file));
      await writeFile(`${dest}.tmp`, encodeHeader(header));
      await rename(`${dest}.tmp`, dest);
    }
    if (!this.local.has(normalizeBuildId(buildId))) this.registerLocalBuild(buildId, dir);
  }

  isLocal(buildId: string): boolean {
    return this.local.has(buildId.toLowerCase());
  }

  /** Stops reading a build from its local directory (after its upload, before deleting the directory). */
  async forgetLocalBuild(buildId: string): Promise<void> {
    const id = buildId.toLowerCase();
    const build = this.local.get(id);
    if (build === undefined) return;
    this.local.delete(id);
    await closeAll(build.files.values());
  }

  /** The header of a build file; for a plain base build without one, one mapping [0, size) → itself. */
  async readHeader(buildId: string, file: BuildDataFile, blockSize?: number): Promise<Header> {
    const id = normalizeBuildId(buildId);
    const local = this.local.get(id);
    if (local !== undefined) {
      const headerPath = path.join(local.dir, headerFileName(file));
      const bytes = await readFile(headerPath).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
        throw err;
      });
      if (bytes !== undefined) return decodeHeader(bytes);
      const size = await stat(path.join(local.dir, file)).then(
        (s) => s.size,
        () => {
          throw new BuildNotFound(id, buildObjectPath(id, file), local.dir);
        },
      );
      return this.baseHeader(id, file, size, blockSize);
    }
    const entry = await this.cache.get(id);
    const header = await entry.header(file, async () => {
      try {
        return decodeHeader(await this.backend.read(buildObjectPath(id, headerFileName(file))));
      } catch (err) {
        if (!(err instanceof ObjectNotFound)) throw err;
        return undefined;
      }
    });
    if (header !== undefined) return header;
    const size = await this.remoteSize(id, file);
    return this.baseHeader(id, file, size, blockSize);
  }

  /** A build file as its header describes it, every layer read through this store. */
  async openBuildFile(
    buildId: string,
    file: BuildDataFile,
    options: { blockSize?: number } = {},
  ): Promise<OpenedBuildFile> {
    this.open();
    const header = await this.readHeader(buildId, file, options.blockSize);
    return { header, file: new LayeredFile({ header, resolve: (id) => this.dataFile(id, file) }) };
  }

  /**
   * One build's own data file (its diff, or its full image), local or cached from the bucket.
   * The returned file belongs to the store; ask again rather than keeping it (that keeps the
   * cache entry alive and reopens it after an eviction).
   */
  async dataFile(buildId: string, file: BuildDataFile): Promise<CachedFile> {
    this.open();
    // Ids from decoded headers are already normal: the per-read path skips the check.
    const id = this.local.has(buildId) ? buildId : normalizeBuildId(buildId);
    const local = this.local.get(id);
    if (local !== undefined) {
      let opening = local.files.get(file);
      if (opening === undefined) {
        opening = FileBlocks.open(path.join(local.dir, file)).catch((err: unknown) => {
          local.files.delete(file);
          if ((err as NodeJS.ErrnoException).code === 'ENOENT')
            throw new BuildNotFound(id, buildObjectPath(id, file), local.dir);
          throw err;
        });
        local.files.set(file, opening);
      }
      return opening;
    }
    const entry = await this.cache.get(id);
    return entry.dataFile(file, async (dir) => {
      const objectPath = buildObjectPath(id, file);
      const size = await this.remoteSize(id, file);
      return ChunkCache.open({
        source: backendSource(this.backend, objectPath),
        size,
        cachePath: path.join(dir, file),
        ...(this.chunkSize !== undefined ? { chunkSize: this.chunkSize } : {}),
        ...(this.fetchRetry !== undefined ? { retry: this.fetchRetry } : {}),
      });
    });
  }

  /** Local path of a build's snapfile (downloaded into the cache once). */
  async fetchSnapfile(buildId: string): Promise<string> {
    this.open();
    const id = normalizeBuildId(buildId);
    const local = this.local.get(id);
    if (local !== undefined) {
      const p = path.join(local.dir, 'snapfile');
      await access(p).catch(() => {
        throw new BuildNotFound(id, buildObjectPath(id, 'snapfile'), local.dir);
      });
      return p;
    }
    const entry = await this.cache.get(id);
    return entry.snapfilePath(async (dest) => {
      try {
        await this.backend.download(buildObjectPath(id, 'snapfile'), dest);
      } catch (err) {
        if (err instanceof ObjectNotFound) throw new BuildNotFound(id, err.objectPath, err.location);
        throw err;
      }
    });
  }

  /**
   * Uploads a registered local build: data files and snapfile first, headers last, so a reader
   * that finds a header in the bucket finds the data too. Each file is retried on transient
   * failures; a final failure is recorded (`uploadState`), reported (`onUploadEvent`) and
   * rejects the returned promise. One upload per build at a time.
   */
  uploadBuild(buildId: string, options: UploadBuildOptions = {}): Promise<void> {
    this.open();
    const id = normalizeBuildId(buildId);
    const running = this.uploads.get(id);
    if (running !== undefined && running.state.state === 'uploading') return running.done;
    const local = this.local.get(id);
    if (local === undefined) return Promise.reject(new BuildNotFound(id, `${id}/`, 'local builds'));
    const record: { state: UploadState; done: Promise<void> } = {
      state: { state: 'uploading' },
      done: Promise.resolve(),
    };
    record.done = this.upload(id, local.dir, options).then(
      (bytes) => {
        record.state = { state: 'done', bytes };
        this.onUploadEvent?.({ kind: 'done', buildId: id, bytes });
      },
      (err: unknown) => {
        const error = err instanceof UploadFailed ? err : new UploadFailed(id, `${id}/`, 1, err);
        record.state = { state: 'failed', error };
        this.onUploadEvent?.({ kind: 'failed', buildId: id, error });
        throw error;
      },
    );
    this.uploads.set(id, record);
    return record.done;
  }

  /**
   * Starts `uploadBuild` in the background. Its failure is not lost: it is recorded in
   * `uploadState` and reported through `onUploadEvent`.
   */
  startUpload(buildId: string, options: UploadBuildOptions = {}): void {
    this.uploadBuild(buildId, options).catch(() => undefined);
  }

  uploadState(buildId: string): UploadState | undefined {
    return this.uploads.get(buildId.toLowerCase())?.state;
  }

  /** Builds this node holds: cached from the bucket, and local ones. */
  listCachedBuilds(): Array<{ buildId: string; expiresAt: Date | undefined; local: boolean }> {
    const out: Array<{ buildId: string; expiresAt: Date | undefined; local: boolean }> = this.cache
      .list()
      .filter((b) => !this.local.has(b.buildId))
      .map((b) => ({ ...b, local: false }));
    for (const id of this.local.keys()) out.push({ buildId: id, expiresAt: undefined, local: true });
    return out;
  }

  /** Waits for uploads in flight (their outcome is reported), then releases local files. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.uploads.values()].map((u) => u.done));
    for (const build of this.local.values()) await closeAll(build.files.values());
    this.local.clear();
  }

  private async upload(id: string, dir: string, options: UploadBuildOptions): Promise<number> {
    this.onUploadEvent?.({ kind: 'started', buildId: id });
    const order: BuildFileName[] = ['memfile', 'rootfs.ext4', 'snapfile', 'memfile.header', 'rootfs.ext4.header'];
    const policy =
      options.retries === undefined ? this.uploadRetry : { ...this.uploadRetry, attempts: options.retries + 1 };
    let total = 0;
    for (const name of order) {
      const localFile = path.join(dir, name);
      const fileBytes = await stat(localFile).then(
        (s) => s.size,
        () => undefined,
      );
      if (fileBytes === undefined) continue;
      const objectPath = buildObjectPath(id, name);
      let attempts = 0;
      try {
        await withRetries(
          async (attempt) => {
            attempts = attempt;
            await this.backend.upload(objectPath, localFile, {
              onProgress: (bytes) => {
                options.onProgress?.({ file: name, bytes, fileBytes });
                this.onUploadEvent?.({ kind: 'progress', buildId: id, file: name, bytes, fileBytes });
              },
            });
          },
          policy,
          isRetryableStorageError,
          (error, attempt) => this.onUploadEvent?.({ kind: 'retry', buildId: id, file: name, attempt, error }),
        );
      } catch (err) {
        throw new UploadFailed(id, objectPath, attempts, err);
      }
      total += fileBytes;
    }
    return total;
  }

  private async remoteSize(id: string, file: BuildDataFile): Promise<number> {
    try {
      return await this.backend.size(buildObjectPath(id, file));
    } catch (err) {
      if (err instanceof ObjectNotFound) throw new BuildNotFound(id, err.objectPath, err.location);
      throw err;
    }
  }

  private baseHeader(id: string, file: BuildDataFile, size: number, blockSize?: number): Header {
    return {
      // E2B's template headers today: version 3, generation 0 (header.NewTemplateMetadata).
      metadata: {
        version: 3,
        blockSize: blockSize ?? this.baseBlockSize[file],
        size,
        generation: 0,
        buildId: id,
        baseBuildId: id,
      },
      mappings: baseMappings(size, id),
    };
  }

  private open(): void {
    if (this.closed) throw new StorageClosed('build store');
  }
}

async function closeAll(files: Iterable<Promise<FileBlocks>>): Promise<void> {
  const opened = await Promise.allSettled([...files]);
  for (const f of opened) if (f.status === 'fulfilled') await f.value.close();
}
