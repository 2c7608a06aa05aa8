import { serviceMain } from '#service-kit';
import { startBlockServer } from './block-service.js';
import { serviceConfigSchema } from './service-config.js';
import { standaloneConfigSchema } from './standalone-config.js';
import { serveImage } from './standalone-serve.js';

export function main(argv: string[]): Promise<number> {
  return serviceMain('block-server', argv, [
    {
      name: 'serve',
      synopsis: '--base <image> --socket <path> [flags]',
      about: `Standalone: serves one copy-on-write export of a local image over NBD until killed. The
image is never modified. With --overlay, writes flushed by the client survive a restart that
reuses the same directory. Connect with any NBD client: nbdinfo 'nbd+unix:///?socket=<path>'.`,
      schema: standaloneConfigSchema,
      when: (args) => args.some((arg) => arg === '--base' || arg.startsWith('--base=')),
      run: serveImage,
    },
    {
      name: 'serve',
      about: `Runs the service: copy-on-write NBD devices per sandbox, opened, exported and closed over
the gRPC control API (sbx.v1.BlockServer) on --control-socket. Devices survive a restart of
this process: their state lives in --data-dir and they are reopened at start.`,
      schema: serviceConfigSchema,
      run: startBlockServer,
    },
  ]);
}
