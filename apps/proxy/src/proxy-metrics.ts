import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { RouteTable } from './route-table.js';

export type Protocol = 'http1' | 'h2' | 'websocket' | 'tcp';

/** The proxy's Prometheus metrics (`sbx_proxy_<what>_<unit>`). */
export class ProxyMetrics {
  readonly requests: Counter<'protocol' | 'result'>;
  readonly responseSeconds: Histogram<'protocol'>;
  readonly connections: Gauge<'protocol'>;
  readonly resumes: Counter<'result'>;

  constructor(registry: Registry | undefined, table: RouteTable, watchConnected: () => boolean) {
    const registers = registry ? [registry] : [];
    this.requests = new Counter({
      name: 'sbx_proxy_requests_total',
      help: 'Requests (HTTP requests, h2 streams, WebSocket and TCP connections) by outcome: ok or the refusal code',
      labelNames: ['protocol', 'result'],
      registers,
    });
    this.responseSeconds = new Histogram({
      name: 'sbx_proxy_response_head_seconds',
      help: 'From request head received to response head sent (includes any resume)',
      labelNames: ['protocol'],
      buckets: [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
    });
    this.connections = new Gauge({
      name: 'sbx_proxy_client_connections',
      help: 'Open client connections by protocol',
      labelNames: ['protocol'],
      registers,
    });
    this.resumes = new Counter({
      name: 'sbx_proxy_resumes_total',
      help: 'Sandboxes asked for on a request (resume on request, or waiting for one starting) by result',
      labelNames: ['result'],
      registers,
    });
    new Gauge({
      name: 'sbx_proxy_routes',
      help: 'Sandboxes in the route table by state',
      labelNames: ['state'],
      // With --workers each holds the same table: the node has what one of them has.
      aggregator: 'max',
      registers,
      collect() {
        for (const [state, n] of Object.entries(table.countByState())) this.set({ state }, n);
      },
    });
    new Gauge({
      name: 'sbx_proxy_route_watch_connected',
      help: "1 while the route watch stream from the orchestrator is open (every worker's, with --workers)",
      aggregator: 'min',
      registers,
      collect() {
        this.set(watchConnected() ? 1 : 0);
      },
    });
  }
}
