import { statSync } from 'node:fs';
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { BuildCache, type BuildCacheOptions } from './build-cache.js';
import { NIL_UUID, normalizeBuildId } from './build-id.js';
import type { CachedFile } from './cached-file.js';
import { backendSource, ChunkCache } from './chunk-cache.js';
import type { FetchPolicy } from './fetch-policy.js';
import { FileBlocks } from './file-blocks.js';
import { baseHeader, decodeHeader, encodeHeader, type Header } from './header-codec.js';
import { LayeredFile } from './layered-file.js';
import { decodePrefetch, encodePrefetch, PREFETCH_FILE, type PrefetchSet } from './prefetch-codec.js';
import { LocalBackend } from './local-backend.js';
import {
  BUILD_DATA_FILES,
  type BuildDataFile,
  type BuildFileName,
  buildObjectPath,
  headerFileName,
} from './object-paths.js';
import { isRetryableStorageError, type RetryPolicy, withRetries } from './retry-policy.js';
import type { StorageBackend } from './storage-backend.js';
import { BuildNotFound, ObjectNotFound, StorageClosed, UploadFailed } from './storage-errors.js';

export interface BuildStoreOptions {
  /** The bucket; without one only this node's local builds can be read. */
  backend?: StorageBackend;
  /** The node's cache directory (SBX_CACHE_DIR), shared by its processes: local builds in `{cacheDir}/builds`. */
  cacheDir: string;
  /** This process's name: its copies of bucket builds go in `{cacheDir}/remote/{owner}`, private to it. */
  owner: string;
  /** TTL and eviction of those copies. */
  cache?: Omit<BuildCacheOptions, 'cacheDir'>;
  /** Block size of a plain base build that has no header. Default 4096 for both files. */
  baseBlockSize?: Partial<Record<BuildDataFile, number>>;
  /** Chunk size of the data caches. Default CHUNK_SIZE. */
  chunkSize?: number;
  /** Concurrency, coalescing and read-ahead of the data caches' fetches. Default DEFAULT_FETCH_POLICY. */
  fetch?: FetchPolicy;
  /** Retries of transient failures when fetching chunks: the one place reads are retried. */
  fetchRetry?: RetryPolicy;
  /** Retries of transient failures per uploaded file. */
  uploadRetry?: RetryPolicy;
  /** Told about every upload's start, progress, retries, end and failure. */
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

export interface OpenedBuildFile {
  header: Header;
  file: LayeredFile;
}

/** What a VM is started from: the snapfile on local disk and both headers (layer data stays lazy). */
export interface SnapshotBuild {
  buildId: string;
  snapfilePath: string;
  memfileHeader: Header;
  rootfsHeader: Header;
}

export interface CachedBuild {
  buildId: string;
  /** Undefined for a local build (kept on disk, not evicted). */
  expiresAt: Date | undefined;
  local: boolean;
}

/**
 * The bucket order of a build's files (libs/storage/README.md, "On-disk contracts"): data
 * first, headers next, then the optional recorded prefetch set, the snapfile last. The snapfile
 * marks a complete build: readers resolve it before anything else, so a header (or prefetch
 * set) they then read never points at data not yet uploaded.
 */
export const UPLOAD_ORDER: readonly BuildFileName[] = [
  'memfile',
  'rootfs.ext4',
  'memfile.header',
  'rootfs.ext4.header',
  'memfile.prefetch',
  'snapfile',
];

interface LocalBuild {
  dir: string;
  files: Map<BuildDataFile, Promise<FileBlocks>>;
}

const DEFAULT_UPLOAD_RETRY: RetryPolicy = { attempts: 6, initialDelayMs: 500, maxDelayMs: 30_000, multiplier: 2 };
const STAGING_SUFFIX = '.staging';
/** Local builds' headers kept parsed (two per build): the builds a node is creating from now. */
const LOCAL_HEADERS_KEPT = 64;

/**
 * The only reader and writer of builds. A build is read from this node's local builds first
 * (`{cacheDir}/builds/{id}`: written by a pause or template build on this node, readable by
 * every process of the node at once, before and during its upload), else from the bucket
 * through this process's build cache (4 MiB chunks fetched lazily; a local-directory bucket is
 * read in place). Writes stage a build and move it in place whole; uploads follow UPLOAD_ORDER.
 */
export class BuildStore {
  readonly backend: StorageBackend | undefined;
  readonly cache: BuildCache;
  /** `{cacheDir}/builds`: the local builds every process of the node reads. */
  readonly buildsDir: string;
  private readonly o: BuildStoreOptions;
  private readonly baseBlockSize: Record<BuildDataFile, number>;
  private readonly local = new Map<string, LocalBuild>();
  /** Parsed headers of local builds by `{id}/{file}`, least recently used first (localHeader). */
  private readonly localHeaders = new Map<string, { identity: string; header: Header }>();
  private readonly uploads = new Map<string, { state: UploadState; done: Promise<void> }>();
  private closed = false;

  constructor(options: BuildStoreOptions) {
    this.o = options;
    this.backend = options.backend;
    this.buildsDir = path.join(path.resolve(options.cacheDir), 'builds');
    this.cache = new BuildCache({ ...options.cache, cacheDir: path.join(options.cacheDir, 'remote', options.owner) });
    this.baseBlockSize = { memfile: 4096, 'rootfs.ext4': 4096, ...options.baseBlockSize };
  }

  /** Where a local build lives: `{cacheDir}/builds/{id}`, its files under their object names. */
  localDir(buildId: string): string {
    return path.join(this.buildsDir, normalizeBuildId(buildId));
  }

  /** An empty directory to write a new build's files into; nothing reads it until commitBuild. */
  async stageBuild(buildId: string): Promise<string> {
    const dir = this.localDir(buildId) + STAGING_SUFFIX;
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    return dir;
  }

  /**
   * Writes the headers into a staged build and renames it into `{cacheDir}/builds/{id}`: from
   * then on every process of the node reads it, whole (a rename is atomic).
   */
  async commitBuild(buildId: string, headers: Partial<Record<BuildDataFile, Header>>): Promise<void> {
    this.open();
    const dir = this.localDir(buildId) + STAGING_SUFFIX;
    for (const [file, header] of Object.entries(headers) as Array<[BuildDataFile, Header]>)
      await writeFile(path.join(dir, headerFileName(file)), encodeHeader(header));
    await rename(dir, this.localDir(buildId));
  }

  async discardBuild(buildId: string): Promise<void> {
    await rm(this.localDir(buildId) + STAGING_SUFFIX, { recursive: true, force: true });
  }

  /** Removes what a crashed writer left staged (at the start of the only writer, the orchestrator). */
  async discardStaged(): Promise<void> {
    for (const name of await readdir(this.buildsDir).catch(() => [] as string[]))
      if (name.endsWith(STAGING_SUFFIX)) await rm(path.join(this.buildsDir, name), { recursive: true, force: true });
  }

  /** A local build, or a complete one in the bucket (its snapfile is there). */
  async exists(buildId: string): Promise<boolean> {
    const id = normalizeBuildId(buildId);
    if ((await this.localBuild(id)) !== undefined) return true;
    return (await this.backend?.exists(buildObjectPath(id, 'snapfile'))) ?? false;
  }

  /**
   * The snapfile on local disk and both headers. The snapfile is resolved first: it is uploaded
   * last, so a build whose snapfile is found has its headers and data in place too.
   */
  async resolveSnapshot(buildId: string): Promise<SnapshotBuild> {
    const id = normalizeBuildId(buildId);
    if ((await this.localBuild(id)) !== undefined) {
      // A local build is committed whole (one rename): its three files are there together, read at once.
      const [snapfilePath, memfileHeader, rootfsHeader] = await Promise.all([
        this.fetchSnapfile(id),
        this.readHeader(id, 'memfile'),
        this.readHeader(id, 'rootfs.ext4'),
      ]);
      return { buildId: id, snapfilePath, memfileHeader, rootfsHeader };
    }
    const snapfilePath = await this.fetchSnapfile(id);
    return {
      buildId: id,
      snapfilePath,
      memfileHeader: await this.readHeader(id, 'memfile'),
      rootfsHeader: await this.readHeader(id, 'rootfs.ext4'),
    };
  }

  /** The header of a build file; for a plain base build without one, `baseHeader`. */
  async readHeader(buildId: string, file: BuildDataFile, blockSize?: number): Promise<Header> {
    this.open();
    const id = normalizeBuildId(buildId);
    const base = (size: number) => baseHeader(id, size, blockSize ?? this.baseBlockSize[file]);
    const local = await this.localBuild(id);
    if (local !== undefined) {
      const header = await this.localHeader(id, local, file);
      if (header !== undefined) return header;
      const s = await stat(path.join(local.dir, file)).catch(() => undefined);
      if (s === undefined) throw new BuildNotFound(id, buildObjectPath(id, file), local.dir);
      return base(s.size);
    }
    const backend = this.bucket(id, file);
    const entry = await this.cache.get(id);
    const header = await entry.header(file, async () => {
      try {
        return decodeHeader(await backend.read(buildObjectPath(id, headerFileName(file))));
      } catch (err) {
        if (!(err instanceof ObjectNotFound)) throw err;
        return undefined;
      }
    });
    return header ?? base(await this.remoteSize(backend, id, file));
  }

  /** A build file as its header describes it, every layer read through this store. */
  async openBuildFile(
    buildId: string,
    file: BuildDataFile,
    options: { blockSize?: number } = {},
  ): Promise<OpenedBuildFile> {
    const header = await this.readHeader(buildId, file, options.blockSize);
    return { header, file: new LayeredFile({ header, resolve: (id) => this.dataFile(id, file) }) };
  }

  /**
   * One build's own data file (its diff, or its full image): local, or from the bucket. The
   * returned file belongs to the store; ask again rather than keeping it (that keeps the cache
   * entry alive and reopens it after an eviction).
   */
  async dataFile(buildId: string, file: BuildDataFile): Promise<CachedFile> {
    this.open();
    // The per-read path: ids seen before skip the checks and the stat.
    let local = this.local.get(buildId);
    const id = local !== undefined || this.cache.has(buildId) ? buildId : normalizeBuildId(buildId);
    if (local === undefined && !this.cache.has(id)) local = await this.localBuild(id);
    if (local !== undefined) return this.localFile(id, local, file);
    const backend = this.bucket(id, file);
    const entry = await this.cache.get(id);
    return entry.dataFile(file, async (dir) => {
      const objectPath = buildObjectPath(id, file);
      // A local-directory bucket is read in place: no second copy of the bytes.
      if (backend instanceof LocalBackend) {
        return FileBlocks.open(backend.pathOf(objectPath)).catch((err: unknown) => {
          if ((err as NodeJS.ErrnoException).code === 'ENOENT')
            throw new BuildNotFound(id, objectPath, backend.location);
          throw err;
        });
      }
      return ChunkCache.open({
        source: backendSource(backend, objectPath),
        size: await this.remoteSize(backend, id, file),
        cachePath: path.join(dir, file),
        ...(this.o.chunkSize !== undefined ? { chunkSize: this.o.chunkSize } : {}),
        ...(this.o.fetchRetry !== undefined ? { retry: this.o.fetchRetry } : {}),
        ...(this.o.fetch !== undefined ? { fetch: this.o.fetch } : {}),
      });
    });
  }

  /**
   * The build's recorded prefetch set (`memfile.prefetch`), or undefined for a build without
   * one (it is optional: older builds, templates). Throws PrefetchInvalid for a corrupt or
   * truncated file: callers warn and resume without it, never fail on it. Not cached: it is
   * read once per resume and small (4 bytes per block).
   */
  async readPrefetch(buildId: string): Promise<PrefetchSet | undefined> {
    this.open();
    const id = normalizeBuildId(buildId);
    const local = await this.localBuild(id);
    let bytes: Buffer | undefined;
    if (local !== undefined) {
      bytes = await readFile(path.join(local.dir, PREFETCH_FILE)).catch((err: unknown) => {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
        throw err;
      });
    } else {
      const backend = this.bucket(id, PREFETCH_FILE);
      bytes = await backend.read(buildObjectPath(id, PREFETCH_FILE)).catch((err: unknown) => {
        if (err instanceof ObjectNotFound) return undefined;
        throw err;
      });
    }
    return bytes === undefined ? undefined : decodePrefetch(bytes);
  }

  /**
   * Writes a prefetch set at `filePath` (a staged build's `memfile.prefetch`: the uffd-server
   * writes it where the orchestrator says, like the memory diff), through a temporary file and
   * a rename so a reader never sees half of it.
   */
  static async writePrefetch(filePath: string, set: PrefetchSet): Promise<void> {
    const tmp = `${filePath}.tmp`;
    await writeFile(tmp, encodePrefetch(set));
    await rename(tmp, filePath);
  }

  /** Local path of a build's snapfile (from the bucket: downloaded into the cache once). */
  async fetchSnapfile(buildId: string): Promise<string> {
    this.open();
    const id = normalizeBuildId(buildId);
    const local = await this.localBuild(id);
    if (local !== undefined) {
      const p = path.join(local.dir, 'snapfile');
      // On the event loop, like a local header's stat (localHeader).
      let found: boolean;
      try {
        found = statSync(p, { throwIfNoEntry: false }) !== undefined;
      } catch {
        found = false;
      }
      if (!found) throw new BuildNotFound(id, buildObjectPath(id, 'snapfile'), local.dir);
      return p;
    }
    const backend = this.bucket(id, 'snapfile');
    const entry = await this.cache.get(id);
    return entry.snapfilePath(async (dest) => {
      try {
        await backend.download(buildObjectPath(id, 'snapfile'), dest);
      } catch (err) {
        if (err instanceof ObjectNotFound) throw new BuildNotFound(id, err.objectPath, err.location);
        throw err;
      }
    });
  }

  /**
   * Uploads a local build in UPLOAD_ORDER, each file retried on transient failures. A build
   * whose headers map data of local builds still uploading waits for them first: a complete
   * build in the bucket never points at data that is not. A final failure is recorded
   * (`uploadState`), reported (`onUploadEvent`) and rejects. One upload per build at a time.
   */
  uploadBuild(buildId: string, options: { retries?: number } = {}): Promise<void> {
    this.open();
    const id = normalizeBuildId(buildId);
    const running = this.uploads.get(id);
    if (running !== undefined && running.state.state === 'uploading') return running.done;
    const record: { state: UploadState; done: Promise<void> } = {
      state: { state: 'uploading' },
      done: Promise.resolve(),
    };
    record.done = this.upload(id, options).then(
      (bytes) => {
        record.state = { state: 'done', bytes };
        this.o.onUploadEvent?.({ kind: 'done', buildId: id, bytes });
      },
      (err: unknown) => {
        const error = err instanceof UploadFailed ? err : new UploadFailed(id, `${id}/`, 1, err);
        record.state = { state: 'failed', error };
        this.o.onUploadEvent?.({ kind: 'failed', buildId: id, error });
        throw error;
      },
    );
    this.uploads.set(id, record);
    return record.done;
  }

  /** `uploadBuild` in the background; its failure is recorded and reported, not lost. */
  startUpload(buildId: string, options: { retries?: number } = {}): void {
    this.uploadBuild(buildId, options).catch(() => undefined);
  }

  uploadState(buildId: string): UploadState | undefined {
    return this.uploads.get(buildId.toLowerCase())?.state;
  }

  /** Uploads started by this process, by state. */
  uploadCounts(): Record<UploadState['state'], number> {
    const counts = { uploading: 0, done: 0, failed: 0 };
    for (const u of this.uploads.values()) counts[u.state.state]++;
    return counts;
  }

  /** Builds this node holds: its local builds, and the bucket builds this process has cached. */
  async listCachedBuilds(): Promise<CachedBuild[]> {
    const local = (await readdir(this.buildsDir).catch(() => [] as string[])).filter(
      (n) => !n.endsWith(STAGING_SUFFIX),
    );
    const out: CachedBuild[] = local.map((buildId) => ({ buildId, expiresAt: undefined, local: true }));
    for (const b of this.cache.list()) if (!local.includes(b.buildId)) out.push({ ...b, local: false });
    return out.sort((a, b) => a.buildId.localeCompare(b.buildId));
  }

  /** Waits for uploads in flight (their outcome is reported), then releases files and the cache. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled([...this.uploads.values()].map((u) => u.done));
    for (const build of this.local.values()) {
      for (const f of await Promise.allSettled([...build.files.values()]))
        if (f.status === 'fulfilled') await f.value.close();
    }
    this.local.clear();
    this.localHeaders.clear();
    await this.cache.close();
  }

  private async upload(id: string, options: { retries?: number }): Promise<number> {
    const local = await this.localBuild(id);
    if (local === undefined) throw new BuildNotFound(id, `${id}/`, this.buildsDir);
    const backend = this.bucket(id, 'snapfile');
    this.o.onUploadEvent?.({ kind: 'started', buildId: id });
    for (const parent of await this.localParents(id)) {
      // A parent whose upload failed before is tried again: this build needs its data.
      const wait =
        this.uploads.get(parent)?.state.state === 'failed' ? this.uploadBuild(parent) : this.uploads.get(parent)?.done;
      await wait?.catch((err: unknown) => {
        throw new UploadFailed(id, `${parent}/`, 0, err);
      });
    }
    const base = this.o.uploadRetry ?? DEFAULT_UPLOAD_RETRY;
    const policy = options.retries === undefined ? base : { ...base, attempts: options.retries + 1 };
    let total = 0;
    for (const name of UPLOAD_ORDER) {
      const localFile = path.join(local.dir, name);
      const fileBytes = (await stat(localFile).catch(() => undefined))?.size;
      if (fileBytes === undefined) continue;
      const objectPath = buildObjectPath(id, name);
      let attempts = 0;
      try {
        await withRetries(
          async (attempt) => {
            attempts = attempt;
            await backend.upload(objectPath, localFile, {
              onProgress: (bytes) =>
                this.o.onUploadEvent?.({ kind: 'progress', buildId: id, file: name, bytes, fileBytes }),
            });
          },
          policy,
          isRetryableStorageError,
          (error, attempt) => this.o.onUploadEvent?.({ kind: 'retry', buildId: id, file: name, attempt, error }),
        );
      } catch (err) {
        throw new UploadFailed(id, objectPath, attempts, err);
      }
      total += fileBytes;
    }
    return total;
  }

  /** Other builds whose data this build's headers map and whose upload this process started. */
  private async localParents(id: string): Promise<string[]> {
    const parents = new Set<string>();
    for (const file of BUILD_DATA_FILES) {
      const header = await this.readHeader(id, file).catch(() => undefined);
      for (const m of header?.mappings ?? [])
        if (m.buildId !== id && m.buildId !== NIL_UUID && this.uploads.has(m.buildId)) parents.add(m.buildId);
    }
    return [...parents];
  }

  private async localBuild(id: string): Promise<LocalBuild | undefined> {
    const known = this.local.get(id);
    if (known !== undefined) return known;
    const dir = path.join(this.buildsDir, id);
    if (!(await stat(dir).catch(() => undefined))?.isDirectory()) return undefined;
    // Another caller may have found it meanwhile: one record per build, or its open files leak.
    const build: LocalBuild = this.local.get(id) ?? { dir, files: new Map() };
    this.local.set(id, build);
    return build;
  }

  /**
   * A local build's header, parsed once per version of its file: every create reads both
   * headers of its build (orchestrator, block-server, uffd-server). The file's identity (inode,
   * size, mtime) is the key, so a build removed and committed again under its id is read anew.
   * The stat runs on the event loop: a few microseconds for a file in use, where a trip through
   * the libuv pool waits for a turn of the loop (0.1–1 ms on a busy node, on every create's
   * path). Undefined when the build has no header for `file` (a plain base build).
   */
  private async localHeader(id: string, local: LocalBuild, file: BuildDataFile): Promise<Header | undefined> {
    const headerPath = path.join(local.dir, headerFileName(file));
    const s = statSync(headerPath, { throwIfNoEntry: false });
    if (s === undefined) return undefined;
    const key = `${id}/${file}`;
    const identity = `${s.dev}:${s.ino}:${s.size}:${s.mtimeMs}`;
    const cached = this.localHeaders.get(key);
    if (cached?.identity === identity) {
      // Most recently used last: the bound below drops the oldest.
      this.localHeaders.delete(key);
      this.localHeaders.set(key, cached);
      return cached.header;
    }
    const header = decodeHeader(await readFile(headerPath));
    this.localHeaders.delete(key);
    this.localHeaders.set(key, { identity, header });
    if (this.localHeaders.size > LOCAL_HEADERS_KEPT) {
      this.localHeaders.delete(this.localHeaders.keys().next().value!);
    }
    return header;
  }

  private localFile(id: string, local: LocalBuild, file: BuildDataFile): Promise<FileBlocks> {
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

  private bucket(id: string, file: BuildFileName): StorageBackend {
    if (this.backend === undefined) throw new BuildNotFound(id, buildObjectPath(id, file), this.buildsDir);
    return this.backend;
  }

  private async remoteSize(backend: StorageBackend, id: string, file: BuildDataFile): Promise<number> {
    try {
      return await backend.size(buildObjectPath(id, file));
    } catch (err) {
      if (err instanceof ObjectNotFound) throw new BuildNotFound(id, err.objectPath, err.location);
      throw err;
    }
  }

  private open(): void {
    if (this.closed) throw new StorageClosed('build store');
  }
}
