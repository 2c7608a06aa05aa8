import { stat, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import {
  baseMappings,
  BuildNotFound,
  decodeHeader,
  LocalBackend,
  normalizeBuildId,
  ObjectNotFound,
  type BuildStore,
  type Header,
  type ReadableBlocks,
  type StorageBackend,
  NIL_UUID,
} from '#storage';
import type { SourceSegment } from './source-view.js';
import { SourceInvalid } from './uffd-server-errors.js';

const MEMFILE = 'memfile';
const MEMFILE_HEADER = 'memfile.header';

export interface MemoryLayers {
  header: Header;
  segments: SourceSegment[];
}

export interface MemoryLayersOptions {
  /** The node's local build directory root: builds in {cacheDir}/builds/{id}/ (what the orchestrator registers at once). */
  cacheDir: string;
  /** The bucket, when one is configured. */
  backend?: StorageBackend;
  /**
   * Builds not on local disk are read through this store (its chunk cache files are mapped into
   * the source view and filled on demand). Without it they are copied from the backend.
   */
  store?: BuildStore;
}

/**
 * Resolves a build's memory file into source segments: the header from the local build
 * directory, else the bucket (a base build without a header is one mapping onto itself), then
 * each mapped build's data file: a local file (the local build directory, or a local-directory
 * bucket) is mapped in place; a remote one is read through the backend with retries.
 */
export class MemoryLayerResolver {
  constructor(private readonly options: MemoryLayersOptions) {}

  private localDir(buildId: string): string {
    return join(this.options.cacheDir, 'builds', buildId);
  }

  async header(buildIdRaw: string): Promise<Header> {
    const buildId = normalizeBuildId(buildIdRaw);
    const local = await readFile(join(this.localDir(buildId), MEMFILE_HEADER)).catch(() => undefined);
    if (local) return decodeHeader(local);
    if (this.options.store && !(await this.localPath(buildId))) return this.options.store.readHeader(buildId, MEMFILE);
    const backend = this.options.backend;
    if (backend) {
      try {
        return decodeHeader(await backend.read(`${buildId}/${MEMFILE_HEADER}`));
      } catch (err) {
        if (!(err instanceof ObjectNotFound)) throw err;
      }
    }
    // A base build has no header: its memfile is the whole file.
    const size = await this.dataSize(buildId);
    if (size === undefined)
      throw new BuildNotFound(
        buildId,
        `${buildId}/${MEMFILE}`,
        this.options.backend?.location ?? this.options.cacheDir,
      );
    return {
      metadata: { version: 3, blockSize: 4096, size, generation: 0, buildId, baseBuildId: buildId },
      mappings: baseMappings(size, buildId),
    };
  }

  private async dataSize(buildId: string): Promise<number | undefined> {
    const path = await this.localPath(buildId);
    if (path) return (await stat(path)).size;
    if (this.options.backend && (await this.options.backend.exists(`${buildId}/${MEMFILE}`)))
      return this.options.backend.size(`${buildId}/${MEMFILE}`);
    return undefined;
  }

  /** The data file on local disk, when there is one. */
  private async localPath(buildId: string): Promise<string | undefined> {
    const candidates = [join(this.localDir(buildId), MEMFILE)];
    if (this.options.backend instanceof LocalBackend)
      candidates.push(this.options.backend.pathOf(`${buildId}/${MEMFILE}`));
    for (const c of candidates) {
      if (
        await stat(c).then(
          (s) => s.isFile(),
          () => false,
        )
      )
        return c;
    }
    return undefined;
  }

  async resolve(buildId: string): Promise<MemoryLayers> {
    const header = await this.header(buildId);
    const segments: SourceSegment[] = [];
    const remote = new Map<string, ReadableBlocks>();
    for (const m of header.mappings) {
      if (m.buildId === NIL_UUID) {
        segments.push({ kind: 'zero', offset: m.offset, length: m.length });
        continue;
      }
      const path = await this.localPath(m.buildId);
      if (path) {
        segments.push({ kind: 'file', offset: m.offset, length: m.length, path, fileOffset: m.buildStorageOffset });
        continue;
      }
      if (this.options.store) {
        segments.push(await this.storeSegment(this.options.store, m.buildId, m.offset, m.length, m.buildStorageOffset));
        continue;
      }
      let source = remote.get(m.buildId);
      if (!source) {
        source = this.remoteSource(m.buildId);
        remote.set(m.buildId, source);
      }
      segments.push({ kind: 'blocks', offset: m.offset, length: m.length, source, sourceOffset: m.buildStorageOffset });
    }
    return { header, segments };
  }

  /**
   * A remote build's data through the store's chunk cache: the sparse cache file is mapped,
   * `ensure` fetches chunks into it. If the cache entry was evicted and reopened meanwhile, the
   * mapping points at the old file, so that is an error (never stale bytes to the guest).
   */
  private async storeSegment(
    store: BuildStore,
    buildId: string,
    offset: number,
    length: number,
    storageOffset: number,
  ): Promise<SourceSegment> {
    const file = await store.dataFile(buildId, MEMFILE);
    return {
      kind: 'cached',
      offset,
      length,
      path: file.path,
      fileOffset: storageOffset,
      ensure: async (from, len) => {
        const current = await store.dataFile(buildId, MEMFILE);
        if (current !== file)
          throw new SourceInvalid(`build ${buildId}`, 'its cache file was evicted and reopened while mapped');
        await current.ensure(from, len);
      },
    };
  }

  /** A remote build's memfile read straight from the bucket (the fault path retries transient failures). */
  private remoteSource(buildId: string): ReadableBlocks {
    const backend = this.options.backend;
    if (!backend) throw new BuildNotFound(buildId, `${buildId}/${MEMFILE}`, this.options.cacheDir);
    const objectPath = `${buildId}/${MEMFILE}`;
    return {
      size: Number.MAX_SAFE_INTEGER,
      readAt: async (target, offset) => {
        target.set(await backend.readRange(objectPath, offset, target.length));
      },
      close: async () => undefined,
    };
  }
}
