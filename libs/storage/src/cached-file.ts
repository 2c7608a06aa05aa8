import type { ReadableBlocks } from './block-source.js';

/**
 * A build data file that lives (or is being filled) at a local `path`. After
 * `ensure(offset, length)` resolves, those bytes are in the file, so a consumer may map it and
 * copy from it directly (the uffd-server does, to hand pages to UFFDIO_COPY without a copy
 * through the JS heap).
 */
export interface CachedFile extends ReadableBlocks {
  readonly path: string;
  ensure(offset: number, length: number): Promise<void>;
  /** Bytes the file takes on disk (allocated blocks, not its apparent size). */
  diskUsage(): Promise<number>;
}
