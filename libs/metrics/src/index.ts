export { createRegistry, startMetricsServer, MetricNameInvalid, type MetricsServer } from './metrics-server.js';
export { metricNameProblems, metricPrefix, RUNTIME_METRIC } from './metric-names.js';
