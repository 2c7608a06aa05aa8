import { z } from 'zod';
import { logLevel, port, readMode } from './service-config.js';

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
  readMode,
  metricsPort: port.default(0).describe('Prometheus port, 0 = off'),
  logLevel,
});

export type StandaloneConfig = z.infer<typeof standaloneConfigSchema>;
