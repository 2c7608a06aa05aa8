import type { ReadableBlocks } from './block-source.js';

/** Told about transient failures retried while filling a range (the uffd-server counts them per sandbox). */
export type RetryObserver = (event: { attempt: number; error: unknown }) => void;

/**
 * A build data file that lives (or is being filled) at a local `path`: the mappable layer.
 * After `ensure(offset, length)` resolves, those bytes are in the file, so a consumer may map
 * it and copy from it directly (the uffd engine does UFFDIO_COPY from the mapping, with no copy
 * through the JS heap). Transient fetch failures are retried here and nowhere above.
 */
export interface CachedFile extends ReadableBlocks {
  readonly path: string;
  /** Every byte is in the file already: `ensure` only checks the range. */
  readonly complete: boolean;
  /**
   * Bytes fetched at a time while not complete (a chunk cache's chunk): a consumer that ensures
   * whole windows (the uffd engine) fetches nothing nobody touched with windows no larger.
   */
  readonly fetchUnit?: number;
  ensure(offset: number, length: number, onRetry?: RetryObserver): Promise<void>;
  /** Bytes the file takes on disk (allocated blocks, not its apparent size). */
  diskUsage(): Promise<number>;
  /**
   * Fetches ranges before anyone reads them (a recorded prefetch set), behind what readers wait
   * for; absent on files that are complete. Failures are counted, not thrown.
   */
  prefetch?(ranges: ReadonlyArray<{ offset: number; length: number }>): Promise<{ chunks: number; failed: number }>;
  /** True when every byte of the range is here now (no fetch needed); absent on files that are complete. */
  isPresent?(offset: number, length: number): boolean;
}
