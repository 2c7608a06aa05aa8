import { describe, expect, it } from 'vitest';
import { Counter, Gauge, Histogram } from 'prom-client';
import { createRegistry, MetricNameInvalid, metricNameProblems } from '#metrics';

describe('metric names', () => {
  it('takes sbx_<service>_<what>_<unit> in base units, with _total for counters only', () => {
    expect(metricNameProblems('block-server', 'sbx_block_server_nbd_requests_total', 'counter')).toEqual([]);
    expect(metricNameProblems('uffd-server', 'sbx_uffd_server_fault_seconds', 'histogram')).toEqual([]);
    expect(metricNameProblems('dns', 'sbx_dns_records', 'gauge')).toEqual([]);
    expect(metricNameProblems('dns', 'process_cpu_seconds_total', 'counter')).toEqual([]);
    expect(metricNameProblems('dns', 'dns_queries_total', 'counter')).toHaveLength(1);
    expect(metricNameProblems('net-agent', 'sbx_net_agent_slots_created_total', 'gauge')[0]).toMatch(/only counters/);
    expect(metricNameProblems('net-agent', 'sbx_net_agent_requests', 'counter')[0]).toMatch(/every counter/);
    expect(metricNameProblems('uffd-server', 'sbx_uffd_server_fault_latency_us', 'histogram').join()).toMatch(
      /base units.*seconds or bytes/,
    );
  });

  it('refuses a badly named metric when it is registered', () => {
    const registry = createRegistry('net-agent');
    new Counter({ name: 'sbx_net_agent_requests_total', help: 'ok', registers: [registry] });
    new Histogram({ name: 'sbx_net_agent_acquire_seconds', help: 'ok', registers: [registry] });
    expect(() => new Gauge({ name: 'net_agent_slots_created_total', help: 'bad', registers: [registry] })).toThrow(
      MetricNameInvalid,
    );
  });
});
