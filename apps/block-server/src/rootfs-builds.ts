import { join } from 'node:path';
import {
  BuildNotFound,
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
import { FileBlocks } from './file-blocks.js';

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
  /** Read local build files on the event loop (see FileBlocks.open). */
  syncReads?: boolean;
}

/**
 * The rootfs layers of builds, shared by every device of this process: each build's data file
 * is opened once and kept while some device reads through it. A local bucket is read in place
 * (FileBlocks); a remote one through the backend's ranged reads.
 */
export class RootfsBuilds {
  private readonly backend: StorageBackend;
  private readonly local: string | undefined;
  private readonly syncReads: boolean;
  private readonly files = new Map<string, { blocks: Promise<ReadableBlocks>; users: number }>();

  constructor(options: RootfsBuildsOptions) {
    this.backend = openBackend(options.bucket);
    this.local = options.bucket.startsWith('gs://') ? undefined : options.bucket;
    this.syncReads = options.syncReads ?? false;
  }

  async open(buildId: string): Promise<OpenedRootfs> {
    const id = normalizeBuildId(buildId);
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
    const blocks: Promise<ReadableBlocks> = this.local
      ? FileBlocks.open(join(this.local, objectPath), { syncReads: this.syncReads })
      : this.backend.size(objectPath).then((size) => rangeBlocks(this.backend, objectPath, size));
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

/** A remote object as ReadableBlocks through ranged reads. */
function rangeBlocks(backend: StorageBackend, objectPath: string, size: number): ReadableBlocks {
  return {
    size,
    async readAt(target, offset) {
      if (target.length === 0) return;
      target.set(await backend.readRange(objectPath, offset, target.length));
    },
    async close() {},
  };
}
