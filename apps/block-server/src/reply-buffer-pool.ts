/**
 * Reuses the big buffers READ replies are built in. Allocating a fresh 1 MiB buffer per
 * request makes V8 count megabytes of external memory per millisecond and collect garbage
 * constantly; recycling them once the socket has sent them keeps sequential reads off the GC.
 * Small replies come from Node's own slab allocator and are not pooled.
 */
export class ReplyBufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private pooledBytes = 0;

  constructor(
    private readonly maxPooledBytes = 64 * 1024 * 1024,
    readonly minSize = 64 * 1024,
  ) {}

  take(size: number): Buffer {
    if (size < this.minSize) return Buffer.allocUnsafe(size);
    const list = this.free.get(size);
    const buffer = list?.pop();
    if (buffer) {
      this.pooledBytes -= size;
      return buffer;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  /** Hands a buffer back once nothing reads it any more (its socket write has completed). */
  give(buffer: Buffer): void {
    const size = buffer.length;
    if (size < this.minSize || this.pooledBytes + size > this.maxPooledBytes) return;
    let list = this.free.get(size);
    if (!list) this.free.set(size, (list = []));
    list.push(buffer);
    this.pooledBytes += size;
  }
}

/** One pool per process: every connection's replies draw from it. */
export const replyBuffers = new ReplyBufferPool();
