import { constants as fsConstants } from 'node:fs';
import { open, readFile, stat, type FileHandle } from 'node:fs/promises';
import type { WritableBlocks } from '#storage';
import { VmmFailure } from './api-error.js';
import { NbdClient } from './nbd-client.js';

/**
 * The guest's root (or any) drive, opened the way Firecracker opens `path_on_host`: a block
 * device (e.g. /dev/nbdX where the kernel has NBD) or a regular image file with pread/pwrite,
 * or, for this double only, an NBD Unix socket spoken to directly (the machine has no NBD
 * module, so the block-server's socket stands where /dev/nbdX would be).
 */
export interface GuestDisk extends WritableBlocks {
  readonly kind: 'nbd' | 'block-device' | 'file';
  readonly path: string;
  readonly readOnly: boolean;
}

export async function openGuestDisk(
  path: string,
  options: { readOnly: boolean; nbdExportName?: string },
): Promise<GuestDisk> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    throw new VmmFailure('DRIVE_OPEN', `cannot open drive ${path}: ${(err as Error).message}`, { path });
  }
  if (info.isSocket()) {
    const client = await NbdClient.connect(path, options.nbdExportName ?? '');
    return new NbdDisk(client, path, options.readOnly || client.readOnly);
  }
  if (info.isBlockDevice() || info.isFile()) {
    const flags = options.readOnly ? fsConstants.O_RDONLY : fsConstants.O_RDWR;
    const handle = await open(path, flags);
    try {
      const size = info.isFile() ? info.size : await blockDeviceSize(info.rdev);
      return new FileDisk(handle, path, size, info.isFile() ? 'file' : 'block-device', options.readOnly);
    } catch (err) {
      await handle.close();
      throw err;
    }
  }
  throw new VmmFailure('DRIVE_OPEN', `drive ${path} is neither a block device, a file nor an NBD socket`, { path });
}

/** /sys/dev/block/MAJ:MIN/size counts 512-byte sectors whatever the logical block size. */
async function blockDeviceSize(rdev: number): Promise<number> {
  const major = Number((BigInt(rdev) >> 8n) & 0xfffn) | Number((BigInt(rdev) >> 32n) & ~0xfffn);
  const minor = Number(BigInt(rdev) & 0xffn) | Number((BigInt(rdev) >> 12n) & ~0xffn);
  const sectors = Number((await readFile(`/sys/dev/block/${major}:${minor}/size`, 'utf8')).trim());
  return sectors * 512;
}

class NbdDisk implements GuestDisk {
  readonly kind = 'nbd' as const;
  constructor(
    private readonly client: NbdClient,
    readonly path: string,
    readonly readOnly: boolean,
  ) {}
  get size(): number {
    return this.client.size;
  }
  readAt(target: Uint8Array, offset: number): Promise<void> {
    return this.client.readAt(target, offset);
  }
  writeAt(source: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new VmmFailure('DRIVE_READ_ONLY', `drive ${this.path} is read-only`));
    return this.client.writeAt(source, offset);
  }
  zeroAt(offset: number, length: number): Promise<void> {
    return this.client.zeroAt(offset, length);
  }
  flush(): Promise<void> {
    return this.client.flush();
  }
  close(): Promise<void> {
    return this.client.close();
  }
}

class FileDisk implements GuestDisk {
  private closed = false;
  constructor(
    private readonly handle: FileHandle,
    readonly path: string,
    readonly size: number,
    readonly kind: 'file' | 'block-device',
    readonly readOnly: boolean,
  ) {}

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    this.check(offset, target.length);
    let done = 0;
    while (done < target.length) {
      const { bytesRead } = await this.handle.read(target, done, target.length - done, offset + done);
      if (bytesRead === 0) throw new VmmFailure('DRIVE_SHORT_READ', `short read from ${this.path} at ${offset + done}`);
      done += bytesRead;
    }
  }

  async writeAt(source: Uint8Array, offset: number): Promise<void> {
    this.check(offset, source.length);
    let done = 0;
    while (done < source.length) {
      const { bytesWritten } = await this.handle.write(source, done, source.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async zeroAt(offset: number, length: number): Promise<void> {
    await this.writeAt(new Uint8Array(length), offset);
  }

  async flush(): Promise<void> {
    if (!this.readOnly) await this.handle.datasync();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.handle.close();
  }

  private check(offset: number, length: number): void {
    if (this.closed) throw new VmmFailure('DRIVE_CLOSED', `drive ${this.path} is closed`);
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`range [${offset}, ${offset + length}) outside drive ${this.path} of ${this.size} bytes`);
    }
  }
}
