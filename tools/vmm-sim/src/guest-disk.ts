import { constants as fsConstants } from 'node:fs';
import { open, readFile, stat, type FileHandle } from 'node:fs/promises';
import type { Logger } from '#logging';
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
  options: { readOnly: boolean; nbdExportName?: string; reconnectTimeoutMs?: number; logger?: Logger },
): Promise<GuestDisk> {
  let info;
  try {
    info = await stat(path);
  } catch (err) {
    throw new VmmFailure('DRIVE_OPEN', `cannot open drive ${path}: ${(err as Error).message}`, { path });
  }
  if (info.isSocket()) {
    const exportName = options.nbdExportName ?? '';
    const client = await NbdClient.connect(path, exportName);
    return new NbdDisk(
      client,
      path,
      options.readOnly || client.readOnly,
      exportName,
      options.reconnectTimeoutMs ?? NBD_RECONNECT_TIMEOUT_MS,
      options.logger,
    );
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

/**
 * How long a drive waits for its NBD server to come back before failing I/O, like the kernel
 * nbd driver's dead-connection timeout (block-server restarts keep devices; DESIGN.md §3).
 */
export const NBD_RECONNECT_TIMEOUT_MS = 120_000;
const RECONNECT_RETRY_MS = 100;

/**
 * A drive on an NBD socket that survives the server restarting: a request that failed because
 * the connection broke is sent again on a new connection to the same path (requeued, as the
 * kernel does on reconfigure). Writes are idempotent; what the server acknowledged as flushed
 * before it went is on its disk, so only unflushed writes a crashed server dropped can be lost.
 */
class NbdDisk implements GuestDisk {
  readonly kind = 'nbd' as const;
  private reconnecting: Promise<void> | undefined;
  private dead: Error | undefined;
  private closed = false;
  constructor(
    private client: NbdClient,
    readonly path: string,
    readonly readOnly: boolean,
    private readonly exportName: string,
    private readonly reconnectTimeoutMs: number,
    private readonly logger: Logger | undefined,
  ) {}
  get size(): number {
    return this.client.size;
  }
  readAt(target: Uint8Array, offset: number): Promise<void> {
    return this.io((c) => c.readAt(target, offset));
  }
  writeAt(source: Uint8Array, offset: number): Promise<void> {
    if (this.readOnly) return Promise.reject(new VmmFailure('DRIVE_READ_ONLY', `drive ${this.path} is read-only`));
    return this.io((c) => c.writeAt(source, offset));
  }
  zeroAt(offset: number, length: number): Promise<void> {
    return this.io((c) => c.zeroAt(offset, length));
  }
  flush(): Promise<void> {
    return this.io((c) => c.flush());
  }
  close(): Promise<void> {
    this.closed = true;
    return this.client.close();
  }

  private async io(op: (client: NbdClient) => Promise<void>): Promise<void> {
    for (;;) {
      if (this.dead) throw this.dead;
      const client = this.client;
      try {
        return await op(client);
      } catch (err) {
        if (!client.broken || this.closed) throw err;
        await this.reconnect(client);
      }
    }
  }

  /** One reconnection at a time, however many requests saw the connection break. */
  private reconnect(broken: NbdClient): Promise<void> {
    if (this.client !== broken) return Promise.resolve();
    this.reconnecting ??= this.connectAgain(broken).finally(() => (this.reconnecting = undefined));
    return this.reconnecting;
  }

  private async connectAgain(broken: NbdClient): Promise<void> {
    const deadline = Date.now() + this.reconnectTimeoutMs;
    let last = 'no attempt';
    this.logger?.warn({ path: this.path }, 'NBD connection lost; reconnecting');
    while (!this.closed && Date.now() < deadline) {
      try {
        const next = await NbdClient.connect(this.path, this.exportName, Math.max(100, deadline - Date.now()));
        if (next.size !== broken.size) {
          await next.close();
          throw new VmmFailure('NBD_RECONNECT', `NBD export at ${this.path} changed size on reconnect`, {
            was: broken.size,
            now: next.size,
          });
        }
        this.client = next;
        await broken.close().catch(() => undefined);
        this.logger?.info({ path: this.path }, 'NBD connection re-established');
        return;
      } catch (err) {
        if (err instanceof VmmFailure && err.code === 'NBD_RECONNECT') {
          this.dead = err;
          throw err;
        }
        last = (err as Error).message;
      }
      await new Promise((r) => setTimeout(r, RECONNECT_RETRY_MS));
    }
    this.dead = new VmmFailure(
      'NBD_DEAD',
      `NBD server at ${this.path} did not come back within ${this.reconnectTimeoutMs} ms: ${last}`,
    );
    throw this.dead;
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
