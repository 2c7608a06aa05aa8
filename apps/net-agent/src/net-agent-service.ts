import { status, type ServiceError } from '@grpc/grpc-js';
import type { Logger } from '#logging';
import type { NetAgentServer, NetSlot, NetStats } from '#proto/sbx/net';
import type { NetAgentMetrics } from './net-agent-metrics.js';
import {
  PoolStopped,
  SlotNotInUse,
  SlotNotOwned,
  SlotPoolExhausted,
  type PoolSlot,
  type SlotPool,
} from './slot-pool.js';
import { SlotIndexInvalid } from './slot-layout.js';

export class RequestInvalid extends Error {
  readonly code = 'REQUEST_INVALID';
  constructor(
    readonly field: string,
    reason: string,
  ) {
    super(`${field}: ${reason}`);
    this.name = 'RequestInvalid';
  }
}

const SANDBOX_ID = /^[A-Za-z0-9_.-]{1,128}$/;

export function toNetSlot(slot: PoolSlot): NetSlot {
  const s = slot.spec;
  return {
    idx: s.idx,
    sandboxId: slot.sandboxId,
    namespace: s.namespace,
    hostVeth: s.hostVeth,
    nsVeth: s.nsVeth,
    hostVethIp: s.hostVethIp,
    nsVethIp: s.nsVethIp,
    tapName: s.tapName,
    tapIp: s.tapIp,
    tapPrefix: s.tapPrefix,
    guestIp: s.guestIp,
    hostIp: s.hostIp,
  };
}

/** The one place where our errors become gRPC status codes; the message names the step. */
export function toServiceError(method: string, err: unknown): Partial<ServiceError> {
  const message = `net-agent ${method}: ${(err as Error)?.message ?? String(err)}`;
  if (err instanceof RequestInvalid || err instanceof SlotIndexInvalid)
    return { code: status.INVALID_ARGUMENT, details: message };
  if (err instanceof SlotPoolExhausted) return { code: status.RESOURCE_EXHAUSTED, details: message };
  if (err instanceof SlotNotInUse) return { code: status.NOT_FOUND, details: message };
  if (err instanceof SlotNotOwned) return { code: status.FAILED_PRECONDITION, details: message };
  if (err instanceof PoolStopped) return { code: status.UNAVAILABLE, details: message };
  const code = (err as { code?: string }).code;
  if (code === 'RESERVATION_UNAVAILABLE') return { code: status.UNAVAILABLE, details: message };
  return { code: status.INTERNAL, details: message };
}

export function createNetAgentService(options: {
  pool: SlotPool;
  logger: Logger;
  metrics: NetAgentMetrics;
  reservation: string;
  uplink: string;
  nodeId: string;
}): NetAgentServer {
  const { pool, logger, metrics } = options;
  const done = (method: string, result: string) => metrics.requests.inc({ method, result });
  return {
    acquire(call, callback) {
      const started = performance.now();
      const sandboxId = call.request.sandboxId;
      if (!SANDBOX_ID.test(sandboxId)) {
        done('acquire', 'invalid');
        callback(
          toServiceError('acquire', new RequestInvalid('sandbox_id', 'expected 1-128 characters [A-Za-z0-9_.-]')),
        );
        return;
      }
      // The common case (a slot is ready) answers synchronously, without a promise hop.
      let ready: PoolSlot | undefined;
      try {
        ready = pool.tryAcquire(sandboxId);
      } catch (err) {
        done('acquire', 'error');
        callback(toServiceError('acquire', err));
        return;
      }
      if (ready) {
        metrics.acquireSeconds.observe((performance.now() - started) / 1000);
        done('acquire', 'ok');
        logger.debug({ sandboxId, slot: ready.spec.idx }, 'slot acquired');
        callback(null, toNetSlot(ready));
        return;
      }
      pool.acquire(sandboxId).then(
        (slot) => {
          metrics.acquireSeconds.observe((performance.now() - started) / 1000);
          done('acquire', 'waited');
          callback(null, toNetSlot(slot));
        },
        (err: unknown) => {
          done('acquire', 'error');
          logger.warn({ sandboxId, err }, 'acquire failed');
          callback(toServiceError('acquire', err));
        },
      );
    },
    release(call, callback) {
      const { idx, sandboxId, reuse } = call.request;
      if (sandboxId && !SANDBOX_ID.test(sandboxId)) {
        done('release', 'invalid');
        callback(
          toServiceError('release', new RequestInvalid('sandbox_id', 'expected 1-128 characters [A-Za-z0-9_.-]')),
        );
        return;
      }
      pool.release(idx, sandboxId, reuse).then(
        () => {
          done('release', 'ok');
          callback(null, {});
        },
        (err: unknown) => {
          done('release', 'error');
          logger.warn({ sandboxId, slot: idx, err }, 'release failed');
          callback(toServiceError('release', err));
        },
      );
    },
    list(_call, callback) {
      done('list', 'ok');
      callback(null, { slots: pool.list().map(toNetSlot) });
    },
    stats(_call, callback) {
      const s = pool.stats();
      const out: NetStats = {
        readyNew: s.readyNew,
        readyReused: s.readyReused,
        inUse: s.inUse,
        created: s.created,
        removed: s.removed,
        createErrors: s.createErrors,
        reservation: options.reservation,
        removeErrors: s.removeErrors,
        pendingReleases: s.pendingReleases,
        lastError: s.lastError ?? '',
        uplink: options.uplink,
        nodeId: options.nodeId,
      };
      done('stats', 'ok');
      callback(null, out);
    },
  };
}
