import { describeConfig, loadConfig } from '#config';
import { createLogger, sandboxLogger } from '#logging';
import { SandboxMemory } from './sandbox-memory.js';
import { SourceView } from './source-view.js';
import { serveFileConfigSchema } from './uffd-server-config.js';

/**
 * `serve-file`: one Firecracker-style handshake on --socket, served from a local memory file
 * until the peer goes away (exit 0), or until serving fails (exit 1). SIGTERM stops it (exit 0).
 */
export async function serveFile(argv: string[]): Promise<number> {
  const config = loadConfig('uffd-server', serveFileConfigSchema, 'SBX_UFFD_SERVER_', { argv });
  const logger = createLogger({ service: 'uffd-server', level: config.logLevel });
  logger.info({ config: describeConfig(config), mode: 'serve-file' }, 'uffd-server starting');
  const source = SourceView.ofFile(config.memfile);
  let finish: (code: number) => void = () => undefined;
  const done = new Promise<number>((resolve) => (finish = resolve));
  const sandbox = new SandboxMemory({
    sandboxId: 'serve-file',
    socketPath: config.socket,
    source,
    pageSize: config.pageSize,
    prefetchBytes: config.prefetchBytes,
    readaheadWindows: config.readaheadWindows,
    prefetchWithoutTracking: config.prefetchWithoutTracking,
    threads: config.threads,
    handshakeTimeoutMs: undefined,
    logger: sandboxLogger(logger, 'serve-file'),
    onEnded: (s) => finish(s.state === 'peer-gone' ? 0 : 1),
  });
  logger.info({ socket: config.socket, memorySize: source.size }, 'listening for the uffd handshake');
  const onSignal = () => finish(0);
  process.once('SIGTERM', onSignal);
  process.once('SIGINT', onSignal);
  const code = await done;
  process.off('SIGTERM', onSignal);
  process.off('SIGINT', onSignal);
  const stats = sandbox.stats();
  logger.info(
    {
      state: stats.state,
      error: stats.error || undefined,
      faults: stats.faults,
      bytesServed: stats.bytesServed,
      prefetchPages4k: stats.prefetchPages4k,
      tracking: stats.tracking,
    },
    'serve-file finished',
  );
  await sandbox.stop();
  return code;
}
