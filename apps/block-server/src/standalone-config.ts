import { z } from 'zod';

/** `./sbx block-server serve --base <image> --socket <path> ...`: one export of a local image. */
export const standaloneConfigSchema = z.object({
  base: z.string().min(1, 'the base image path is required'),
  socket: z.string().min(1, 'the NBD socket path is required'),
  /** Where the overlay lives; reusing it after a restart keeps every flushed write. Default: a temp dir removed on exit. */
  overlay: z.string().min(1).optional(),
  exportName: z.string().max(4096).default(''),
  blockSize: z.coerce.number().int().positive().multipleOf(512).default(4096),
  /** How local files are read: sync (fast from the page cache, blocks the loop on a miss) or async (libuv pool). */
  readMode: z.enum(['sync', 'async']).default('sync'),
  metricsPort: z.coerce.number().int().min(0).max(65535).default(0),
  logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
});

export type StandaloneConfig = z.infer<typeof standaloneConfigSchema>;
