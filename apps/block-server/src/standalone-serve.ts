import { mkdtemp, readdir, realpath, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Logger } from '#logging';
import { BlockMetrics } from './block-metrics.js';
import { CowOverlay } from './cow-overlay.js';
import { ImageFile } from './image-file.js';
import { singleExport } from './nbd-export.js';
import { NbdServer } from './nbd-server.js';
import type { StandaloneConfig } from './standalone-config.js';

export interface StandaloneHandle {
  server: NbdServer;
  overlay: CowOverlay;
  close(): Promise<void>;
}

/**
 * One copy-on-write export of a local image over NBD: file → overlay → NBD server. With
 * `--overlay`, the overlay directory outlives the process, so a restart reopens it with every
 * write that was flushed; without, a temporary overlay is removed at shutdown.
 */
export async function serveImage(
  config: StandaloneConfig,
  logger: Logger,
  metrics?: BlockMetrics,
): Promise<StandaloneHandle> {
  const taken: Array<() => Promise<void>> = [];
  const release = async (): Promise<void> => {
    for (const undo of taken.reverse()) await undo().catch((err: unknown) => logger.warn({ err }, 'release failed'));
    taken.length = 0;
  };
  try {
    const basePath = await realpath(config.base);
    const syncReads = config.readMode === 'sync';
    const base = await ImageFile.open(basePath, { syncReads });
    taken.push(() => base.close());
    let overlayDir = config.overlay;
    if (!overlayDir) {
      await removeOrphanedOverlays(logger);
      const temporary = await mkdtemp(join(tmpdir(), `${TEMP_PREFIX}${process.pid}-`));
      taken.push(() => rm(temporary, { recursive: true, force: true }));
      overlayDir = temporary;
    }
    const overlay = await CowOverlay.open({
      base,
      dir: overlayDir,
      blockSize: config.blockSize,
      identity: `file:${basePath}:${base.size}`,
      syncReads,
    });
    taken.push(() => overlay.close());
    const reopened = overlay.written.count + overlay.zeroed.count;
    const server = await NbdServer.listen({
      socketPath: config.socket,
      logger,
      ...(metrics ? { observer: metrics.observer } : {}),
      exports: singleExport({
        name: config.exportName,
        blocks: overlay,
        blockSize: config.blockSize,
        description: `cow over ${basePath}`,
      }),
    });
    taken.push(() => server.close());
    const connections = (): number => server.connectionCount;
    metrics?.connectionSources.add(connections);
    taken.push(async () => void metrics?.connectionSources.delete(connections));
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
    return {
      server,
      overlay,
      close: async () => {
        // Everything acknowledged stays durable across a clean stop as across a crash.
        await server.close();
        await overlay.flush().catch((err: unknown) => logger.warn({ err }, 'final flush failed'));
        await release();
      },
    };
  } catch (err) {
    await release();
    throw err;
  }
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
