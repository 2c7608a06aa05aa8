import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { TypedError } from '#service-kit';

/** No /dev/nbdX is free (all taken by us or busy in the kernel). */
export class NoFreeNbdDevice extends TypedError {
  readonly code = 'NO_FREE_NBD_DEVICE';
  constructor(readonly maxDevices: number) {
    super(`no free /dev/nbd device among ${maxDevices}`);
  }
}

/** A device we were asked to give back is still in use; retry after its users are gone. */
export class NbdDeviceInUse extends TypedError {
  readonly code = 'NBD_DEVICE_IN_USE';
  constructor(
    readonly index: number,
    readonly reason: string,
  ) {
    super(`/dev/nbd${index} still in use: ${reason}`);
  }
}

export interface NbdDevicePoolOptions {
  /** /sys (tests point it at a fake tree). */
  sysfs?: string;
  /** Extra check, e.g. netlink status "connected". */
  connected?: (index: number) => boolean;
}

/**
 * Hands out /dev/nbdX indices like the seed's nbd/pool.go, but a device counts as free only
 * when every sign of use is gone: no server pid, size 0, no requests in flight and no holders
 * (a mounted or device-mapped nbd has holders). E2B handed out devices whose previous user
 * was still draining (e2b-dev/infra#3652, #2826); here both acquire and release check all of it.
 */
export class NbdDevicePool {
  private readonly sysfs: string;
  private readonly taken = new Set<number>();
  private constructor(
    readonly maxDevices: number,
    private readonly options: NbdDevicePoolOptions,
  ) {
    this.sysfs = options.sysfs ?? '/sys';
  }

  static async open(options: NbdDevicePoolOptions = {}): Promise<NbdDevicePool> {
    const sysfs = options.sysfs ?? '/sys';
    const raw = await readFile(join(sysfs, 'module/nbd/parameters/nbds_max'), 'utf8');
    const max = Number.parseInt(raw.trim(), 10);
    if (!Number.isSafeInteger(max) || max <= 0) throw new Error(`nbds_max is ${JSON.stringify(raw.trim())}`);
    return new NbdDevicePool(max, options);
  }

  /** Why `index` is busy, or undefined when it is free. */
  async busyReason(index: number): Promise<string | undefined> {
    const dir = join(this.sysfs, 'block', `nbd${index}`);
    const pid = await readFile(join(dir, 'pid'), 'utf8').catch(() => undefined);
    if (pid !== undefined) return `served by pid ${pid.trim()}`;
    const size = await readFile(join(dir, 'size'), 'utf8').catch(() => undefined);
    if (size === undefined) return 'no such device';
    if (Number(size.trim()) !== 0) return `size ${size.trim()} sectors`;
    const inflight = await readFile(join(dir, 'inflight'), 'utf8').catch(() => '0 0');
    if (
      inflight
        .trim()
        .split(/\s+/)
        .some((n) => Number(n) !== 0)
    )
      return `requests in flight (${inflight.trim()})`;
    const holders = await readdir(join(dir, 'holders')).catch(() => [] as string[]);
    if (holders.length > 0) return `held by ${holders.join(', ')}`;
    if (this.options.connected?.(index)) return 'connected (netlink status)';
    return undefined;
  }

  /** A free index, marked taken until released. */
  async acquire(): Promise<number> {
    for (let index = 0; index < this.maxDevices; index++) {
      if (this.taken.has(index)) continue;
      // Taken before the check so a concurrent acquire cannot pick the same index.
      this.taken.add(index);
      if ((await this.busyReason(index)) === undefined) return index;
      this.taken.delete(index);
    }
    throw new NoFreeNbdDevice(this.maxDevices);
  }

  /** Marks an index ours without checking (a device reattached after a restart). */
  claim(index: number): void {
    this.taken.add(index);
  }

  /** Gives an index back; refuses (NbdDeviceInUse) while the kernel still uses it. */
  async release(index: number): Promise<void> {
    const reason = await this.busyReason(index);
    if (reason !== undefined) throw new NbdDeviceInUse(index, reason);
    this.taken.delete(index);
  }

  /** Polls until the device is free, then releases it; NbdDeviceInUse after `timeoutMs`. */
  async waitAndRelease(index: number, timeoutMs: number, pollMs = 20): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        return await this.release(index);
      } catch (err) {
        if (!(err instanceof NbdDeviceInUse) || Date.now() >= deadline) throw err;
      }
      await new Promise((resolve) => setTimeout(resolve, pollMs));
    }
  }

  get inUse(): number[] {
    return [...this.taken].sort((a, b) => a - b);
  }
}
