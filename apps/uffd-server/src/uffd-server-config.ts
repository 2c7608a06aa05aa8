import { z } from 'zod';

const size = z.coerce.number().int().nonnegative();

/** The one configuration schema of uffd-server (flags `--foo-bar`, env `SBX_UFFD_SERVER_FOO_BAR`). */
export const uffdServerConfigSchema = z.object({
  controlSocket: z.string().min(1).default('/run/sbx/uffd-server.sock'),
  socketMode: z.enum(['0600', '0660']).default('0600'),
  metricsHost: z.string().default('127.0.0.1'),
  /** Prometheus port; 0 turns the endpoint off. */
  metricsPort: z.coerce.number().int().min(0).max(65535).default(9461),
  /** Where builds live: a local directory or gs://bucket (shared setting SBX_BUCKET). */
  bucket: z.string().default(''),
  /** Local build directory and caches (shared setting SBX_CACHE_DIR): builds in {cacheDir}/builds/{id}/. */
  cacheDir: z.string().default('/var/lib/sbx/cache'),
  /** Bytes installed around a fault (the aligned window holding it); 0 = only the faulted page. */
  prefetchBytes: size.default(2 * 1024 * 1024),
  /** Prefetch windows copied ahead of a sequential stream of faults (0 = off: on 2 loaded cores it cost more than it saved). */
  readaheadWindows: z.coerce.number().int().min(0).max(64).default(0),
  /**
   * Prefetch also when the uffd has no write-protect (upstream Firecracker). On by default: the
   * orchestrator takes the written pages from Firecracker's Diff snapshot (KVM's dirty log), so
   * prefetched pages stay out of the diff. Turn it off where pauses export every present page
   * (orchestrator --pause-memory-diff present): every prefetched page would land in the diff.
   */
  prefetchWithoutTracking: z
    .enum(['true', 'false'])
    .default('true')
    .transform((v) => v === 'true'),
  /** Native serving threads per sandbox. */
  threadsPerSandbox: z.coerce.number().int().min(1).max(16).default(2),
  handshakeTimeoutMs: z.coerce.number().int().positive().default(60_000),
  /** Attempts (first included) of a transient source fetch while the fault waits. */
  fetchAttempts: z.coerce.number().int().min(1).max(20).default(5),
  fetchRetryDelayMs: z.coerce.number().int().min(1).default(100),
  maxSandboxes: z.coerce.number().int().positive().default(512),
  logLevel: z.string().default('info'),
});

export type UffdServerConfig = z.infer<typeof uffdServerConfigSchema>;

/** `serve-file`: one Firecracker-style handshake over a local memory file. */
export const serveFileConfigSchema = z.object({
  memfile: z.string().min(1),
  socket: z.string().min(1),
  pageSize: z.coerce
    .number()
    .int()
    .refine((v) => v === 4096 || v === 2097152, 'page size must be 4096 or 2097152')
    .default(4096),
  prefetchBytes: size.default(2 * 1024 * 1024),
  readaheadWindows: z.coerce.number().int().min(0).max(64).default(0),
  prefetchWithoutTracking: z
    .enum(['true', 'false'])
    .default('false')
    .transform((v) => v === 'true'),
  threads: z.coerce.number().int().min(1).max(16).default(2),
  logLevel: z.string().default('info'),
});

export type ServeFileConfig = z.infer<typeof serveFileConfigSchema>;
