import { ConfigInvalid, describeConfig, loadConfig } from '#config';
import { onShutdownSignals } from '#grpc';
import { createLogger } from '#logging';
import { startMetricsServer } from '#metrics';
import { BlockMetrics } from './block-metrics.js';
import { runService } from './block-service.js';
import { standaloneConfigSchema } from './standalone-config.js';
import { serveImage } from './standalone-serve.js';

const HELP = `usage:
  ./sbx block-server serve [--control-socket <control.sock>] [--data-dir <dir>] [--nbd-dir <dir>] [--bucket <dir>]
                           [--metrics-port <port>] [--kernel-attach auto|off] [--release-timeout-ms <ms>]
      Runs the service: copy-on-write NBD devices per sandbox, opened, exported and closed over
      the gRPC control API (sbx.v1.BlockServer) on --control-socket. Devices survive a restart of this
      process: their state lives in --data-dir and they are reopened at start.
      Environment: SBX_BLOCK_SERVER_<FLAG> (e.g. SBX_BLOCK_SERVER_DATA_DIR), SBX_BUCKET.

  ./sbx block-server serve --base <image> --socket <path> [--overlay <dir>] [--export-name <name>]
                           [--block-size <bytes>] [--metrics-port <port>]
      Standalone: serves one copy-on-write export of a local image over NBD until killed. The
      image is never modified. With --overlay, writes flushed by the client survive a restart
      that reuses the same directory.

  Connect with any NBD client, e.g. nbdinfo 'nbd+unix:///?socket=<path>'.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || rest.includes('--help') || rest.includes('-h')) {
    console.log(HELP);
    return command ? 0 : 2;
  }
  if (command !== 'serve') {
    console.error(`block-server: unknown command ${JSON.stringify(command)}\n\n${HELP}`);
    return 2;
  }
  const standalone = rest.some((arg) => arg === '--base' || arg.startsWith('--base='));
  try {
    return standalone ? await serveStandalone(rest) : await runService(rest);
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(err.message);
      return 2;
    }
    throw err;
  }
}

async function serveStandalone(argv: string[]): Promise<number> {
  const config = loadConfig('block-server', standaloneConfigSchema, 'SBX_BLOCK_SERVER_', { argv });
  const logger = createLogger({ service: 'block-server', level: config.logLevel });
  logger.info({ config: describeConfig(config), mode: 'standalone' }, 'block-server starting');
  const metrics = new BlockMetrics();
  const metricsServer =
    config.metricsPort > 0 ? await startMetricsServer(metrics.registry, '127.0.0.1', config.metricsPort) : undefined;
  const handle = await serveImage(config, logger, metrics);
  await new Promise<void>((resolve) => {
    onShutdownSignals(logger, async () => {
      await handle.close();
      await metricsServer?.close();
      resolve();
    });
  });
  return 0;
}
