import { read } from 'node:fs';
import { type FileHandle, open, stat } from 'node:fs/promises';
import type { CachedFile } from './cached-file.js';
import { readFromPageCache } from '#native';
import { StorageClosed } from './storage-errors.js';

/** A complete local file (a build written on this node, a downloaded object) read in place. */
export class FileBlocks implements CachedFile {
  readonly path: string;
  readonly size: number;
  readonly complete = true;
  private fh: FileHandle | undefined;

  private constructor(path: string, size: number, fh: FileHandle) {
    this.path = path;
    this.size = size;
    this.fh = fh;
  }

  static async open(path: string): Promise<FileBlocks> {
    const fh = await open(path, 'r');
    try {
      const st = await fh.stat();
      return new FileBlocks(path, st.size, fh);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  async ensure(offset: number, length: number): Promise<void> {
    if (this.fh === undefined) throw new StorageClosed(`file ${this.path}`);
    checkRange(offset, length, this.size);
  }

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    const fh = this.fh;
    if (fh === undefined) throw new StorageClosed(`file ${this.path}`);
    checkRange(offset, target.length, this.size);
    await readFully(fh, target, offset, this.path);
  }

  async diskUsage(): Promise<number> {
    return (await stat(this.path)).blocks * 512;
  }

  async close(): Promise<void> {
    const fh = this.fh;
    this.fh = undefined;
    await fh?.close();
  }
}

export function checkRange(offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`invalid range: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) throw new RangeError(`range [${offset}, ${offset + length}) passes the size ${size}`);
}

/**
 * pread until `target` is full; a file that ends early is an error, never a short read. What
 * the page cache holds is copied at once; the rest goes through the callback API on the
 * handle's fd (FileHandle.read costs about three times as much per call, which small random
 * reads such as 4 KiB NBD requests feel).
 */
export async function readFully(fh: FileHandle, target: Uint8Array, offset: number, what: string): Promise<void> {
  let done = readFromPageCache(fh.fd, target, 0, target.length, offset);
  while (done < target.length) {
    const bytesRead = await preadOnce(fh.fd, target, done, target.length - done, offset + done);
    if (bytesRead === 0)
      throw new RangeError(`${what} ends at ${offset + done}, read wanted ${offset + target.length}`);
    done += bytesRead;
  }
}

function preadOnce(fd: number, target: Uint8Array, at: number, length: number, position: number): Promise<number> {
  return new Promise((resolve, reject) => {
    read(fd, target, at, length, position, (err, bytesRead) => (err ? reject(err) : resolve(bytesRead)));
  });
}
