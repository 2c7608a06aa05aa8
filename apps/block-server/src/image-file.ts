import { read, readSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import type { ReadableBlocks } from '#storage';

/**
 * A local image file as a read-only block source: the base of a standalone export or of a
 * device opened with a base path (libs/storage FileBlocks is a build's file in the build
 * store). Opened O_RDONLY, so the image cannot be modified whatever the layers above do.
 * Ranges are checked once, at the NBD edge.
 */
export class ImageFile implements ReadableBlocks {
  /** Reads use the callback API on the fd: FileHandle.read costs more per call. */
  private readonly fd: number;

  private constructor(
    readonly path: string,
    private readonly file: FileHandle,
    readonly size: number,
    private readonly syncReads: boolean,
  ) {
    this.fd = file.fd;
  }

  /**
   * `syncReads`: pread on the event loop instead of the libuv pool. Much faster while the file
   * is in the page cache (no thread hop per 4 KiB read), but a read that misses the cache
   * stalls every connection of the process for the disk's latency.
   */
  static async open(path: string, options: { syncReads?: boolean } = {}): Promise<ImageFile> {
    const file = await open(path, 'r');
    try {
      const stats = await file.stat();
      if (!stats.isFile()) throw new Error(`${path} is not a regular file`);
      return new ImageFile(path, file, stats.size, options.syncReads ?? false);
    } catch (err) {
      await file.close();
      throw err;
    }
  }

  readAt(target: Uint8Array, offset: number): Promise<void> {
    if (this.file.fd < 0) return Promise.reject(new Error(`image ${this.path} closed`));
    return this.syncReads ? readFullySync(this.fd, target, offset) : readFully(this.fd, target, offset);
  }

  close(): Promise<void> {
    return this.file.close();
  }
}

/** pread until `target` is full; a file that shrank underneath reads as an error, never short. */
export function readFully(fd: number, target: Uint8Array, offset: number): Promise<void> {
  return new Promise((resolve, reject) => {
    let done = 0;
    const step = (): void => {
      read(fd, target, done, target.length - done, offset + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return reject(new Error(`unexpected end of file at ${offset + done}`));
        done += n;
        if (done === target.length) resolve();
        else step();
      });
    };
    if (target.length === 0) resolve();
    else step();
  });
}

/** readFully on the event loop; for files expected in the page cache. */
export function readFullySync(fd: number, target: Uint8Array, offset: number): Promise<void> {
  try {
    let done = 0;
    while (done < target.length) {
      const n = readSync(fd, target, done, target.length - done, offset + done);
      if (n === 0) throw new Error(`unexpected end of file at ${offset + done}`);
      done += n;
    }
    return Promise.resolve();
  } catch (err) {
    return Promise.reject(err);
  }
}
