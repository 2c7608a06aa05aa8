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
import { unaryHandlers } from '#service-kit';
import type { SandboxRegistry } from './sandbox-registry.js';
import type { SandboxStats } from './sandbox-memory.js';

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
    startFaults: s.recordedPrefetch?.startFaults ?? 0,
    recordedBlocks: s.recordedPrefetch?.recordedBlocks ?? 0,
    recording: s.recordedPrefetch?.recording ?? false,
    prefetchSetBlocks: s.recordedPrefetch?.setBlocks ?? 0,
    recordedPrefetchPages: s.recordedPrefetch?.passPages4k ?? 0,
    recordedPrefetchLate: s.recordedPrefetch?.passAlreadyPresent ?? 0,
  };
}

export function uffdServiceImplementation(registry: SandboxRegistry, logger: Logger): UffdServerServer {
  const handle = unaryHandlers({ logger });
  return {
    prepare: handle('prepare', async (req): Promise<UffdPrepareResponse> => {
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
    stopSourcing: handle('stop sourcing', (req): UffdStopSourcingResponse => ({
      pagesPresent: registry.stopSourcing(req.sandboxId),
    })),
    exportDiff: handle('export diff', async (req): Promise<UffdExportDiffResponse> => {
      const r = await registry.exportDiff(req.sandboxId, {
        buildId: req.newBuildId,
        diffPath: req.diffPath,
        memfilePath: req.memfilePath || undefined,
        vmmDirtyLog: req.vmmDirtyLog,
        keepServing: req.keepServing,
        dedup: req.dedup,
        prefetchPath: req.prefetchPath || undefined,
      });
      return {
        mappings: r.mappings,
        diffSize: r.diffSize,
        dirtyPages: r.dirtyPages,
        zeroPages: r.zeroPages,
        dedupedPages: r.dedupedPages,
        pageSize: r.pageSize,
        memorySize: r.memorySize,
        tracking: r.tracking,
        prefetchBlocks: r.prefetchBlocks,
      };
    }),
    stopRecording: handle('stop recording', (req): UffdSandboxStats =>
      statsMessage(registry.stopRecording(req.sandboxId)),
    ),
    stop: handle('stop', async (req): Promise<UffdStopResponse> => {
      await registry.stop(req.sandboxId);
      return {};
    }),
    stats: handle('stats', (req): UffdSandboxStats => statsMessage(registry.stats(req.sandboxId))),
    list: handle('list', (): UffdListResponse => ({ sandboxes: registry.list().map(statsMessage) })),
  };
}
