import { createServer, type Server } from 'node:http';
import { collectDefaultMetrics, Counter, Histogram, Registry, Summary, type Metric } from 'prom-client';
import { metricNameProblems } from './metric-names.js';

export interface MetricsServer {
  readonly registry: Registry;
  /** The bound port (useful when 0 was asked for). */
  readonly port: number;
  close(): Promise<void>;
}

/** Raised when a service registers a metric whose name breaks the scheme (metric-names.ts). */
export class MetricNameInvalid extends Error {
  readonly code = 'METRIC_NAME_INVALID';
  constructor(readonly problems: string[]) {
    super(problems.join('; '));
    this.name = 'MetricNameInvalid';
  }
}

/**
 * A Prometheus registry with process metrics, labelled with the service name. It refuses a
 * metric named against the scheme at registration, so a wrong name fails the first start.
 */
export function createRegistry(service: string): Registry {
  const registry = new (class extends Registry {
    override registerMetric(metric: Metric): void {
      // prom-client registers from its base constructor, before the subclass sets `type`.
      const type =
        metric instanceof Counter
          ? 'counter'
          : metric instanceof Histogram
            ? 'histogram'
            : metric instanceof Summary
              ? 'summary'
              : 'gauge';
      const { name } = metric as unknown as { name: string };
      const problems = metricNameProblems(service, name, type);
      if (problems.length) throw new MetricNameInvalid(problems);
      super.registerMetric(metric);
    }
  })();
  registry.setDefaultLabels({ service });
  collectDefaultMetrics({ register: registry });
  return registry;
}

/** Serves `GET /metrics` in Prometheus text format on a local port. */
export async function startMetricsServer(registry: Registry, host: string, port: number): Promise<MetricsServer> {
  const server: Server = createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/metrics' || req.url?.startsWith('/metrics?'))) {
      registry.metrics().then(
        (body) => {
          res.writeHead(200, { 'content-type': registry.contentType });
          res.end(body);
        },
        (err: unknown) => {
          res.writeHead(500, { 'content-type': 'text/plain' });
          res.end(String(err));
        },
      );
      return;
    }
    res.writeHead(404, { 'content-type': 'text/plain' });
    res.end('not found: try GET /metrics\n');
  });
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, host, () => resolve());
  });
  const address = server.address();
  return {
    registry,
    port: typeof address === 'object' && address ? address.port : port,
    close: () => new Promise((resolve) => server.close(() => resolve())),
  };
}
