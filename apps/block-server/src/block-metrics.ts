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
  /** Blocks of successful exports: stored in the diff, nil (zero), or left to the parent (dedup). */
  readonly exportBlocks: Counter;
  /** Each NBD server's live client count, summed at scrape time. */
  readonly connectionSources = new Set<() => number>();
  private readonly requests: Counter;
  private readonly bytes: Counter;
  private readonly latency: Histogram;

  constructor(registry: Registry = createRegistry('block-server')) {
    this.registry = registry;
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const metrics = this;
    this.requests = new Counter({
      name: 'sbx_block_server_nbd_requests_total',
      help: 'NBD requests answered, by command and result (ok or errno number)',
      labelNames: ['command', 'result'],
      registers: [registry],
      collect() {
        metrics.publish();
      },
    });
    this.bytes = new Counter({
      name: 'sbx_block_server_nbd_bytes_total',
      help: 'Payload bytes read and written through NBD',
      labelNames: ['command'],
      registers: [registry],
    });
    this.latency = new Histogram({
      name: 'sbx_block_server_nbd_request_seconds',
      help: 'Time from a request being parsed to its reply being queued (sampled, at most 4096 per scrape)',
      labelNames: ['command'],
      buckets: [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1],
      registers: [registry],
    });
    this.devices = new Gauge({
      name: 'sbx_block_server_devices',
      help: 'Open copy-on-write devices',
      registers: [registry],
    });
    this.connections = new Gauge({
      name: 'sbx_block_server_nbd_connections',
      help: 'Connected NBD clients',
      registers: [registry],
      collect() {
        let n = 0;
        for (const count of metrics.connectionSources) n += count();
        this.set(n);
      },
    });
    this.exports = new Counter({
      name: 'sbx_block_server_exports_total',
      help: 'Dirty-block exports, by result',
      labelNames: ['result'],
      registers: [registry],
    });
    this.exportBlocks = new Counter({
      name: 'sbx_block_server_export_blocks_total',
      help: 'Blocks of dirty-block exports: stored, zero (nil mapping) or deduped (equal to the parent, left to it)',
      labelNames: ['kind'],
      registers: [registry],
    });
  }

  /**
   * Per-request accounting in plain numbers; prom-client's labelled inc/observe cost a few
   * microseconds each, which at 50k requests/s is a core's tenth. Copied out at scrape time.
   */
  private readonly tally = new Map<number, { count: number; bytes: number; command: string; result: string }>();
  private readonly pendingLatency: Array<[string, number]> = [];

  readonly observer: NbdRequestObserver = (event) => {
    const key = event.command * 1024 + event.error;
    let entry = this.tally.get(key);
    if (!entry) {
      const command = COMMAND_NAMES.get(event.command) ?? 'unknown';
      const result = event.error === 0 ? 'ok' : `errno_${event.error}`;
      this.tally.set(key, (entry = { count: 0, bytes: 0, command, result }));
    }
    entry.count++;
    if (event.error === 0) {
      entry.bytes += event.bytes;
      // A bounded sample of latencies: enough for the histogram's shape, no unbounded growth.
      if (this.pendingLatency.length < 4096) this.pendingLatency.push([entry.command, event.seconds]);
    }
  };

  private publish(): void {
    for (const entry of this.tally.values()) {
      if (entry.count > 0) this.requests.inc({ command: entry.command, result: entry.result }, entry.count);
      if (entry.bytes > 0) this.bytes.inc({ command: entry.command }, entry.bytes);
      entry.count = 0;
      entry.bytes = 0;
    }
    for (const [command, seconds] of this.pendingLatency) this.latency.observe({ command }, seconds);
    this.pendingLatency.length = 0;
  }
}
