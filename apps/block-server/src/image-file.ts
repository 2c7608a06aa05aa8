import { close as closeFd, fstat, open as openFd, read, readSync } from 'node:fs';
import type { ReadableBlocks } from '#storage';

/**
 * A local image file as a read-only block source: the base of a standalone export or of a
 * device opened with a base path (libs/storage FileBlocks is a build's file in the build
 * store). Opened O_RDONLY, so the image cannot be modified whatever the layers above do.
 * Ranges are checked once, at the NBD edge.
 */
export class ImageFile implements ReadableBlocks {
  private closed = false;

  private constructor(
    readonly path: string,
    private readonly fd: number,
    readonly size: number,
    private readonly syncReads: boolean,
  ) {}

  /**
   * `syncReads`: pread on the event loop instead of the libuv pool. Much faster while the file
   * is in the page cache (no thread hop per 4 KiB read), but a read that misses the cache
   * stalls every connection of the process for the disk's latency.
   */
  static async open(path: string, options: { syncReads?: boolean } = {}): Promise<ImageFile> {
    const fd = await new Promise<number>((resolve, reject) =>
      openFd(path, 'r', (err, fd) => (err ? reject(err) : resolve(fd))),
    );
    try {
      const stats = await new Promise<{ size: number; isFile(): boolean; isBlockDevice(): boolean }>(
        (resolve, reject) => fstat(fd, (err, s) => (err ? reject(err) : resolve(s))),
      );
      if (!stats.isFile()) throw new Error(`${path} is not a regular file`);
      return new ImageFile(path, fd, stats.size, options.syncReads ?? false);
    } catch (err) {
      closeFd(fd, () => undefined);
      throw err;
    }
  }

  readAt(target: Uint8Array, offset: number): Promise<void> {
    if (this.closed) return Promise.reject(new Error(`image ${this.path} closed`));
    return this.syncReads ? readFullySync(this.fd, target, offset) : readFully(this.fd, target, offset);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await new Promise<void>((resolve) => closeFd(this.fd, () => resolve()));
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
