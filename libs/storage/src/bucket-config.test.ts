import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { bucketFetchFields, configuredFetch, openConfiguredBackend } from './bucket-config.js';
import { CHUNK_SIZE } from './chunk-cache.js';
import { DelayedBackend } from './delayed-backend.js';
import { DEFAULT_FETCH_POLICY } from './fetch-policy.js';
import { LocalBackend } from './local-backend.js';

const schema = z.object({ bucket: z.string(), ...bucketFetchFields });

describe('bucket settings', () => {
  it('defaults to no delay and the default fetch policy', () => {
    const config = schema.parse({ bucket: '/tmp/b' });
    expect(openConfiguredBackend(config)).toBeInstanceOf(LocalBackend);
    expect(configuredFetch(config)).toEqual({ chunkSize: CHUNK_SIZE, fetch: DEFAULT_FETCH_POLICY });
  });

  it('puts a configured request delay in front of the bucket and reads the fetch settings as given (strings, as from the environment)', () => {
    const config = schema.parse({
      bucket: '/tmp/b',
      bucketRequestDelayMs: '50',
      fetchChunkKib: '256',
      fetchConcurrency: '8',
      fetchMaxRequestKib: '0',
      fetchReadAheadKib: '0',
    });
    const backend = openConfiguredBackend(config);
    expect(backend).toBeInstanceOf(DelayedBackend);
    expect((backend as DelayedBackend).delayMs).toBe(50);
    expect(configuredFetch(config)).toEqual({
      chunkSize: 256 * 1024,
      fetch: { concurrency: 8, maxRequestBytes: 0, readAheadBytes: 0 },
    });
  });

  it('refuses settings that cannot work', () => {
    expect(() => schema.parse({ bucket: '/b', fetchConcurrency: '0' })).toThrow();
    expect(() => schema.parse({ bucket: '/b', fetchChunkKib: '1' })).toThrow();
    // Not a power of two: a fault window cut to it would not stay aligned.
    expect(() => schema.parse({ bucket: '/b', fetchChunkKib: '12' })).toThrow(/power of two/);
    expect(() => schema.parse({ bucket: '/b', bucketRequestDelayMs: '-5' })).toThrow();
  });
});
