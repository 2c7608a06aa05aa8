import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { SlotPool } from './slot-pool.js';

export interface NetAgentMetrics {
  acquireSeconds: Histogram;
  createSecondsPerSlot: Histogram;
  requests: Counter<'method' | 'result'>;
}

/** Pool gauges are read from the pool at scrape time; latencies are observed as they happen. */
export function registerNetAgentMetrics(registry: Registry, pool: () => SlotPool | undefined): NetAgentMetrics {
  const gauge = (name: string, help: string, read: (p: SlotPool) => number) =>
    new Gauge({
      name,
      help,
      registers: [registry],
      collect() {
        const p = pool();
        if (p) this.set(read(p));
      },
    });
  gauge('net_agent_slots_ready_new', 'Ready slots never used', (p) => p.stats().readyNew);
  gauge('net_agent_slots_ready_reused', 'Ready slots given back for reuse', (p) => p.stats().readyReused);
  gauge('net_agent_slots_in_use', 'Slots handed to sandboxes', (p) => p.stats().inUse);
  gauge('net_agent_slots_created_total', 'Slots created since start', (p) => p.stats().created);
  gauge('net_agent_slots_removed_total', 'Slots removed since start', (p) => p.stats().removed);
  gauge('net_agent_slot_create_errors_total', 'Failed creation batches', (p) => p.stats().createErrors);
  gauge('net_agent_slot_remove_errors_total', 'Slots whose removal failed', (p) => p.stats().removeErrors);
  gauge(
    'net_agent_pending_releases',
    'Reservations waiting for the store to come back',
    (p) => p.stats().pendingReleases,
  );
  return {
    acquireSeconds: new Histogram({
      name: 'net_agent_acquire_seconds',
      help: 'Acquire latency inside the agent',
      buckets: [0.0001, 0.0005, 0.001, 0.005, 0.05, 0.5, 5],
      registers: [registry],
    }),
    createSecondsPerSlot: new Histogram({
      name: 'net_agent_create_seconds_per_slot',
      help: 'Batch creation time divided by slots in the batch',
      buckets: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1],
      registers: [registry],
    }),
    requests: new Counter({
      name: 'net_agent_requests_total',
      help: 'Control API requests by method and result',
      labelNames: ['method', 'result'],
      registers: [registry],
    }),
  };
}
