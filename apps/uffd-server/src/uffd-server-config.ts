import { z } from 'zod';
import { bucketFetchFields, gcsEndpointField } from '#storage';

const int = (min: number, max = Number.MAX_SAFE_INTEGER) => z.coerce.number().int().min(min).max(max);
const flag = (value: 'true' | 'false') =>
  z
    .enum(['true', 'false'])
    .default(value)
    .transform((v) => v === 'true');
const prefetchBytes = int(0)
  .default(2 * 1024 * 1024)
  .describe('bytes installed around a fault (its aligned window); 0 = the page only');
const readaheadWindows = int(0, 64)
  .default(0)
  .describe('prefetch windows copied ahead of sequential faults (0: on 2 loaded cores it cost more than it saved)');
const threads = int(1, 16).default(2).describe('native serving threads per sandbox (without the shared pool)');
const logLevel = z.string().default('info');

/** The one configuration schema of uffd-server (flags `--foo-bar`, env `SBX_UFFD_SERVER_FOO_BAR`). */
export const uffdServerConfigSchema = z.object({
  controlSocket: z.string().min(1).default('/run/sbx/uffd-server.sock'),
  socketMode: z.enum(['0600', '0660']).default('0600'),
  metricsHost: z.string().default('127.0.0.1'),
  metricsPort: int(0, 65535).default(9461).describe('Prometheus port, 0 = off'),
  bucket: z
    .string()
    .default('')
    .describe('builds: a local directory or gs://bucket')
    .meta({ aliases: ['SBX_BUCKET'] }),
  gcsEndpoint: gcsEndpointField,
  ...bucketFetchFields,
  cacheDir: z
    .string()
    .default('/var/lib/sbx/cache')
    .describe('local builds ({cache-dir}/builds/{id}) and chunk caches')
    .meta({ aliases: ['SBX_CACHE_DIR'] }),
  prefetchBytes,
  readaheadWindows,
  // On by default: the orchestrator takes the written pages from Firecracker's Diff snapshot
  // (KVM's dirty log), so prefetched pages stay out of the diff. Turn it off where pauses export
  // every present page (orchestrator --pause-memory-diff present).
  prefetchWithoutTracking: flag('true').describe('prefetch also when the uffd has no write-protect'),
  threadsPerSandbox: threads,
  servePoolThreads: int(0, 16)
    .default(0)
    .describe(
      "serve every sandbox's faults on a shared pool of this many threads, each sandbox owned by one (0: --threads-per-sandbox threads of its own each; 100 sandboxes held 200 threads)",
    ),
  handshakeTimeoutMs: int(1).default(60_000),
  fetchAttempts: int(1, 20).default(5).describe('attempts (first included) of a source fetch while the fault waits'),
  fetchRetryDelayMs: int(1).default(100),
  maxSandboxes: int(1).default(512),
  recordedPrefetch: flag('true').describe(
    "copy a build's recorded prefetch set (memfile.prefetch) in at resume and record the start's faults for the next build",
  ),
  prefetchRecordMs: int(1)
    .default(30_000)
    .describe('longest recording of the start (the orchestrator ends it sooner, once envd answers)'),
  stateDir: z
    .string()
    .default('')
    .describe('where served sandboxes are recorded for a restart to take back (default {control-socket}.sandboxes)'),
  logLevel,
});

export type UffdServerConfig = z.infer<typeof uffdServerConfigSchema>;

/** `serve-file`: one Firecracker-style handshake over a local memory file. */
export const serveFileConfigSchema = z.object({
  memfile: z.string().min(1).describe('the memory file to serve'),
  socket: z.string().min(1).describe('where to take the handshake'),
  pageSize: z.coerce
    .number()
    .int()
    .refine((v) => v === 4096 || v === 2097152, 'page size must be 4096 or 2097152')
    .default(4096),
  prefetchBytes,
  readaheadWindows,
  prefetchWithoutTracking: flag('false'),
  threads,
  logLevel,
});

export type ServeFileConfig = z.infer<typeof serveFileConfigSchema>;
