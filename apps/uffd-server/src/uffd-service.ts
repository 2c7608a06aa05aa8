import { status, type ServiceError, type sendUnaryData, type ServerUnaryCall } from '@grpc/grpc-js';
import { BuildIdInvalid, BuildNotFound, HeaderInvalid, ObjectNotFound } from '#storage';
import { HandshakeInvalid } from '#uffd';
import { SyscallError } from '#native';
import type {
  UffdExportDiffResponse,
  UffdListResponse,
  UffdPrepareResponse,
  UffdSandboxStats,
  UffdServerServer,
  UffdStopResponse,
  UffdStopSourcingResponse,
} from '#proto/sbx/uffd';
import type { Logger } from '#logging';
import type { SandboxRegistry } from './sandbox-registry.js';
import type { SandboxStats } from './sandbox-memory.js';
import { InvalidState, RequestInvalid, SandboxExists, SandboxNotFound, SourceInvalid } from './uffd-server-errors.js';

/** The gRPC edge: the only place errors become status codes; the message names the step. */
function toStatus(step: string, err: unknown): Partial<ServiceError> {
  const message = `${step}: ${(err as Error).message ?? String(err)}`;
  let code = status.INTERNAL;
  if (err instanceof SandboxNotFound || err instanceof BuildNotFound || err instanceof ObjectNotFound)
    code = status.NOT_FOUND;
  else if (err instanceof SandboxExists) code = status.ALREADY_EXISTS;
  else if (err instanceof InvalidState) code = status.FAILED_PRECONDITION;
  else if (
    err instanceof RequestInvalid ||
    err instanceof BuildIdInvalid ||
    err instanceof HandshakeInvalid ||
    err instanceof HeaderInvalid ||
    err instanceof SourceInvalid
  )
    code = status.INVALID_ARGUMENT;
  else if (err instanceof SyscallError && err.code === 'ENOENT') code = status.NOT_FOUND;
  else if ((err as NodeJS.ErrnoException).code === 'ENOENT') code = status.NOT_FOUND;
  return { code, message, details: message };
}

function handle<Req, Res>(logger: Logger, step: string, fn: (req: Req) => Promise<Res> | Res) {
  return (call: ServerUnaryCall<Req, Res>, callback: sendUnaryData<Res>): void => {
    Promise.resolve()
      .then(() => fn(call.request))
      .then(
        (res) => callback(null, res),
        (err: unknown) => {
          const st = toStatus(step, err);
          logger.warn({ step, code: st.code, err: st.message }, 'control request failed');
          callback(st as ServiceError, null);
        },
      );
  };
}

export function statsMessage(s: SandboxStats): UffdSandboxStats {
  return {
    sandboxId: s.sandboxId,
    state: s.state,
    faults: s.faults ?? 0,
    bytesServed: s.bytesServed ?? 0,
    prefetchPages: s.prefetchPages4k ?? 0,
    prefetchHits: s.prefetchHits,
    latencyBoundsUs: (s.latencyBoundsUs ?? []).map((b) => Math.min(b, Number.MAX_SAFE_INTEGER)),
    latencyCounts: s.latencyCounts ?? [],
    tracking: s.tracking,
    error: s.error,
    wpFaults: s.wpFaults ?? 0,
    zeroPagesAfterPause: s.zeroPages4k ?? 0,
    fetchRequests: s.fetchRequests ?? 0,
    fetchRetries: s.fetchRetries,
    pageSize: s.pageSize,
    hasMemfd: s.hasMemfd,
    peerPid: s.peerPid,
    presentPages: s.presentPages4k ?? 0,
    eexist: s.eexist ?? 0,
  };
}

export function uffdServiceImplementation(registry: SandboxRegistry, logger: Logger): UffdServerServer {
  return {
    prepare: handle(logger, 'prepare', async (req): Promise<UffdPrepareResponse> => {
      const r = await registry.prepare({
        sandboxId: req.sandboxId,
        socketPath: req.socketPath,
        ...(req.buildId ? { buildId: req.buildId } : {}),
        ...(req.memfilePath ? { memfilePath: req.memfilePath } : {}),
        pageSize: req.pageSize,
        prefetchBytes: req.prefetchBytes,
      });
      return { socketPath: r.socketPath, memorySize: r.memorySize, pageSize: r.pageSize };
    }),
    stopSourcing: handle(logger, 'stop sourcing', (req): UffdStopSourcingResponse => ({
      pagesPresent: registry.stopSourcing(req.sandboxId),
    })),
    exportDiff: handle(logger, 'export diff', async (req): Promise<UffdExportDiffResponse> => {
      const r = await registry.exportDiff(
        req.sandboxId,
        req.newBuildId,
        req.diffPath,
        req.memfilePath || undefined,
        req.vmmDirtyLog,
      );
      return {
        mappings: r.mappings,
        diffSize: r.diffSize,
        dirtyPages: r.dirtyPages,
        zeroPages: r.zeroPages,
        pageSize: r.pageSize,
        memorySize: r.memorySize,
        tracking: r.tracking,
      };
    }),
    stop: handle(logger, 'stop', async (req): Promise<UffdStopResponse> => {
      await registry.stop(req.sandboxId);
      return {};
    }),
    stats: handle(logger, 'stats', (req): UffdSandboxStats => statsMessage(registry.stats(req.sandboxId))),
    list: handle(logger, 'list', (): UffdListResponse => ({ sandboxes: registry.list().map(statsMessage) })),
  };
}
