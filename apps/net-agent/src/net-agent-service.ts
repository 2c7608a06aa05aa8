import type { Logger } from '#logging';
import type { NetAgentServer, NetSlot, NetStats } from '#proto/sbx/net';
import type { NetAgentMetrics } from './net-agent-metrics.js';
import { RequestInvalid, unaryHandlers } from '#service-kit';
import type { PoolSlot, SlotPool } from './slot-pool.js';

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
  const handle = unaryHandlers({
    logger,
    onError: (method, err) => done(method, err instanceof RequestInvalid ? 'invalid' : 'error'),
  });
  const checkSandboxId = (sandboxId: string) => {
    if (!SANDBOX_ID.test(sandboxId)) throw new RequestInvalid('sandbox_id', 'expected 1-128 characters [A-Za-z0-9_.-]');
  };
  return {
    acquire: handle('acquire', ({ sandboxId }) => {
      const started = performance.now();
      checkSandboxId(sandboxId);
      const answer = (slot: PoolSlot, result: string) => {
        metrics.acquireSeconds.observe((performance.now() - started) / 1000);
        done('acquire', result);
        logger.debug({ sandboxId, slot: slot.spec.idx }, 'slot acquired');
        return toNetSlot(slot);
      };
      // The common case (a slot is ready) answers synchronously, without a promise hop.
      const ready = pool.tryAcquire(sandboxId);
      return ready ? answer(ready, 'ok') : pool.acquire(sandboxId).then((slot) => answer(slot, 'waited'));
    }),
    release: handle('release', async ({ idx, sandboxId, reuse }) => {
      if (sandboxId) checkSandboxId(sandboxId);
      await pool.release(idx, sandboxId, reuse);
      done('release', 'ok');
      return {};
    }),
    list: handle('list', () => {
      done('list', 'ok');
      return { slots: pool.list().map(toNetSlot) };
    }),
    stats: handle('stats', (): NetStats => {
      const s = pool.stats();
      done('stats', 'ok');
      return {
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
    }),
  };
}
