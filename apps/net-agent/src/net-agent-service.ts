import type { Logger } from '#logging';
import type { NetAgentServer, NetEgressPolicy, NetSlot, NetStats } from '#proto/sbx/net';
import { isOpenPolicy, parseEgressPolicy, type EgressPolicy } from './egress-policy.js';
import type { NetAgentMetrics } from './net-agent-metrics.js';
import { RequestInvalid, unaryHandlers } from '#service-kit';
import { SlotNotInUse, SlotNotOwned, type PoolSlot, type SlotPool } from './slot-pool.js';

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
  /** Installs and removes slots' egress policies (slot-egress.ts). */
  egress: {
    install(spec: PoolSlot['spec'], sandboxId: string, policy: EgressPolicy): Promise<void>;
    release(spec: PoolSlot['spec'], clearTable: boolean): Promise<void>;
  };
}): NetAgentServer {
  const install = (slot: PoolSlot, sandboxId: string, policy: EgressPolicy) =>
    options.egress.install(slot.spec, sandboxId, policy);
  const egressOf = (egress: NetEgressPolicy | undefined, prefix: string) =>
    parseEgressPolicy(egress ?? { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] }, prefix);
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
    acquire: handle('acquire', ({ sandboxId, egress, pooled }) => {
      const started = performance.now();
      checkSandboxId(sandboxId);
      const policy = egressOf(egress, 'egress.');
      const answer = (slot: PoolSlot, result: string) => {
        metrics.acquireSeconds.observe((performance.now() - started) / 1000);
        done('acquire', result);
        logger.debug({ sandboxId, slot: slot.spec.idx }, 'slot acquired');
        return toNetSlot(slot);
      };
      // A slot with a policy is handed out only once the policy holds; if it cannot be
      // installed the slot is removed (its rules are in an unknown state) and the error returned.
      const withPolicy = async (slot: PoolSlot, result: string) => {
        try {
          await install(slot, sandboxId, policy);
        } catch (err) {
          await options.egress.release(slot.spec, false).catch(() => undefined);
          await pool.release(slot.spec.idx, sandboxId, false).catch((releaseErr: unknown) => {
            logger.error(
              { err: releaseErr, sandboxId, slot: slot.spec.idx },
              'releasing a slot after a failed egress policy',
            );
          });
          throw err;
        }
        logger.info({ sandboxId, slot: slot.spec.idx }, 'egress policy installed');
        return answer(slot, result);
      };
      const open = isOpenPolicy(policy);
      // The common case (a slot is ready, no policy) answers synchronously, without a promise hop.
      const ready = pool.tryAcquire(sandboxId, pooled);
      if (ready) return open ? answer(ready, 'ok') : withPolicy(ready, 'ok');
      return pool
        .acquire(sandboxId, pooled)
        .then((slot) => (open ? answer(slot, 'waited') : withPolicy(slot, 'waited')));
    }),
    setEgress: handle('setEgress', async ({ idx, sandboxId, egress }) => {
      checkSandboxId(sandboxId);
      const policy = egressOf(egress, 'egress.');
      const slot = pool.list().find((s) => s.spec.idx === idx);
      if (!slot) throw new SlotNotInUse(idx);
      if (slot.sandboxId && slot.sandboxId !== sandboxId) throw new SlotNotOwned(idx, sandboxId, slot.sandboxId);
      await install(slot, sandboxId, policy);
      logger.info(
        { sandboxId, slot: idx, open: isOpenPolicy(policy), domains: policy.domains.entries.length },
        'egress policy replaced',
      );
      done('setEgress', 'ok');
      return {};
    }),
    release: handle('release', async ({ idx, sandboxId, reuse }) => {
      if (sandboxId) checkSandboxId(sandboxId);
      const slot = pool.list().find((s) => s.spec.idx === idx);
      // A reused slot must not carry its last sandbox's policy to the next one; unconditional,
      // as slots adopted after a restart may have one nobody here remembers. Its proxied
      // connections end with it either way.
      let keep = reuse;
      if (slot && (!sandboxId || !slot.sandboxId || slot.sandboxId === sandboxId)) {
        keep = await options.egress.release(slot.spec, reuse).then(
          () => reuse,
          (err: unknown) => {
            logger.warn({ err, sandboxId, slot: idx }, 'clearing the egress policy failed: slot removed, not reused');
            return false;
          },
        );
      }
      await pool.release(idx, sandboxId, keep);
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
