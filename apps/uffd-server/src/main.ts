import { ConfigInvalid } from '#config';
import { runService } from './run-service.js';
import { serveFile } from './serve-file-command.js';

const HELP = `usage:
  ./sbx uffd-server serve [--control-socket <control.sock>] [--bucket <dir|gs://bucket>] [--cache-dir <dir>]
                          [--metrics-port <port>] [--prefetch-bytes <n>] [--readahead-windows <n>] [--threads-per-sandbox <n>]
                          [--handshake-timeout-ms <ms>] [--fetch-attempts <n>] [--max-sandboxes <n>]
      Runs the service: guest memory for many sandboxes through userfaultfd. Each sandbox is
      prepared over the gRPC control API (sbx.v1.UffdServer, default /run/sbx/uffd-server.sock):
      the server listens on the sandbox's uffd socket, takes Firecracker's handshake (JSON
      regions + userfaultfd [+ memfd]), serves faults from the build's memory layers, tracks
      written pages, stops sourcing at pause and exports the memory diff.
      Environment: SBX_UFFD_SERVER_<FLAG> (e.g. SBX_UFFD_SERVER_PREFETCH_BYTES), SBX_BUCKET, SBX_CACHE_DIR.
      Metrics on 127.0.0.1:9461 (0 = off); grpc.health.v1 on the control socket.

  ./sbx uffd-server serve-file --memfile <path> --socket <path> [--page-size 4096|2097152]
                               [--prefetch-bytes <n>] [--readahead-windows <n>] [--threads <n>]
      Standalone: listens on --socket, takes one Firecracker-style handshake and serves that
      memory file until the peer goes away, then exits 0 (1 when serving failed).`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help' || rest.includes('--help')) {
    console.log(HELP);
    return command ? 0 : 2;
  }
  try {
    if (command === 'serve') return await runService(rest);
    if (command === 'serve-file') return await serveFile(rest);
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(err.message);
      return 2;
    }
    throw err;
  }
  console.error(`uffd-server: unknown command ${JSON.stringify(command)}\n\n${HELP}`);
  return 2;
}
