import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { HttpRelayStats } from '#native';
import type { RouteTable } from './route-table.js';

/** What the metrics read from the native relay at scrape time (native-relay.ts). */
export interface NativeRelayCounters {
  readonly routes: number;
  readonly notAdopted: number;
  /** Undefined once the relay is closed. */
  stats(): HttpRelayStats | undefined;
}

export type Protocol = 'http1' | 'h2' | 'websocket' | 'tcp';

/** The proxy's Prometheus metrics (`sbx_proxy_<what>_<unit>`). */
export class ProxyMetrics {
  readonly requests: Counter<'protocol' | 'result'>;
  readonly responseSeconds: Histogram<'protocol'>;
  readonly connections: Gauge<'protocol'>;
  readonly resumes: Counter<'result'>;

  private readonly registers: Registry[];

  constructor(registry: Registry | undefined, table: RouteTable, watchConnected: () => boolean) {
    const registers = registry ? [registry] : [];
    this.registers = registers;
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

  /**
   * The native relay's counters, read from it when /metrics is scraped (nothing polls). What
   * the relay hands back is then counted by the Node path's own metrics as well.
   */
  addNativeRelay(relay: NativeRelayCounters): void {
    const registers = this.registers;
    const counter = (name: string, help: string, read: (s: HttpRelayStats) => number) =>
      new Counter({
        name,
        help,
        registers,
        collect() {
          const s = relay.stats();
          if (!s) return;
          this.reset();
          this.inc(read(s));
        },
      });
    const gauge = (name: string, help: string, read: (s: HttpRelayStats) => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const s = relay.stats();
          this.set(s ? read(s) : 0);
        },
      });
    counter(
      'sbx_proxy_native_requests_total',
      'HTTP/1.1 requests the native relay forwarded itself',
      (s) => s.requests,
    );
    counter('sbx_proxy_native_adopted_total', 'Client connections given to the native relay', (s) => s.adopted);
    gauge('sbx_proxy_native_client_connections', 'Client connections the native relay holds now', (s) => s.openClients);
    new Counter({
      name: 'sbx_proxy_native_responses_total',
      help: 'Response heads the native relay passed on, by status class (interim 1xx included)',
      labelNames: ['class'],
      registers,
      collect() {
        const s = relay.stats();
        if (!s) return;
        this.reset();
        s.responses.forEach((n, i) => this.inc({ class: `${i + 1}xx` }, n));
      },
    });
    new Counter({
      name: 'sbx_proxy_native_handoffs_total',
      help: 'Client connections the native relay gave back to the Node path, by reason',
      labelNames: ['reason'],
      registers,
      collect() {
        const s = relay.stats();
        if (!s) return;
        this.reset();
        for (const [reason, n] of Object.entries(s.handoffsByReason)) this.inc({ reason }, n ?? 0);
        if (relay.notAdopted) this.inc({ reason: 'NOT_ADOPTED' }, relay.notAdopted);
      },
    });
    new Counter({
      name: 'sbx_proxy_native_bytes_total',
      help: 'Bytes the native relay carried: up (client to sandbox) and down',
      labelNames: ['direction'],
      registers,
      collect() {
        const s = relay.stats();
        if (!s) return;
        this.reset();
        this.inc({ direction: 'up' }, s.bytesUp);
        this.inc({ direction: 'down' }, s.bytesDown);
      },
    });
    counter(
      'sbx_proxy_native_upstream_connects_total',
      'Connections the native relay opened to sandbox ports',
      (s) => s.upstreamConnects,
    );
    counter(
      'sbx_proxy_native_upstream_connect_failures_total',
      'Connects to sandbox ports that failed (handed back)',
      (s) => s.upstreamConnectFailures,
    );
    counter('sbx_proxy_native_pool_reuses_total', 'Requests sent on a pooled upstream connection', (s) => s.poolReuses);
    counter(
      'sbx_proxy_native_retries_total',
      'Bodiless requests sent again after a pooled connection was found reset',
      (s) => s.retries,
    );
    counter(
      'sbx_proxy_native_upstream_errors_total',
      'Upstream failures after a request went out (client connection closed)',
      (s) => s.upstreamErrors,
    );
    counter(
      'sbx_proxy_native_idle_closes_total',
      'Client connections closed idle between requests',
      (s) => s.idleCloses,
    );
    counter(
      'sbx_proxy_native_client_framing_errors_total',
      'Clients whose chunked request framing was broken',
      (s) => s.clientFramingErrors,
    );
    new Gauge({
      name: 'sbx_proxy_native_upstream_connections',
      help: 'Upstream connections of the native relay: open (in use or idle) and idle (pooled)',
      labelNames: ['state'],
      registers,
      collect() {
        const s = relay.stats();
        this.set({ state: 'open' }, s?.openUpstreams ?? 0);
        this.set({ state: 'idle' }, s?.idleUpstreams ?? 0);
      },
    });
    gauge('sbx_proxy_native_routes', 'Running sandboxes the native relay forwards to', () => relay.routes);
  }
}
