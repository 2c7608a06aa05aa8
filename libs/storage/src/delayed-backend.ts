import type { StorageBackend, UploadOptions } from './storage-backend.js';

/**
 * A backend whose every request waits `delayMs` before it is sent: the latency of a real bucket
 * (GCS answers a ranged read in tens of milliseconds) in front of a local directory or a bucket
 * double, for tests and benchmarks of cold resume. Not for production: it only slows things.
 * Requests overlap as they would against a bucket: the delay is per request, not a queue.
 * Not a LocalBackend, so a build store reads it through chunk caches as it reads a bucket.
 */
export class DelayedBackend implements StorageBackend {
  readonly location: string;
  readonly inner: StorageBackend;
  readonly delayMs: number;
  /** Requests sent so far and the bytes ranged reads returned: what a cold resume cost. */
  readonly counters = { requests: 0, rangeBytes: 0 };
  private readonly waiting = new Map<NodeJS.Timeout, () => void>();

  constructor(inner: StorageBackend, delayMs: number) {
    if (!Number.isFinite(delayMs) || delayMs < 0) throw new RangeError(`request delay ${delayMs} ms invalid`);
    this.inner = inner;
    this.delayMs = delayMs;
    this.location = `${inner.location} (+${delayMs} ms per request)`;
  }

  async readRange(objectPath: string, offset: number, length: number): Promise<Buffer> {
    await this.wait();
    const data = await this.inner.readRange(objectPath, offset, length);
    this.counters.rangeBytes += data.length;
    return data;
  }

  async read(objectPath: string): Promise<Buffer> {
    await this.wait();
    return this.inner.read(objectPath);
  }

  async size(objectPath: string): Promise<number> {
    await this.wait();
    return this.inner.size(objectPath);
  }

  async exists(objectPath: string): Promise<boolean> {
    await this.wait();
    return this.inner.exists(objectPath);
  }

  async write(objectPath: string, data: Uint8Array): Promise<void> {
    await this.wait();
    return this.inner.write(objectPath, data);
  }

  async upload(objectPath: string, localFile: string, options?: UploadOptions): Promise<void> {
    await this.wait();
    return this.inner.upload(objectPath, localFile, options);
  }

  async download(objectPath: string, localFile: string): Promise<void> {
    await this.wait();
    return this.inner.download(objectPath, localFile);
  }

  async list(prefix: string): Promise<string[]> {
    await this.wait();
    return this.inner.list(prefix);
  }

  async delete(objectPath: string): Promise<void> {
    await this.wait();
    return this.inner.delete(objectPath);
  }

  /** Requests still waiting out their delay are let go at once (they then reach the closed inner backend). */
  async close(): Promise<void> {
    for (const [timer, release] of this.waiting) {
      clearTimeout(timer);
      release();
    }
    this.waiting.clear();
    await this.inner.close();
  }

  private wait(): Promise<void> {
    this.counters.requests++;
    if (this.delayMs === 0) return Promise.resolve();
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        this.waiting.delete(timer);
        resolve();
      }, this.delayMs);
      this.waiting.set(timer, resolve);
    });
  }
}
