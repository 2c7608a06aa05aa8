import { status, type sendUnaryData, type ServerUnaryCall, type ServiceError } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import type {
  BlockCloseResponse,
  BlockDevice as BlockDeviceMessage,
  BlockDeviceRef,
  BlockDeviceStats,
  BlockExportRequest,
  BlockExportResponse,
  BlockListRequest,
  BlockListResponse,
  BlockOpenRequest,
  BlockServerServer,
} from '#proto/sbx/block';
import type { BlockDevice } from './block-device.js';
import type { DeviceManager } from './device-manager.js';

/** The only place errors become gRPC status codes; the message names the step that failed. */
const STATUS_BY_CODE: Record<string, status> = {
  DEVICE_NOT_FOUND: status.NOT_FOUND,
  BUILD_NOT_FOUND: status.NOT_FOUND,
  OBJECT_NOT_FOUND: status.NOT_FOUND,
  DEVICE_EXISTS: status.ALREADY_EXISTS,
  BLOCK_REQUEST_INVALID: status.INVALID_ARGUMENT,
  BUILD_ID_INVALID: status.INVALID_ARGUMENT,
  DEVICE_BUSY: status.FAILED_PRECONDITION,
  DEVICE_CLOSING: status.FAILED_PRECONDITION,
  HEADER_INVALID: status.FAILED_PRECONDITION,
  OVERLAY_STATE_INVALID: status.DATA_LOSS,
  NBD_SOCKET_IN_USE: status.FAILED_PRECONDITION,
  STORAGE_UNAVAILABLE: status.UNAVAILABLE,
  ENOENT: status.NOT_FOUND,
  ENOSPC: status.RESOURCE_EXHAUSTED,
};

export function toServiceError(step: string, err: unknown): Partial<ServiceError> {
  const code = (err as { code?: unknown } | undefined)?.code;
  const grpcCode = typeof code === 'string' ? (STATUS_BY_CODE[code] ?? status.INTERNAL) : status.INTERNAL;
  return { code: grpcCode, details: `${step}: ${err instanceof Error ? err.message : String(err)}` };
}

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
  function handle<Req, Res>(step: string, body: (request: Req) => Promise<Res>) {
    return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>): void => {
      body(call.request).then(
        (res) => callback(null, res),
        (err: unknown) => {
          const mapped = toServiceError(step, err);
          (mapped.code === status.INTERNAL ? logger.error : logger.warn).call(
            logger,
            { err, step },
            'control call failed',
          );
          callback(mapped, null);
        },
      );
    };
  }
  return {
    open: handle<BlockOpenRequest, BlockDeviceMessage>('open device', async (req) =>
      describeDevice(
        await manager.open({ sandboxId: req.sandboxId, buildId: req.buildId, attachKernel: req.attachKernel }),
      ),
    ),
    export: handle<BlockExportRequest, BlockExportResponse>('export device', async (req) => {
      const result = await manager.export(req.sandboxId, req.newBuildId, req.diffPath);
      return {
        mappings: result.mappings,
        diffSize: result.diffSize,
        dirtyBlocks: result.storedBlocks,
        blockSize: result.device.blockSize,
        size: result.device.size,
      };
    }),
    closeDevice: handle<BlockDeviceRef, BlockCloseResponse>('close device', async (req) => {
      await manager.close(req.sandboxId);
      return {};
    }),
    list: handle<BlockListRequest, BlockListResponse>('list devices', async () => ({
      devices: manager.list().map(describeDevice),
    })),
    stats: handle<BlockDeviceRef, BlockDeviceStats>('device stats', async (req) => {
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
