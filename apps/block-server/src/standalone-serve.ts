import { mkdtemp, readdir, realpath, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '#logging';
import { startMetricsServer } from '#metrics';
import { startOrRollback, stopWith, TeardownStack, type RunningService } from '#service-kit';
import { BlockMetrics } from './block-metrics.js';
import { CowOverlay } from './cow-overlay.js';
import { ImageFile } from './image-file.js';
import { singleExport } from './nbd-export.js';
import { NbdServer } from './nbd-server.js';
import type { StandaloneConfig } from './standalone-config.js';

/**
 * One copy-on-write export of a local image over NBD: file → overlay → NBD server, and its
 * metrics. With `--overlay`, the overlay directory outlives the process, so a restart reopens it
 * with every write that was flushed; without, a temporary overlay is removed at shutdown.
 */
export function serveImage(config: StandaloneConfig, logger: Logger): Promise<RunningService> {
  return startOrRollback(new TeardownStack(), logger, async (stack) => {
    const metrics = new BlockMetrics();
    const basePath = await realpath(config.base);
    const syncReads = config.readMode === 'sync';
    const base = await ImageFile.open(basePath, { syncReads });
    stack.push('base', () => base.close());
    let overlayDir = config.overlay;
    if (!overlayDir) {
      await removeOrphanedOverlays(logger);
      const temporary = await mkdtemp(join(tmpdir(), `${TEMP_PREFIX}${process.pid}-`));
      stack.push('temporary overlay', () => rm(temporary, { recursive: true, force: true }));
      overlayDir = temporary;
    }
    const overlay = await CowOverlay.open({
      base,
      dir: overlayDir,
      blockSize: config.blockSize,
      identity: `file:${basePath}:${base.size}`,
      syncReads,
    });
    stack.push('overlay', () => overlay.close());
    // Everything acknowledged stays durable across a clean stop as across a crash.
    stack.push('final flush', () =>
      overlay.flush().catch((err: unknown) => logger.warn({ err }, 'final flush failed')),
    );
    const reopened = overlay.written.count + overlay.zeroed.count;
    const server = await NbdServer.listen({
      socketPath: config.socket,
      logger,
      observer: metrics.observer,
      exports: singleExport({
        name: config.exportName,
        blocks: overlay,
        blockSize: config.blockSize,
        description: `cow over ${basePath}`,
      }),
    });
    stack.push('nbd server', () => server.close());
    metrics.connectionSources.add(() => server.connectionCount);
    if (config.metricsPort > 0) {
      const metricsServer = await startMetricsServer(metrics.registry, '127.0.0.1', config.metricsPort);
      stack.push('metrics', () => metricsServer.close());
    }
    logger.info(
      {
        base: basePath,
        size: base.size,
        socket: config.socket,
        overlay: overlayDir,
        exportName: config.exportName,
        reopenedBlocks: reopened,
      },
      'serving copy-on-write export',
    );
    return { stop: stopWith(stack) };
  });
}

const TEMP_PREFIX = 'sbx-block-overlay-';

/**
 * A temporary overlay is removed at shutdown, but a killed process cannot do that: its
 * directory names its pid, and the next standalone run removes those whose process is gone.
 */
async function removeOrphanedOverlays(logger: Logger): Promise<void> {
  const names = await readdir(tmpdir()).catch(() => [] as string[]);
  for (const name of names) {
    const pid = Number(/^sbx-block-overlay-(\d+)-/.exec(name)?.[1]);
    if (!Number.isSafeInteger(pid) || pid <= 0 || pid === process.pid || isAlive(pid)) continue;
    await rm(join(tmpdir(), name), { recursive: true, force: true });
    logger.info({ dir: name, pid }, 'removed the temporary overlay of a process that is gone');
  }
}

function isAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}
