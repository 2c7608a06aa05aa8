import { z } from 'zod';
import { bucketFetchFields, gcsEndpointField } from '#storage';

/** How local files are read; shared with the standalone mode. */
export const readMode = z
  .enum(['sync', 'async'])
  .default('sync')
  .describe('local files: sync pread (fast from the page cache, stalls the loop on a miss) or the libuv pool');
export const port = z.coerce.number().int().min(0).max(65535);
export const logLevel = z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info');

/** `./sbx block-server serve` (service mode): flags `--foo-bar`, env `SBX_BLOCK_SERVER_FOO_BAR`. */
export const serviceConfigSchema = z.object({
  controlSocket: z.string().min(1).default('/run/sbx/block-server.sock'),
  dataDir: z
    .string()
    .min(1)
    .default('/var/lib/sbx/block-server')
    .describe('device state and overlays; must outlive the process for restart survival'),
  nbdDir: z.string().min(1).optional().describe('where per-device NBD sockets are made (default <data-dir>/nbd)'),
  bucket: z
    .string()
    .min(1)
    .optional()
    .describe('builds: a local directory or gs://bucket')
    .meta({ aliases: ['SBX_BUCKET'] }),
  gcsEndpoint: gcsEndpointField,
  ...bucketFetchFields,
  cacheDir: z
    .string()
    .min(1)
    .optional()
    .describe('local builds and the chunk cache of bucket data (default <data-dir>/cache)')
    .meta({ aliases: ['SBX_CACHE_DIR'] }),
  readMode,
  metricsPort: port.default(9462).describe('Prometheus port, 0 = off'),
  kernelAttach: z.enum(['auto', 'off']).default('auto').describe('attach /dev/nbdX when asked and the kernel has NBD'),
  releaseTimeoutMs: z.coerce
    .number()
    .int()
    .min(0)
    .max(600_000)
    .default(10_000)
    .describe("how long export waits for the device's clients to go away"),
  nbdSocketMode: z.enum(['0600', '0660']).default('0600').describe('NBD socket permissions'),
  logLevel,
});

export type ServiceConfig = z.infer<typeof serviceConfigSchema>;
