import { z } from 'zod';

/** `./sbx block-server serve` (service mode): flags `--foo-bar`, env `SBX_BLOCK_SERVER_FOO_BAR`. */
export const serviceConfigSchema = z.object({
  controlSocket: z.string().min(1).default('/run/sbx/block-server.sock'),
  /** Device state and overlays; must outlive the process for restart survival. */
  dataDir: z.string().min(1).default('/var/lib/sbx/block-server'),
  /** Where per-device NBD sockets are created. Default: `<data-dir>/nbd`. */
  nbdDir: z.string().min(1).optional(),
  /** Builds: a local directory or `gs://bucket` (falls back to SBX_BUCKET). */
  bucket: z.string().min(1).optional(),
  /** Chunk cache of build data fetched from the bucket (falls back to SBX_CACHE_DIR). */
  cacheDir: z.string().min(1).optional(),
  /**
   * How local files (local-bucket builds, overlays) are read: sync is fastest from the page
   * cache but stalls the event loop on a cache miss; async goes through the libuv pool.
   */
  readMode: z.enum(['sync', 'async']).default('sync'),
  metricsPort: z.coerce.number().int().min(0).max(65535).default(9462),
  /** auto: attach /dev/nbdX when asked and the kernel has NBD; off: never. */
  kernelAttach: z.enum(['auto', 'off']).default('auto'),
  /** How long export waits for the device's clients to go away. */
  releaseTimeoutMs: z.coerce.number().int().min(0).max(600_000).default(10_000),
  /** NBD socket permissions (0600 owner only; 0660 owner and group). */
  nbdSocketMode: z.enum(['0600', '0660']).default('0600'),
  logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
});

export type ServiceConfig = z.infer<typeof serviceConfigSchema>;
