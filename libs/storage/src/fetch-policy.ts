/** How a chunk cache fetches from the bucket: in parallel, coalesced, ahead of its readers. */
export interface FetchPolicy {
  /** Range requests in flight at once, per cached file. */
  concurrency: number;
  /** Adjacent chunks wanted at the same time go out as one range request of at most this many bytes. */
  maxRequestBytes: number;
  /** Largest read-ahead window after a sequential reader, in bytes (0: fetch only what readers ask for). */
  readAheadBytes: number;
}

const MiB = 1024 * 1024;

export const DEFAULT_FETCH_POLICY: FetchPolicy = {
  concurrency: 16,
  maxRequestBytes: 4 * MiB,
  readAheadBytes: 16 * MiB,
};

/**
 * The fetch path before issue 17, for comparisons (bench/cold-resume): each chunk its own
 * request, only the chunks readers ask for, no bound on requests in flight.
 */
export const DEMAND_ONLY_FETCH_POLICY: FetchPolicy = {
  concurrency: Number.MAX_SAFE_INTEGER,
  maxRequestBytes: 0,
  readAheadBytes: 0,
};
