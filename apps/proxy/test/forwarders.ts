/**
 * The Node forwarding path the client port hands connections to (HTTP/1.1 and h2 forwarders over
 * a route table), as the unit tests of the client port build it. No orchestrator is behind it:
 * the routing client dials a socket that does not exist, so a route that needs a resume fails
 * fast instead of waiting.
 */
import { dial } from '#grpc';
import type { Logger } from '#logging';
import { RoutingClient } from '#proto/sbx/routing';
import { H2Forwarder } from '../src/h2-forwarder.js';
import { Http1Forwarder } from '../src/http1-forwarder.js';
import { ProxyMetrics } from '../src/proxy-metrics.js';
import { RouteResolver } from '../src/route-resolver.js';
import type { RouteTable } from '../src/route-table.js';

export interface Forwarders {
  http1: Http1Forwarder;
  h2: H2Forwarder;
  metrics: ProxyMetrics;
  /** Closes both forwarders and the routing client. */
  close(): void;
}

export function forwarders(table: RouteTable, logger: Logger, http1IdleTimeoutMs?: number): Forwarders {
  const routing = dial(RoutingClient, '/nonexistent/orchestrator.sock');
  const resolver = new RouteResolver({ table, routing, resumeTimeoutMs: 1000, logger });
  const metrics = new ProxyMetrics(undefined, table, () => true);
  const common = { resolver, metrics, logger, connectTimeoutMs: 2000 };
  const http1 = new Http1Forwarder({ ...common, maxIdleUpstreamSockets: 8, idleTimeoutMs: http1IdleTimeoutMs });
  const h2 = new H2Forwarder(common);
  return {
    http1,
    h2,
    metrics,
    close() {
      http1.close();
      h2.close();
      routing.close();
    },
  };
}
