import { mkdir } from 'node:fs/promises';
import { dirname, isAbsolute, join } from 'node:path';
import { sandboxLogger, type Logger } from '#logging';
import { normalizeBuildId, type BuildStore, type ReadableBlocks } from '#storage';
import { describeFailures, RequestInvalid, TeardownStack } from '#service-kit';
import { DeviceClosing, DeviceExists, DeviceNotFound } from './block-errors.js';
import type { BlockMetrics } from './block-metrics.js';
import { BlockDevice, type DeviceStats, type KernelAttachment } from './block-device.js';
import {
  SANDBOX_ID_PATTERN,
  readDeviceRecords,
  removeDeviceDir,
  writeDeviceRecord,
  type DeviceRecord,
} from './device-record.js';
import type { ExportedDiff } from './dirty-export.js';
import { exportParent, type ExportParent } from './export-parent.js';
import { ImageFile } from './image-file.js';

/** Binds a device to a kernel /dev/nbdX (kernel-attach.ts), or reattaches after a restart. */
export interface KernelAttacher {
  readonly available: boolean;
  attach(device: BlockDevice): Promise<KernelAttachment>;
  reattach(device: BlockDevice, index: number): Promise<KernelAttachment>;
}

export interface DeviceManagerOptions {
  dataDir: string;
  nbdDir: string;
  /** Builds' rootfs layers (local builds first, then the bucket); absent: local images only. */
  builds?: BuildStore;
  logger: Logger;
  metrics?: BlockMetrics;
  socketMode?: number;
  releaseTimeoutMs: number;
  kernel?: KernelAttacher;
  /** Read overlays and local images on the event loop (see ImageFile.open). */
  syncReads?: boolean;
}

export interface ExportDeviceOptions {
  /** A checkpoint: the dirty blocks are written as they are now and the device serves on. */
  keepServing?: boolean;
  /**
   * The build the returned mappings will be merged over ('' = the build the device was opened
   * over). Over the device's last checkpoint only blocks changed since it are exported.
   */
  parentBuildId?: string;
  /** Leave written blocks equal to the parent's to it (E2B's block/dedup.go). */
  dedup?: boolean;
}

export interface OpenDeviceRequest {
  sandboxId: string;
  buildId?: string;
  basePath?: string;
  exportName?: string;
  attachKernel?: boolean;
}

/** Every device of this process, by sandbox id: open, export, close, list, stats, restore. */
export class DeviceManager {
  private readonly devices = new Map<string, BlockDevice>();
  /** Sandboxes with an open or export under way: a second call for them is refused, not interleaved. */
  private readonly busy = new Set<string>();
  private readonly options: DeviceManagerOptions;

  constructor(options: DeviceManagerOptions) {
    this.options = options;
  }

  /** Reopens every device a previous run left in the data directory. */
  async restore(): Promise<{ reopened: string[]; failed: Array<{ sandboxId: string; error: string }> }> {
    const { logger } = this.options;
    const { records, broken } = await readDeviceRecords(this.options.dataDir);
    for (const b of broken) logger.warn(b, 'device directory without a usable record left alone');
    const reopened: string[] = [];
    const failed: Array<{ sandboxId: string; error: string }> = [];
    for (const record of records) {
      try {
        const device = await this.start(record);
        if (record.kernelIndex !== undefined && this.options.kernel?.available) {
          device.kernel = await this.options.kernel.reattach(device, record.kernelIndex);
        }
        reopened.push(record.sandboxId);
      } catch (err) {
        logger.error({ err, sandboxId: record.sandboxId }, 'could not reopen device; its state is kept on disk');
        failed.push({ sandboxId: record.sandboxId, error: (err as Error).message });
      }
    }
    this.options.metrics?.devices.set(this.devices.size);
    return { reopened, failed };
  }

  async open(request: OpenDeviceRequest): Promise<BlockDevice> {
    const sandboxId = checkSandboxId(request.sandboxId);
    if (this.devices.has(sandboxId) || this.busy.has(sandboxId)) throw new DeviceExists(sandboxId);
    this.busy.add(sandboxId);
    const log = sandboxLogger(this.options.logger, sandboxId);
    const taken = new TeardownStack();
    try {
      let buildId = '';
      if (request.basePath) {
        if (!isAbsolute(request.basePath)) throw new RequestInvalid('base_path', 'must be an absolute path');
      } else {
        if (!request.buildId) throw new RequestInvalid('build_id', 'a build id or a base path is required');
        try {
          buildId = normalizeBuildId(request.buildId);
        } catch (err) {
          throw new RequestInvalid('build_id', (err as Error).message);
        }
        if (!this.options.builds) throw new RequestInvalid('build_id', 'no bucket configured (--bucket / SBX_BUCKET)');
      }
      const socketPath = join(this.options.nbdDir, `${sandboxId}.sock`);
      // sun_path holds 108 bytes including the NUL.
      if (Buffer.byteLength(socketPath) > 107) {
        throw new RequestInvalid('sandbox_id', `NBD socket path ${socketPath} is longer than 107 bytes`);
      }
      const base = await this.openBase({ buildId, basePath: request.basePath });
      taken.push('base', () => base.release());
      const record: DeviceRecord = {
        version: 1,
        sandboxId,
        buildId,
        ...(request.basePath ? { basePath: request.basePath } : {}),
        socketPath,
        exportName: request.exportName || sandboxId,
        size: base.blocks.size,
        blockSize: base.blockSize,
        createdAt: new Date().toISOString(),
      };
      // The record goes down before anything serves, so a crash from here on is recoverable.
      taken.push('record', () => removeDeviceDir(this.options.dataDir, sandboxId));
      writeDeviceRecord(this.options.dataDir, record);
      const device = await BlockDevice.open(this.deviceOptions(record, base));
      // The device owns the base and its directory from here: destroying it gives both back.
      taken.forget('record');
      taken.forget('base');
      taken.push('device', () => device.destroy());
      if (request.attachKernel && this.options.kernel?.available) {
        device.kernel = await this.options.kernel.attach(device);
        writeDeviceRecord(this.options.dataDir, { ...record, kernelIndex: device.kernel.index });
      }
      this.devices.set(sandboxId, device);
      this.options.metrics?.devices.set(this.devices.size);
      log.info({ buildId, socketPath, size: record.size, devicePath: device.kernel?.path }, 'device opened');
      return device;
    } catch (err) {
      const failures = await taken.unwind();
      if (failures.length) log.warn({ rollback: describeFailures(failures) }, 'open failed; rollback incomplete');
      throw err;
    } finally {
      this.busy.delete(sandboxId);
    }
  }

  /**
   * Pause step 4, then the device is closed and its cache removed. With keepServing (a
   * checkpoint) the dirty blocks are written as they are now and the device serves on.
   */
  async export(
    sandboxId: string,
    newBuildId: string,
    diffPath: string,
    options: ExportDeviceOptions = {},
  ): Promise<ExportedDiff & { device: DeviceRecord }> {
    const device = this.get(sandboxId);
    const buildId = checkBuildId('new_build_id', newBuildId);
    const parentBuildId = options.parentBuildId ? checkBuildId('parent_build_id', options.parentBuildId) : '';
    if (!isAbsolute(diffPath)) throw new RequestInvalid('diff_path', 'must be an absolute path');
    if (options.dedup && parentBuildId === '' && device.checkpointBuildId !== undefined) {
      // The opened build is no longer what the caller merges over: comparing with it could leave a
      // block to a parent that holds other bytes there.
      throw new RequestInvalid(
        'parent_build_id',
        `the device was checkpointed into ${device.checkpointBuildId}: dedup needs the parent build named`,
      );
    }
    if (this.busy.has(sandboxId)) throw new DeviceClosing(sandboxId);
    this.busy.add(sandboxId);
    const log = sandboxLogger(this.options.logger, sandboxId);
    let parent: { bytes: ExportParent; release(): Promise<void> } | undefined;
    try {
      await mkdir(dirname(diffPath), { recursive: true });
      const started = performance.now();
      if (options.dedup) parent = await this.openParent(device, parentBuildId);
      const base = { parentBuildId, ...(parent ? { parent: parent.bytes } : {}) };
      const summary = (r: ExportedDiff) => ({
        buildId,
        parentBuildId: parentBuildId || device.record.buildId,
        diffPath,
        storedBlocks: r.storedBlocks,
        zeroBlocks: r.zeroBlocks,
        dedupedBlocks: r.dedupedBlocks,
        ms: Math.round(performance.now() - started),
      });
      if (options.keepServing) {
        const snapshot = await device.exportServing(buildId, diffPath, base);
        this.countExport(snapshot);
        log.info(summary(snapshot), 'device exported; serving on');
        return { ...snapshot, device: device.record };
      }
      const result = await device.export(buildId, diffPath, this.options.releaseTimeoutMs, base);
      this.devices.delete(sandboxId);
      this.options.metrics?.devices.set(this.devices.size);
      await device.destroy();
      this.countExport(result);
      log.info(summary(result), 'device exported and closed');
      return { ...result, device: device.record };
    } catch (err) {
      this.options.metrics?.exports.inc({ result: 'error' });
      throw err;
    } finally {
      await parent?.release();
      this.busy.delete(sandboxId);
    }
  }

  async close(sandboxId: string): Promise<void> {
    const device = this.get(sandboxId);
    if (this.busy.has(sandboxId)) throw new DeviceClosing(sandboxId);
    this.devices.delete(sandboxId);
    this.options.metrics?.devices.set(this.devices.size);
    await device.destroy();
    sandboxLogger(this.options.logger, sandboxId).info('device closed and removed');
  }

  list(): BlockDevice[] {
    return [...this.devices.values()];
  }

  stats(sandboxId: string): Promise<DeviceStats> {
    return this.get(sandboxId).stats();
  }

  /** Process shutdown: every device suspended (state kept for the next run). */
  async shutdown(): Promise<void> {
    const all = [...this.devices.values()];
    this.devices.clear();
    await Promise.all(
      all.map((d) =>
        d
          .suspend()
          .catch((err: unknown) => this.options.logger.warn({ err, sandboxId: d.sandboxId }, 'suspend failed')),
      ),
    );
    await this.options.builds?.close();
  }

  private countExport(result: ExportedDiff): void {
    const metrics = this.options.metrics;
    if (!metrics) return;
    metrics.exports.inc({ result: 'ok' });
    metrics.exportBlocks.inc({ kind: 'stored' }, result.storedBlocks);
    metrics.exportBlocks.inc({ kind: 'zero' }, result.zeroBlocks);
    metrics.exportBlocks.inc({ kind: 'deduped' }, result.dedupedBlocks);
  }

  /**
   * The parent to deduplicate against, read through its own layers: the device's base when the
   * parent is the build it was opened over (already open), else that build from the store (a
   * checkpoint of this device: committed on this node). When it cannot be opened the export goes
   * on without dedup (still correct, only larger) and says so in the log.
   */
  private async openParent(
    device: BlockDevice,
    parentBuildId: string,
  ): Promise<{ bytes: ExportParent; release(): Promise<void> } | undefined> {
    const id = parentBuildId || device.record.buildId;
    if (id === device.record.buildId) return { bytes: exportParent(id, device.base), release: async () => {} };
    if (!this.options.builds) throw new RequestInvalid('parent_build_id', 'no build store to read the parent from');
    try {
      const { file } = await this.options.builds.openBuildFile(id, 'rootfs.ext4');
      if (file.size !== device.record.size) {
        await file.close();
        throw new RequestInvalid(
          'parent_build_id',
          `its rootfs is ${file.size} bytes, the device ${device.record.size}`,
        );
      }
      return { bytes: exportParent(id, file), release: () => file.close() };
    } catch (err) {
      if (err instanceof RequestInvalid) throw err;
      sandboxLogger(this.options.logger, device.sandboxId).warn(
        { err, parentBuildId: id },
        'parent build unreadable: exporting without dedup',
      );
      return undefined;
    }
  }

  private get(sandboxId: string): BlockDevice {
    const device = this.devices.get(sandboxId);
    if (!device) throw new DeviceNotFound(sandboxId);
    return device;
  }

  private async start(record: DeviceRecord): Promise<BlockDevice> {
    const base = await this.openBase({ buildId: record.buildId, basePath: record.basePath });
    try {
      if (base.blocks.size !== record.size) {
        throw new Error(`base is ${base.blocks.size} bytes, the device was ${record.size}`);
      }
      const device = await BlockDevice.open(this.deviceOptions(record, base));
      this.devices.set(record.sandboxId, device);
      return device;
    } catch (err) {
      await base.release();
      throw err;
    }
  }

  private deviceOptions(
    record: DeviceRecord,
    base: { blocks: ReadableBlocks; release(): Promise<void> },
  ): Parameters<typeof BlockDevice.open>[0] {
    return {
      record,
      dataDir: this.options.dataDir,
      base: base.blocks,
      releaseBase: () => base.release(),
      syncReads: this.options.syncReads ?? false,
      logger: sandboxLogger(this.options.logger, record.sandboxId),
      ...(this.options.metrics ? { metrics: this.options.metrics } : {}),
      ...(this.options.socketMode ? { socketMode: this.options.socketMode } : {}),
    };
  }

  private async openBase(source: {
    buildId: string;
    basePath: string | undefined;
  }): Promise<{ blocks: ReadableBlocks; blockSize: number; release(): Promise<void> }> {
    if (source.basePath) {
      const file = await ImageFile.open(source.basePath, { syncReads: this.options.syncReads ?? false });
      return { blocks: file, blockSize: 4096, release: () => file.close() };
    }
    if (!this.options.builds) throw new RequestInvalid('build_id', 'no bucket configured (--bucket / SBX_BUCKET)');
    const { header, file } = await this.options.builds.openBuildFile(source.buildId, 'rootfs.ext4');
    return { blocks: file, blockSize: header.metadata.blockSize, release: () => file.close() };
  }
}

function checkBuildId(field: string, id: string): string {
  try {
    return normalizeBuildId(id);
  } catch (err) {
    throw new RequestInvalid(field, (err as Error).message);
  }
}

function checkSandboxId(sandboxId: string): string {
  if (!SANDBOX_ID_PATTERN.test(sandboxId) || sandboxId.includes('..')) {
    throw new RequestInvalid('sandbox_id', `${JSON.stringify(sandboxId.slice(0, 64))} is not a safe name`);
  }
  return sandboxId;
}
