import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { PoolStats, SlotPool } from './slot-pool.js';

export interface NetAgentMetrics {
  acquireSeconds: Histogram;
  createSecondsPerSlot: Histogram;
  requests: Counter<'method' | 'result'>;
  egressConnections: Counter<'result'>;
}

/** Pool counts are read from the pool at scrape time; latencies are observed as they happen. */
export function registerNetAgentMetrics(registry: Registry, pool: () => SlotPool | undefined): NetAgentMetrics {
  const read = (kind: typeof Gauge | typeof Counter, what: string, help: string, field: keyof PoolStats) =>
    new kind({
      name: `sbx_net_agent_${what}`,
      help,
      registers: [registry],
      collect(this: Gauge | Counter) {
        const value = pool()?.stats()[field];
        if (typeof value !== 'number') return;
        // The pool keeps the running totals; a counter is set to them by reset + inc.
        this.reset();
        this.inc(value);
      },
    });
  read(Gauge, 'slots_ready_new', 'Ready slots never used', 'readyNew');
  read(Gauge, 'slots_ready_reused', 'Ready slots given back for reuse', 'readyReused');
  read(Gauge, 'slots_in_use', 'Slots handed to sandboxes', 'inUse');
  read(Gauge, 'pending_releases', 'Reservations waiting for the store to come back', 'pendingReleases');
  read(Counter, 'slots_created_total', 'Slots created since start', 'created');
  read(Counter, 'slots_removed_total', 'Slots removed since start', 'removed');
  read(Counter, 'slot_create_errors_total', 'Failed creation batches', 'createErrors');
  read(Counter, 'slot_remove_errors_total', 'Slots whose removal failed', 'removeErrors');
  return {
    acquireSeconds: new Histogram({
      name: 'sbx_net_agent_acquire_seconds',
      help: 'Acquire latency inside the agent',
      buckets: [0.0001, 0.0005, 0.001, 0.005, 0.05, 0.5, 5],
      registers: [registry],
    }),
    createSecondsPerSlot: new Histogram({
      name: 'sbx_net_agent_slot_create_seconds',
      help: 'Batch creation time divided by slots in the batch',
      buckets: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
      registers: [registry],
    }),
    egressConnections: new Counter({
      name: 'sbx_net_agent_egress_proxy_connections_total',
      help: 'Guest TCP connections judged by the egress proxy, allowed or refused',
      labelNames: ['result'],
      registers: [registry],
    }),
    requests: new Counter({
      name: 'sbx_net_agent_requests_total',
      help: 'Control API requests by method and result',
      labelNames: ['method', 'result'],
      registers: [registry],
    }),
  };
}
