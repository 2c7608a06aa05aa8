import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from '#logging';
import type { ReadableBlocks } from '#storage';
import { DeviceBusy, DeviceClosing } from './block-errors.js';
import type { BlockMetrics } from './block-metrics.js';
import { CowOverlay } from './cow-overlay.js';
import { deviceDir, removeDeviceDir, type DeviceRecord } from './device-record.js';
import { exportDiff, type ExportedDiff } from './dirty-export.js';
import type { ExportParent } from './export-parent.js';
import { singleExport } from './nbd-export.js';
import { NbdServer, type NbdServerCounts } from './nbd-server.js';

/** A kernel /dev/nbdX bound to this device (kernel-attach.ts). */
export interface KernelAttachment {
  readonly index: number;
  readonly path: string;
  /** Disconnects the kernel device and waits until the pool sees it released. */
  detach(): Promise<void>;
  /** Drops our side without disconnecting (process shutdown: the kernel waits for a reconfigure). */
  abandon(): void;
}

export interface BlockDeviceOptions {
  record: DeviceRecord;
  dataDir: string;
  base: ReadableBlocks;
  /** Gives back what opening `base` took (build files). */
  releaseBase: () => Promise<void>;
  logger: Logger;
  metrics?: BlockMetrics;
  socketMode?: number;
  syncReads?: boolean;
}

/** What an export's mappings will be merged over. */
export interface ExportBase {
  /** The parent build ('' = the build the device was opened over). */
  parentBuildId: string;
  /** Its bytes, to deduplicate against; absent: no dedup. */
  parent?: ExportParent;
}

export interface DeviceStats extends NbdServerCounts {
  /** Blocks with new bytes since the device was opened over its build. */
  dirtyBlocks: number;
  /** Blocks trimmed or zeroed whole (exported as nil mappings). */
  zeroedBlocks: number;
  connections: number;
  requestsInFlight: number;
  /** Disk the overlay file takes (sparse: written blocks only). */
  overlayBytes: number;
}

/**
 * One sandbox's rootfs device: base layers → copy-on-write overlay → NBD server on the
 * sandbox's socket (and a kernel device where attached). Owns all of them. The overlay's block
 * maps are the one record of what changed: the export reads them, stats count them.
 */
export class BlockDevice {
  readonly record: DeviceRecord;
  readonly server: NbdServer;
  readonly overlay: CowOverlay;
  kernel: KernelAttachment | undefined;
  private state: 'serving' | 'exporting' | 'closed' = 'serving';
  private readonly options: BlockDeviceOptions;

  private readonly connectionSource = (): number => this.server.connectionCount;

  private constructor(options: BlockDeviceOptions, overlay: CowOverlay, server: NbdServer) {
    this.options = options;
    this.record = options.record;
    this.overlay = overlay;
    this.server = server;
    options.metrics?.connectionSources.add(this.connectionSource);
  }

  /** Opens the stack, reopening an overlay a previous run left in the device's directory. */
  static async open(options: BlockDeviceOptions): Promise<BlockDevice> {
    const { record, base, logger } = options;
    const overlay = await CowOverlay.open({
      base,
      dir: join(deviceDir(options.dataDir, record.sandboxId), 'overlay'),
      blockSize: record.blockSize,
      identity: record.basePath ? `file:${record.basePath}` : `build:${record.buildId}`,
      syncReads: options.syncReads ?? false,
    });
    try {
      const server = await NbdServer.listen({
        socketPath: record.socketPath,
        logger,
        ...(options.metrics ? { observer: options.metrics.observer } : {}),
        ...(options.socketMode ? { socketMode: options.socketMode } : {}),
        exports: singleExport({
          name: record.exportName,
          blocks: overlay,
          blockSize: record.blockSize,
          description: `sandbox ${record.sandboxId}`,
        }),
      });
      return new BlockDevice(options, overlay, server);
    } catch (err) {
      await overlay.close();
      throw err;
    }
  }

  get sandboxId(): string {
    return this.record.sandboxId;
  }

  /** What the overlay sits on (the opened build's layers, or a plain image). */
  get base(): ReadableBlocks {
    return this.options.base;
  }

  /**
   * The build of this device's last checkpoint (keep-serving export), since which the overlay
   * tracks changes anew (durably: kept across a restart). An export over it holds only those;
   * over any other parent (the opened build, a checkpoint whose commit failed) every block
   * changed since open, which is correct over all of them.
   */
  get checkpointBuildId(): string | undefined {
    return this.overlay.checkpoint || undefined;
  }

  get serving(): boolean {
    return this.state === 'serving';
  }

  /**
   * Pause step 4: flush, refuse new clients, wait until the device is released (kernel device
   * disconnected, every client gone), write the dirty blocks to `diffPath` in ascending order.
   * On success the device is finished: the caller closes it. When clients do not let go in
   * time the device goes back to serving and DeviceBusy is thrown.
   */
  async export(buildId: string, diffPath: string, releaseTimeoutMs: number, base: ExportBase): Promise<ExportedDiff> {
    if (this.state !== 'serving') throw new DeviceClosing(this.sandboxId);
    this.state = 'exporting';
    const started = Date.now();
    try {
      await this.overlay.flush();
      await this.server.stopAccepting();
      if (this.kernel) {
        await this.kernel.detach();
        this.kernel = undefined;
      }
      if (!(await this.server.waitForIdle(releaseTimeoutMs))) {
        throw new DeviceBusy(this.sandboxId, this.server.connectionCount, Date.now() - started);
      }
      return await this.exportOver(base, buildId, diffPath, false);
    } catch (err) {
      this.state = 'serving';
      await this.server
        .startAccepting()
        .catch((e: unknown) =>
          this.options.logger.error(
            { err: e, sandboxId: this.sandboxId },
            'could not serve again after a failed export',
          ),
        );
      throw err;
    }
  }

  /**
   * Checkpoint: the VM is paused, so no new writes arrive; flush what the overlay holds and
   * write its dirty blocks while clients stay connected. Change tracking restarts here (as the
   * memory's does), so the next export over this checkpoint holds only blocks changed after it.
   */
  async exportServing(buildId: string, diffPath: string, base: ExportBase): Promise<ExportedDiff> {
    if (this.state !== 'serving') throw new DeviceClosing(this.sandboxId);
    this.state = 'exporting';
    try {
      await this.overlay.flush();
      return await this.exportOver(base, buildId, diffPath, true);
    } finally {
      this.state = 'serving';
    }
  }

  /**
   * The export itself: since the last checkpoint when the parent is that checkpoint, else every
   * change since open. A checkpoint's export then restarts the tracking (durably) from the
   * moment it began; a failed one leaves it as it was.
   */
  private async exportOver(
    base: ExportBase,
    buildId: string,
    diffPath: string,
    checkpoint: boolean,
  ): Promise<ExportedDiff> {
    const last = this.overlay.checkpoint;
    const only = last !== '' && base.parentBuildId === last ? this.overlay.tracked.clone() : undefined;
    if (checkpoint) this.overlay.beginCheckpoint();
    try {
      const result = await exportDiff({
        source: this.overlay,
        buildId,
        diffPath,
        ...(only ? { only } : {}),
        ...(base.parent ? { parent: base.parent } : {}),
      });
      if (checkpoint) await this.overlay.commitCheckpoint(buildId);
      return result;
    } catch (err) {
      if (checkpoint) this.overlay.abandonCheckpoint();
      throw err;
    }
  }

  /** Deletes the device: clients dropped, kernel device disconnected, overlay and state removed. */
  async destroy(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.options.metrics?.connectionSources.delete(this.connectionSource);
    await this.server.close();
    if (this.kernel) {
      await this.kernel.detach().catch((err: unknown) => this.options.logger.warn({ err }, 'kernel detach failed'));
      this.kernel = undefined;
    }
    await this.overlay.remove();
    await this.options.releaseBase();
    await removeDeviceDir(this.options.dataDir, this.sandboxId);
  }

  /**
   * Process shutdown: clients dropped, overlay flushed and closed, state kept on disk so the
   * next run reopens the device. A kernel device stays connected-but-dead until reconfigured.
   */
  async suspend(): Promise<void> {
    if (this.state === 'closed') return;
    this.state = 'closed';
    this.options.metrics?.connectionSources.delete(this.connectionSource);
    await this.server.close();
    this.kernel?.abandon();
    await this.overlay.flush().catch((err: unknown) => this.options.logger.warn({ err }, 'flush at shutdown failed'));
    await this.overlay.close();
    await this.options.releaseBase();
  }

  async stats(): Promise<DeviceStats> {
    const used = await stat(join(this.overlay.dir, 'overlay.img')).then(
      (s) => s.blocks * 512,
      () => 0,
    );
    return {
      ...this.server.counts,
      dirtyBlocks: this.overlay.written.count,
      zeroedBlocks: this.overlay.zeroed.count,
      connections: this.server.connectionCount,
      requestsInFlight: this.server.requestsInFlight,
      overlayBytes: used,
    };
  }
}
