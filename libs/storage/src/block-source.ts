/**
 * The one shape of everything bytes are read from on the memory and disk paths
 * (STYLE.md: data paths stack like nbdkit filters). A bucket object, a chunk cache, a
 * layered build file, a copy-on-write overlay and a dirty tracker all implement it and
 * wrap one another; the NBD and UFFD servers at the top only see this interface.
 */
export interface ReadableBlocks {
  /** Size of the virtual file in bytes. */
  readonly size: number;
  /**
   * Fills `target` with the bytes at `[offset, offset + target.length)`. Rejects with a
   * RangeError when the range passes `size`. Never returns short.
   */
  readAt(target: Uint8Array, offset: number): Promise<void>;
  /** Releases fds, mappings and timers. Idempotent. */
  close(): Promise<void>;
}

export interface WritableBlocks extends ReadableBlocks {
  writeAt(source: Uint8Array, offset: number): Promise<void>;
  /** Marks `[offset, offset + length)` as zeros without storing data (TRIM, WRITE_ZEROES). */
  zeroAt(offset: number, length: number): Promise<void>;
  /** Makes every acknowledged write durable. */
  flush(): Promise<void>;
}
