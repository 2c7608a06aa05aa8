import type { Logger } from '#logging';
import { unaryHandlers } from '#service-kit';
import type { BlockDevice as BlockDeviceMessage, BlockServerServer } from '#proto/sbx/block';
import type { BlockDevice } from './block-device.js';
import type { DeviceManager } from './device-manager.js';

export function describeDevice(device: BlockDevice): BlockDeviceMessage {
  const r = device.record;
  return {
    sandboxId: r.sandboxId,
    buildId: r.buildId,
    socketPath: r.socketPath,
    devicePath: device.kernel?.path ?? '',
    size: r.size,
    blockSize: r.blockSize,
    exportName: r.exportName,
  };
}

export function blockServerImplementation(manager: DeviceManager, logger: Logger): BlockServerServer {
  const handle = unaryHandlers({ logger });
  return {
    open: handle('open device', async (req) =>
      describeDevice(
        await manager.open({ sandboxId: req.sandboxId, buildId: req.buildId, attachKernel: req.attachKernel }),
      ),
    ),
    export: handle('export device', async (req) => {
      const result = await manager.export(req.sandboxId, req.newBuildId, req.diffPath, {
        keepServing: req.keepServing,
        parentBuildId: req.parentBuildId,
        dedup: req.dedup,
      });
      return {
        mappings: result.mappings,
        diffSize: result.diffSize,
        dirtyBlocks: result.storedBlocks,
        blockSize: result.device.blockSize,
        size: result.device.size,
        dedupedBlocks: result.dedupedBlocks,
        zeroBlocks: result.zeroBlocks,
      };
    }),
    closeDevice: handle('close device', async (req) => {
      await manager.close(req.sandboxId);
      return {};
    }),
    list: handle('list devices', async () => ({
      devices: manager.list().map(describeDevice),
    })),
    stats: handle('device stats', async (req) => {
      const s = await manager.stats(req.sandboxId);
      return {
        sandboxId: req.sandboxId,
        reads: s.reads,
        writes: s.writes,
        bytesRead: s.bytesRead,
        bytesWritten: s.bytesWritten,
        dirtyBlocks: s.dirtyBlocks,
        connections: s.connections,
        zeroedBlocks: s.zeroedBlocks,
        flushes: s.flushes,
        overlayBytes: s.overlayBytes,
        requestsInFlight: s.requestsInFlight,
      };
    }),
  };
}
