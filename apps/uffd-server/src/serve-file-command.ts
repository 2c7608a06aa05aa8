import { sandboxLogger, type Logger } from '#logging';
import { SandboxMemory } from './sandbox-memory.js';
import { SourceView } from './source-view.js';
import type { ServeFileConfig } from './uffd-server-config.js';

/**
 * `serve-file`: one Firecracker-style handshake on --socket, served from a local memory file
 * until the peer goes away (exit 0), or until serving fails (exit 1). SIGTERM stops it (exit 0).
 */
export async function serveFile(config: ServeFileConfig, logger: Logger, signal: AbortSignal): Promise<number> {
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
  signal.addEventListener('abort', () => finish(0), { once: true });
  const code = await done;
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
