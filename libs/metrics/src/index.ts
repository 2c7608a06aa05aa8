export { createRegistry, startMetricsServer, type MetricsServer } from './metrics-server.js';
