import { join } from 'node:path';
import {
  BuildCache,
  BuildNotFound,
  BuildStore,
  LayeredFile,
  baseMappings,
  buildObjectPath,
  decodeHeader,
  normalizeBuildId,
  openBackend,
  type Header,
  type ReadableBlocks,
  type StorageBackend,
} from '#storage';
import { ImageFile } from './image-file.js';

export interface OpenedRootfs {
  /** The build's virtual rootfs, read through its header's mappings. */
  blocks: ReadableBlocks;
  blockSize: number;
  header: Header;
  /** Releases this user's hold on the builds' data files. */
  release(): Promise<void>;
}

export interface RootfsBuildsOptions {
  /** A local directory or `gs://bucket`. */
  bucket: string;
  /** Read local build files on the event loop (see ImageFile.open). */
  syncReads?: boolean;
  /** Chunk cache directory for a remote bucket (required with `gs://`). */
  cacheDir?: string;
  /**
   * Read a local bucket's files in place (default). False sends a local bucket through the
   * chunk cache as a remote one would be (tests, or a bucket on a slow network mount).
   */
  readInPlace?: boolean;
}

/**
 * The rootfs layers of builds, shared by every device of this process. A local bucket is read
 * in place: each build's data file opened once (FileBlocks) and kept while some device reads
 * through it. A remote bucket goes through libs/storage's BuildStore: 4 MiB chunks fetched
 * lazily into sparse cache files, once each, kept by the build cache (TTL, disk eviction).
 */
export class RootfsBuilds {
  private readonly backend: StorageBackend;
  private readonly local: string | undefined;
  private readonly syncReads: boolean;
  private readonly remote: { store: BuildStore; cache: BuildCache } | undefined;
  private readonly files = new Map<string, { blocks: Promise<ReadableBlocks>; users: number }>();

  constructor(options: RootfsBuildsOptions) {
    this.backend = openBackend(options.bucket);
    const inPlace = !options.bucket.startsWith('gs://') && (options.readInPlace ?? true);
    this.local = inPlace ? options.bucket : undefined;
    this.syncReads = options.syncReads ?? false;
    if (!this.local) {
      if (!options.cacheDir)
        throw new Error(`a cache directory is required for ${options.bucket} (--cache-dir / SBX_CACHE_DIR)`);
      const cache = new BuildCache({ cacheDir: options.cacheDir });
      this.remote = { store: new BuildStore({ backend: this.backend, cache }), cache };
    }
  }

  async open(buildId: string): Promise<OpenedRootfs> {
    const id = normalizeBuildId(buildId);
    if (this.remote) {
      const opened = await this.remote.store.openBuildFile(id, 'rootfs.ext4');
      return {
        blocks: opened.file,
        blockSize: opened.header.metadata.blockSize,
        header: opened.header,
        release: () => opened.file.close(),
      };
    }
    const header = await this.readHeader(id);
    const used = new Set<string>();
    const blocks = new LayeredFile({
      header,
      resolve: (dataBuild) => {
        if (!used.has(dataBuild)) {
          used.add(dataBuild);
          this.hold(dataBuild);
        }
        return this.files.get(dataBuild)!.blocks;
      },
    });
    return {
      blocks,
      blockSize: header.metadata.blockSize,
      header,
      release: async () => {
        await blocks.close();
        for (const dataBuild of used) await this.drop(dataBuild);
        used.clear();
      },
    };
  }

  async close(): Promise<void> {
    for (const [id, entry] of this.files) {
      this.files.delete(id);
      await entry.blocks.then((b) => b.close()).catch(() => undefined);
    }
    if (this.remote) {
      await this.remote.store.close();
      await this.remote.cache.close();
    }
    await this.backend.close();
  }

  private async readHeader(id: string): Promise<Header> {
    const headerPath = buildObjectPath(id, 'rootfs.ext4.header');
    if (await this.backend.exists(headerPath)) return decodeHeader(await this.backend.read(headerPath));
    const dataPath = buildObjectPath(id, 'rootfs.ext4');
    if (!(await this.backend.exists(dataPath))) throw new BuildNotFound(id, dataPath, this.backend.location);
    // A base build without a header: one mapping of the whole file to itself.
    const size = await this.backend.size(dataPath);
    return {
      metadata: { version: 3, blockSize: 4096, size, generation: 0, buildId: id, baseBuildId: id },
      mappings: baseMappings(size, id),
    };
  }

  private hold(id: string): void {
    const entry = this.files.get(id);
    if (entry) {
      entry.users++;
      return;
    }
    const objectPath = buildObjectPath(id, 'rootfs.ext4');
    const blocks: Promise<ReadableBlocks> = ImageFile.open(join(this.local!, objectPath), {
      syncReads: this.syncReads,
    });
    // A failed open is not kept: the next device tries again.
    blocks.catch(() => this.files.delete(id));
    this.files.set(id, { blocks, users: 1 });
  }

  private async drop(id: string): Promise<void> {
    const entry = this.files.get(id);
    if (!entry || --entry.users > 0) return;
    this.files.delete(id);
    await entry.blocks.then((b) => b.close()).catch(() => undefined);
  }
}
