import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { copyFile, mkdir, open, readdir, readFile, rename, rm, stat, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { checkObjectPath } from './object-paths.js';
import type { StorageBackend, UploadOptions } from './storage-backend.js';
import { ObjectNotFound, StorageUnavailable } from './storage-errors.js';

/** Marks files being written; listing skips them and a rename publishes them whole. */
const TEMP_MARK = '.sbx-tmp-';

/** Errors a local filesystem can give that may pass on their own. */
const TRANSIENT_CODES = new Set(['EIO', 'EAGAIN', 'EMFILE', 'ENFILE', 'EBUSY', 'ETIMEDOUT']);

/** A local directory used as the bucket (local mode, tests, and a node's own fresh builds). */
export class LocalBackend implements StorageBackend {
  readonly root: string;
  readonly location: string;

  constructor(root: string) {
    this.root = path.resolve(root);
    this.location = this.root;
  }

  /** Absolute path of an object on disk. */
  pathOf(objectPath: string): string {
    return path.join(this.root, checkObjectPath(objectPath));
  }

  async readRange(objectPath: string, offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new RangeError(`invalid range: offset ${offset}, length ${length}`);
    }
    const file = this.pathOf(objectPath);
    const fh = await open(file, fsConstants.O_RDONLY).catch((err: unknown) => this.fail('open', objectPath, err));
    try {
      // Every byte is read into it or the call fails: no need to zero it first.
      const out = Buffer.allocUnsafe(length);
      let done = 0;
      while (done < length) {
        const { bytesRead } = await fh
          .read(out, done, length - done, offset + done)
          .catch((err: unknown) => this.fail('read', objectPath, err));
        if (bytesRead === 0) {
          throw new RangeError(
            `range [${offset}, ${offset + length}) passes the end of ${objectPath} (${offset + done})`,
          );
        }
        done += bytesRead;
      }
      return out;
    } finally {
      await fh.close();
    }
  }

  async read(objectPath: string): Promise<Buffer> {
    return readFile(this.pathOf(objectPath)).catch((err: unknown) => this.fail('read', objectPath, err));
  }

  async size(objectPath: string): Promise<number> {
    const st = await stat(this.pathOf(objectPath)).catch((err: unknown) => this.fail('stat', objectPath, err));
    if (!st.isFile()) throw new ObjectNotFound(objectPath, this.location);
    return st.size;
  }

  async exists(objectPath: string): Promise<boolean> {
    try {
      await this.size(objectPath);
      return true;
    } catch (err) {
      if (err instanceof ObjectNotFound) return false;
      throw err;
    }
  }

  async write(objectPath: string, data: Uint8Array): Promise<void> {
    await this.publish(objectPath, (tmp) => writeFile(tmp, data, { flag: 'wx' }));
  }

  async upload(objectPath: string, localFile: string, options: UploadOptions = {}): Promise<void> {
    const size = (await stat(localFile)).size;
    await this.publish(objectPath, (tmp) => copyFile(localFile, tmp, fsConstants.COPYFILE_EXCL));
    options.onProgress?.(size);
  }

  async download(objectPath: string, localFile: string): Promise<void> {
    const source = this.pathOf(objectPath);
    const tmp = `${localFile}${TEMP_MARK}${randomBytes(4).toString('hex')}`;
    await mkdir(path.dirname(localFile), { recursive: true });
    try {
      await copyFile(source, tmp).catch((err: unknown) => this.fail('download', objectPath, err));
      await rename(tmp, localFile);
    } catch (err) {
      await rm(tmp, { force: true });
      throw err;
    }
  }

  async list(prefix: string): Promise<string[]> {
    let entries;
    try {
      entries = await readdir(this.root, { recursive: true, withFileTypes: true });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      throw err;
    }
    const out: string[] = [];
    for (const e of entries) {
      if (!e.isFile() || e.name.includes(TEMP_MARK)) continue;
      const rel = path.relative(this.root, path.join(e.parentPath, e.name)).split(path.sep).join('/');
      if (rel.startsWith(prefix)) out.push(rel);
    }
    return out.sort();
  }

  async delete(objectPath: string): Promise<void> {
    try {
      await unlink(this.pathOf(objectPath));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') this.fail('delete', objectPath, err);
    }
  }

  async close(): Promise<void> {}

  /** Writes through a temporary file in the same directory, then renames it into place. */
  private async publish(objectPath: string, fill: (tmp: string) => Promise<void>): Promise<void> {
    const dest = this.pathOf(objectPath);
    await mkdir(path.dirname(dest), { recursive: true });
    const tmp = `${dest}${TEMP_MARK}${randomBytes(4).toString('hex')}`;
    try {
      await fill(tmp);
      await rename(tmp, dest);
    } catch (err) {
      await rm(tmp, { force: true });
      this.fail('write', objectPath, err);
    }
  }

  private fail(operation: string, objectPath: string, err: unknown): never {
    const code = (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'EISDIR')
      throw new ObjectNotFound(objectPath, this.location);
    if (code !== undefined && TRANSIENT_CODES.has(code)) throw new StorageUnavailable(operation, objectPath, err);
    throw err;
  }
}
