import { z } from 'zod';

/** `./sbx block-server serve --base <image> --socket <path> ...`: one export of a local image. */
export const standaloneConfigSchema = z.object({
  base: z.string().min(1, 'the base image path is required').describe('the image, never modified'),
  socket: z.string().min(1, 'the NBD socket path is required').describe('the NBD socket to serve on'),
  overlay: z
    .string()
    .min(1)
    .optional()
    .describe(
      'overlay directory, reopened with every flushed write after a restart (default: a temp dir removed on exit)',
    ),
  exportName: z.string().max(4096).default(''),
  blockSize: z.coerce.number().int().positive().multipleOf(512).default(4096),
  readMode: z
    .enum(['sync', 'async'])
    .default('sync')
    .describe('local files: sync pread (fast from the page cache, stalls the loop on a miss) or the libuv pool'),
  metricsPort: z.coerce.number().int().min(0).max(65535).default(0).describe('Prometheus port, 0 = off'),
  logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
});

export type StandaloneConfig = z.infer<typeof standaloneConfigSchema>;
