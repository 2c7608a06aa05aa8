import { z } from 'zod';
import { CHUNK_SIZE } from './chunk-cache.js';
import { DelayedBackend } from './delayed-backend.js';
import { DEFAULT_FETCH_POLICY, type FetchPolicy } from './fetch-policy.js';
import { openBackend } from './open-backend.js';
import type { StorageBackend } from './storage-backend.js';

/**
 * The bucket settings every service that reads builds shares (orchestrator, uffd-server,
 * block-server). One definition, so the flag, its environment alias and its check are the same
 * everywhere; each service keeps its own `bucket` default.
 */
export const gcsEndpointField = z
  .string()
  .url()
  .optional()
  .describe("a GCS JSON API endpoint other than Google's (fake-gcs-server, a gateway), unauthenticated")
  .meta({ aliases: ['SBX_GCS_ENDPOINT'] });

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const KiB = 1024;

/**
 * How builds are fetched from the bucket (chunk caches, libs/storage/README.md "Fetching"),
 * node-wide names shared by the services that read builds. Spread into a service's schema.
 */
export const bucketFetchFields = {
  bucketRequestDelayMs: int(0, 60_000)
    .default(0)
    .describe(
      'tests and benchmarks only: every bucket request waits this long first (a bucket with real latency; a local-directory bucket is then read through chunk caches like a remote one)',
    )
    .meta({ aliases: ['SBX_BUCKET_REQUEST_DELAY_MS'] }),
  fetchChunkKib: int(4, 64 * KiB)
    // A power of two, so a fault window cut to it stays aligned (uffd-server, sandbox-registry.ts).
    .refine((kib) => (kib & (kib - 1)) === 0, 'must be a power of two (4, 8, … 65536)')
    .default(CHUNK_SIZE / KiB)
    .describe('unit of presence of a chunk cache, in KiB, a power of two (adjacent chunks go out as one request)')
    .meta({ aliases: ['SBX_FETCH_CHUNK_KIB'] }),
  fetchConcurrency: int(1, 256)
    .default(DEFAULT_FETCH_POLICY.concurrency)
    .describe('bucket range requests in flight at once per cached file')
    .meta({ aliases: ['SBX_FETCH_CONCURRENCY'] }),
  fetchMaxRequestKib: int(0, 1024 * KiB)
    .default(DEFAULT_FETCH_POLICY.maxRequestBytes / KiB)
    .describe('largest coalesced range request, in KiB (0: one chunk per request)')
    .meta({ aliases: ['SBX_FETCH_MAX_REQUEST_KIB'] }),
  fetchReadAheadKib: int(0, 1024 * KiB)
    .default(DEFAULT_FETCH_POLICY.readAheadBytes / KiB)
    .describe('largest read-ahead window after sequential reads, in KiB (0: fetch only what readers ask for)')
    .meta({ aliases: ['SBX_FETCH_READ_AHEAD_KIB'] }),
};

export interface BucketSettings {
  bucket: string;
  gcsEndpoint?: string | undefined;
  bucketRequestDelayMs?: number;
}

export interface FetchSettings {
  fetchChunkKib: number;
  fetchConcurrency: number;
  fetchMaxRequestKib: number;
  fetchReadAheadKib: number;
}

/** The backend a service's bucket settings name (behind the configured request delay, if any). */
export function openConfiguredBackend(settings: BucketSettings): StorageBackend {
  const backend = openBackend(settings.bucket, settings.gcsEndpoint ? { apiEndpoint: settings.gcsEndpoint } : {});
  const delay = settings.bucketRequestDelayMs ?? 0;
  return delay > 0 ? new DelayedBackend(backend, delay) : backend;
}

/** BuildStore options from a service's fetch settings. */
export function configuredFetch(settings: FetchSettings): { chunkSize: number; fetch: FetchPolicy } {
  return {
    chunkSize: settings.fetchChunkKib * KiB,
    fetch: {
      concurrency: settings.fetchConcurrency,
      maxRequestBytes: settings.fetchMaxRequestKib * KiB,
      readAheadBytes: settings.fetchReadAheadKib * KiB,
    },
  };
}
