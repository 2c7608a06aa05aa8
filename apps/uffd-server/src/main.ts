import { serviceMain } from '#service-kit';
import { startUffdServer } from './run-service.js';
import { serveFile } from './serve-file-command.js';
import { serveFileConfigSchema, uffdServerConfigSchema } from './uffd-server-config.js';

export function main(argv: string[]): Promise<number> {
  return serviceMain('uffd-server', argv, [
    {
      name: 'serve',
      about: `Runs the service: guest memory for many sandboxes through userfaultfd. Each sandbox is
prepared over the gRPC control API (sbx.v1.UffdServer): the server listens on the sandbox's
uffd socket, takes Firecracker's handshake (JSON regions + userfaultfd [+ memfd]), serves faults
from the build's memory layers, tracks written pages, stops sourcing at pause and exports the
memory diff. grpc.health.v1 on the control socket.`,
      schema: uffdServerConfigSchema,
      run: startUffdServer,
    },
    {
      name: 'serve-file',
      synopsis: '--memfile <path> --socket <path> [flags]',
      about: `Standalone: listens on --socket, takes one Firecracker-style handshake and serves that
memory file until the peer goes away, then exits 0 (1 when serving failed).`,
      schema: serveFileConfigSchema,
      run: serveFile,
    },
  ]);
}
