import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { baseMappings, decodeHeader, encodeHeader, LocalBackend, type Header, type StorageBackend } from '#storage';
import { BuildUnavailable } from './orchestrator-errors.js';

/** The file names of a build (DESIGN.md §2), in the bucket and in the local cache alike. */
export const BUILD_FILES = {
  rootfs: 'rootfs.ext4',
  rootfsHeader: 'rootfs.ext4.header',
  memfile: 'memfile',
  memfileHeader: 'memfile.header',
  snapfile: 'snapfile',
} as const;

export const ROOTFS_BLOCK_SIZE = 4096;

/** A build whose headers and snapfile are on local disk; layer data stays where it is (lazy). */
export interface LocalBuild {
  buildId: string;
  dir: string;
  snapfilePath: string;
  memfileHeader: Header;
  rootfsHeader: Header;
}

/**
 * Where builds live for this node: a local build directory (new builds are registered here
 * at once, so a resume on this node never waits for an upload) in front of the bucket.
 */
export interface BuildFiles {
  /** Headers and snapfile on local disk, fetched from the bucket when needed. */
  fetch(buildId: string): Promise<LocalBuild>;
  exists(buildId: string): Promise<boolean>;
  /** A scratch directory for a build being written by a pause; `commit` makes it visible. */
  staging(buildId: string): Promise<string>;
  commit(buildId: string): Promise<void>;
  discard(buildId: string): Promise<void>;
  /** Copies a local build's files to the bucket. */
  upload(buildId: string): Promise<void>;
  localDir(buildId: string): string;
  /** A layer's data file on local disk (the local build, else the bucket directory). */
  dataPath(buildId: string, name: string): Promise<string>;
}

/** The local build directory of the node: `{cacheDir}/builds/{buildId}/`. */
export function localBuildDir(cacheDir: string, buildId: string): string {
  return join(cacheDir, 'builds', buildId);
}

export async function readBuildHeader(dir: string, kind: 'memfile' | 'rootfs', buildId: string): Promise<Header> {
  const headerName = kind === 'memfile' ? BUILD_FILES.memfileHeader : BUILD_FILES.rootfsHeader;
  try {
    return decodeHeader(await readFile(join(dir, headerName)));
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  if (kind === 'memfile') throw new BuildUnavailable(buildId, `${headerName} missing`);
  // A base build's rootfs has no header: one mapping [0, size) to itself (DESIGN.md §2).
  const size = (await stat(join(dir, BUILD_FILES.rootfs)).catch(() => undefined))?.size;
  if (size === undefined) throw new BuildUnavailable(buildId, `neither ${headerName} nor ${BUILD_FILES.rootfs}`);
  return {
    metadata: { version: 1, blockSize: ROOTFS_BLOCK_SIZE, size, generation: 0, buildId, baseBuildId: buildId },
    mappings: baseMappings(size, buildId),
  };
}

export async function writeBuildHeader(dir: string, kind: 'memfile' | 'rootfs', header: Header): Promise<void> {
  const name = kind === 'memfile' ? BUILD_FILES.memfileHeader : BUILD_FILES.rootfsHeader;
  const tmp = join(dir, `${name}.tmp`);
  await writeFile(tmp, encodeHeader(header));
  await rename(tmp, join(dir, name));
}

/**
 * The node's local build directory in front of the bucket (libs/storage's backend: a local
 * directory or `gs://bucket`). Only headers and the snapfile are fetched; layer data stays
 * where it is and the services read it lazily.
 */
export class BucketBuildFiles implements BuildFiles {
  constructor(
    private readonly cacheDir: string,
    private readonly backend: StorageBackend,
  ) {}

  localDir(buildId: string): string {
    return localBuildDir(this.cacheDir, buildId);
  }

  async dataPath(buildId: string, name: string): Promise<string> {
    const local = join(this.localDir(buildId), name);
    if (await isFile(local)) return local;
    const object = `${buildId}/${name}`;
    if (!(await this.backend.exists(object))) {
      throw new BuildUnavailable(buildId, `${name} is neither local nor in ${this.backend.location}`);
    }
    if (this.backend instanceof LocalBackend) return this.backend.pathOf(object);
    // A remote layer read whole (compaction): fetched once into the local build directory.
    await mkdir(this.localDir(buildId), { recursive: true });
    await this.backend.download(object, local);
    return local;
  }

  async exists(buildId: string): Promise<boolean> {
    if (await isFile(join(this.localDir(buildId), BUILD_FILES.snapfile))) return true;
    return this.backend.exists(`${buildId}/${BUILD_FILES.snapfile}`);
  }

  async fetch(buildId: string): Promise<LocalBuild> {
    const dir = this.localDir(buildId);
    if (!(await isFile(join(dir, BUILD_FILES.snapfile)))) {
      if (!(await this.backend.exists(`${buildId}/${BUILD_FILES.snapfile}`))) {
        throw new BuildUnavailable(buildId, `not in the local cache nor in ${this.backend.location}`);
      }
      const staging = `${dir}.fetch-${process.pid}-${Date.now()}`;
      await mkdir(staging, { recursive: true });
      try {
        for (const name of [BUILD_FILES.memfileHeader, BUILD_FILES.rootfsHeader, BUILD_FILES.snapfile]) {
          const object = `${buildId}/${name}`;
          if (name !== BUILD_FILES.snapfile && !(await this.backend.exists(object))) continue;
          await this.backend.download(object, join(staging, name));
        }
        await rename(staging, dir).catch(async (err: NodeJS.ErrnoException) => {
          // Another create fetched it first: theirs is as good as ours.
          if (err.code !== 'ENOTEMPTY' && err.code !== 'EEXIST') throw err;
        });
      } finally {
        await rm(staging, { recursive: true, force: true });
      }
    }
    return {
      buildId,
      dir,
      snapfilePath: join(dir, BUILD_FILES.snapfile),
      memfileHeader: await readBuildHeader(dir, 'memfile', buildId),
      rootfsHeader: await this.rootfsHeader(dir, buildId),
    };
  }

  /** A headerless base rootfs is sized from its data file, which may only be in the bucket. */
  private async rootfsHeader(dir: string, buildId: string): Promise<Header> {
    if ((await isFile(join(dir, BUILD_FILES.rootfsHeader))) || (await isFile(join(dir, BUILD_FILES.rootfs)))) {
      return readBuildHeader(dir, 'rootfs', buildId);
    }
    const object = `${buildId}/${BUILD_FILES.rootfs}`;
    if (!(await this.backend.exists(object))) {
      throw new BuildUnavailable(buildId, `neither ${BUILD_FILES.rootfsHeader} nor ${BUILD_FILES.rootfs}`);
    }
    const size = await this.backend.size(object);
    return {
      metadata: { version: 1, blockSize: ROOTFS_BLOCK_SIZE, size, generation: 0, buildId, baseBuildId: buildId },
      mappings: baseMappings(size, buildId),
    };
  }

  async staging(buildId: string): Promise<string> {
    const dir = `${this.localDir(buildId)}.staging`;
    await rm(dir, { recursive: true, force: true });
    await mkdir(dir, { recursive: true });
    return dir;
  }

  async commit(buildId: string): Promise<void> {
    await rename(`${this.localDir(buildId)}.staging`, this.localDir(buildId));
  }

  async discard(buildId: string): Promise<void> {
    await rm(`${this.localDir(buildId)}.staging`, { recursive: true, force: true });
  }

  /** Data files first, headers next, the snapfile last: a build is visible once complete. */
  async upload(buildId: string): Promise<void> {
    const from = this.localDir(buildId);
    const order = [
      BUILD_FILES.memfile,
      BUILD_FILES.rootfs,
      BUILD_FILES.memfileHeader,
      BUILD_FILES.rootfsHeader,
      BUILD_FILES.snapfile,
    ];
    for (const name of order) {
      if (!(await isFile(join(from, name)))) {
        if (name === BUILD_FILES.snapfile) throw new BuildUnavailable(buildId, 'no local snapfile to upload');
        continue;
      }
      await this.backend.upload(`${buildId}/${name}`, join(from, name));
    }
  }
}

async function isFile(path: string): Promise<boolean> {
  return (await stat(path).catch(() => undefined))?.isFile() ?? false;
}
