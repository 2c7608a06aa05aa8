import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { dial } from '#grpc';
import { UffdServerClient } from '#proto/sbx/uffd';
import { acceptsConnections, grpcServing, ServiceProcess } from '#test-kit';

/**
 * The double's real peers, as the orchestrator starts them on a node: `./sbx uffd-server serve`
 * with its bucket and cache under `dir`, and a client on its control socket.
 */
export async function startUffdServer(dir: string): Promise<{ service: ServiceProcess; client: UffdServerClient }> {
  const ctl = join(dir, 'uffd-ctl.sock');
  mkdirSync(join(dir, 'bucket'), { recursive: true });
  const service = await ServiceProcess.start({
    args: [
      'uffd-server',
      'serve',
      '--control-socket',
      ctl,
      '--bucket',
      join(dir, 'bucket'),
      '--cache-dir',
      join(dir, 'cache'),
      '--metrics-port',
      '0',
    ],
    ready: grpcServing(ctl),
  });
  return { service, client: dial(UffdServerClient, ctl) };
}

/** `./sbx block-server serve`: the image `base` exported over NBD on `socket` (standalone, no control socket). */
export function startNbdExport(base: string, socket: string, flags: string[] = []): Promise<ServiceProcess> {
  return ServiceProcess.start({
    args: ['block-server', 'serve', '--base', base, '--socket', socket, ...flags],
    ready: acceptsConnections(socket),
  });
}
