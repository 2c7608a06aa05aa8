import type { Logger } from '#logging';
import { unaryHandlers } from '#service-kit';
import type {
  RunningSandbox,
  SandboxCheckpointResponse,
  SandboxConfig,
  SandboxCreateRequest,
  SandboxCreateResponse,
  SandboxListCachedBuildsResponse,
  SandboxListResponse,
  SandboxServiceServer,
} from '#proto/orchestrator';
import type { Empty } from '#proto/google/protobuf/empty';
import { RequestInvalid } from './orchestrator-errors.js';
import {
  checkBuildId,
  checkSafeName,
  checkSandboxConfig,
  checkTimes,
  type ResourceBounds,
} from './request-validation.js';
import type { SandboxManager } from './sandbox-manager.js';
import type { BuildStore } from '#storage';

/**
 * The upstream API (`SandboxService`, wire-compatible with E2B's orchestrator.proto): validates
 * every field, calls the manager, and maps typed errors to status codes.
 */
export function sandboxService(options: {
  manager: SandboxManager;
  /** ListCachedBuilds: this node's local builds and the bucket builds it holds. */
  builds: BuildStore;
  bounds: ResourceBounds;
  clientId: string;
  logger: Logger;
}): SandboxServiceServer {
  const { manager, builds, bounds, clientId, logger } = options;

  const handle = unaryHandlers({ logger });

  return {
    create: handle('Create', async (req: SandboxCreateRequest): Promise<SandboxCreateResponse> => {
      const config = checkSandboxConfig(req.sandbox, bounds);
      const times = checkTimes(req.startTime, req.endTime, new Date());
      await manager.create({ config, startTime: times.start, endTime: times.end });
      return { clientId };
    }),
    update: handle('Update', async (req): Promise<Empty> => {
      checkSafeName('sandbox_id', req.sandboxId);
      const egressChange = req.egress !== undefined || req.allowInternetAccess !== undefined;
      // An Update may change only the egress policy; otherwise it is the end time.
      if (req.endTime ? Number.isNaN(req.endTime.getTime()) : !egressChange)
        throw new RequestInvalid('end_time', 'missing');
      await manager.update(req.sandboxId, req.endTime, {
        egress: req.egress,
        allowInternetAccess: req.allowInternetAccess,
      });
      return {};
    }),
    list: handle('List', async (): Promise<SandboxListResponse> => ({
      sandboxes: manager.list().map((s): RunningSandbox => ({
        config: s.config as SandboxConfig,
        clientId,
        startTime: s.startTime,
        endTime: s.endTime,
      })),
    })),
    delete: handle('Delete', async (req): Promise<Empty> => {
      checkSafeName('sandbox_id', req.sandboxId);
      await manager.delete(req.sandboxId);
      return {};
    }),
    pause: handle('Pause', async (req): Promise<Empty> => {
      checkSafeName('sandbox_id', req.sandboxId);
      if (req.templateId) checkSafeName('template_id', req.templateId);
      const buildId = checkBuildId('build_id', req.buildId);
      await manager.pause(req.sandboxId, buildId, req.templateId || undefined);
      return {};
    }),
    checkpoint: handle('Checkpoint', async (req): Promise<SandboxCheckpointResponse> => {
      checkSafeName('sandbox_id', req.sandboxId);
      const buildId = checkBuildId('build_id', req.buildId);
      await manager.checkpoint(req.sandboxId, buildId);
      return {};
    }),
    listCachedBuilds: handle('ListCachedBuilds', async (): Promise<SandboxListCachedBuildsResponse> => ({
      builds: (await builds.listCachedBuilds()).map((b) => ({ buildId: b.buildId, expirationTime: b.expiresAt })),
    })),
  };
}
