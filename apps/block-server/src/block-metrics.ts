import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import { Command } from '#nbd';
import { createRegistry } from '#metrics';
import type { NbdRequestObserver } from './nbd-connection.js';

const COMMAND_NAMES = new Map<number, string>(
  Object.entries(Command).map(([name, value]) => [value, name.toLowerCase()]),
);

/** block-server's Prometheus metrics; one instance per process. */
export class BlockMetrics {
  readonly registry: Registry;
  readonly devices: Gauge;
  readonly connections: Gauge;
  readonly exports: Counter;
  private readonly requests: Counter;
  private readonly bytes: Counter;
  private readonly latency: Histogram;

  constructor(registry: Registry = createRegistry('block-server')) {
    this.registry = registry;
    this.requests = new Counter({
      name: 'sbx_nbd_requests_total',
      help: 'NBD requests answered, by command and result (ok or errno name)',
      labelNames: ['command', 'result'],
      registers: [registry],
    });
    this.bytes = new Counter({
      name: 'sbx_nbd_bytes_total',
      help: 'Payload bytes read and written through NBD',
      labelNames: ['command'],
      registers: [registry],
    });
    this.latency = new Histogram({
      name: 'sbx_nbd_request_seconds',
      help: 'Time from a request being parsed to its reply being queued',
      labelNames: ['command'],
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1],
      registers: [registry],
    });
    this.devices = new Gauge({ name: 'sbx_block_devices', help: 'Open copy-on-write devices', registers: [registry] });
    this.connections = new Gauge({
      name: 'sbx_nbd_connections',
      help: 'Connected NBD clients',
      registers: [registry],
    });
    this.exports = new Counter({
      name: 'sbx_block_exports_total',
      help: 'Dirty-block exports, by result',
      labelNames: ['result'],
      registers: [registry],
    });
  }

  readonly observer: NbdRequestObserver = (event) => {
    const command = COMMAND_NAMES.get(event.command) ?? 'unknown';
    this.requests.inc({ command, result: event.error === 0 ? 'ok' : `errno_${event.error}` });
    if (event.error === 0) {
      if (event.bytes > 0) this.bytes.inc({ command }, event.bytes);
      this.latency.observe({ command }, event.seconds);
    }
  };
}
