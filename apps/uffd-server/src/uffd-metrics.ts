import { Counter, Gauge, Histogram, type Registry } from 'prom-client';
import type { SandboxRegistry } from './sandbox-registry.js';
import type { SandboxStats } from './sandbox-memory.js';

const PAGE_4K = 4096;

/** Totals of one sandbox at the last scrape; latency counts per bucket bound (µs). */
interface Seen {
  faults: number;
  bytes: number;
  prefetch: number;
  wp: number;
  startFaults: number;
  passPages: number;
  passLate: number;
  hits: number;
  latency: number[];
}

/**
 * Fault service time in seconds, from the native engines' bucket counts (they keep no sum, so
 * the histogram has buckets and a count but no `_sum`).
 */
class FaultSeconds extends Histogram {
  /** Faults per bucket bound in µs (not cumulative), over every sandbox ever served. */
  readonly perBound = new Map<number, number>();

  override async get(): Promise<Awaited<ReturnType<Histogram['get']>>> {
    const name = 'sbx_uffd_server_fault_seconds';
    let running = 0;
    const values = [...this.perBound.keys()]
      .sort((a, b) => a - b)
      .map((bound) => {
        running += this.perBound.get(bound)!;
        const le = bound >= Number.MAX_SAFE_INTEGER ? '+Inf' : bound / 1e6;
        return { labels: { le }, value: running, metricName: `${name}_bucket` };
      });
    if (values.at(-1)?.labels.le !== '+Inf')
      values.push({ labels: { le: '+Inf' }, value: running, metricName: `${name}_bucket` });
    return {
      name,
      help: 'Fault service time (no _sum: the engines count per bucket only)',
      type: 'histogram',
      values: [...values, { labels: {} as { le: number }, value: running, metricName: `${name}_count` }],
      aggregator: 'sum',
    } as unknown as Awaited<ReturnType<Histogram['get']>>;
  }
}

/**
 * Prometheus metrics of uffd-server. Fault counts live in the native engines; at scrape time each
 * sandbox's growth since the last scrape is added to process-wide counters (so stopped sandboxes
 * still count).
 */
export class UffdMetrics {
  readonly handshakeFailures: Counter<'problem'>;
  readonly sandboxesEnded: Counter<'state'>;
  private readonly seen = new Map<string, Seen>();
  private readonly faults: Counter;
  private readonly bytes: Counter;
  private readonly prefetch: Counter;
  private readonly wp: Counter;
  private readonly startFaults: Counter;
  private readonly passPages: Counter;
  private readonly passLate: Counter;
  private readonly hits: Counter;
  private readonly latency: FaultSeconds;

  constructor(registry: Registry, sandboxes: () => SandboxRegistry | undefined) {
    const counter = (what: string, help: string, labelNames: string[] = [], collect?: () => void) =>
      new Counter({ name: `sbx_uffd_server_${what}`, help, labelNames, registers: [registry], collect });
    // The first metric scraped folds every sandbox in, so the others read this scrape's totals.
    this.faults = counter('faults_total', 'Page faults served', [], () => {
      const list = sandboxes()?.list() ?? [];
      bySandboxState.reset();
      for (const s of list) {
        bySandboxState.inc({ state: s.state });
        this.fold(s);
      }
    });
    this.bytes = counter('served_bytes_total', 'Bytes installed with UFFDIO_COPY');
    this.prefetch = counter('prefetch_bytes_total', 'Bytes installed ahead of a fault');
    this.wp = counter('wp_faults_total', 'Synchronous write-protect faults');
    this.startFaults = counter(
      'start_faults_total',
      "Faults served while a sandbox's start was recorded (recorded prefetch makes them few)",
    );
    this.passPages = counter(
      'recorded_prefetch_pages_total',
      "4 KiB pages copied in by the recorded-prefetch pass (a build's memfile.prefetch)",
    );
    this.passLate = counter(
      'recorded_prefetch_late_total',
      'Recorded-prefetch entries a fault (or its window) installed before the pass reached them',
    );
    this.hits = counter(
      'prefetch_hits_total',
      'Prefetched pages (window or recorded) the guest then wrote; known with write-protect tracking only (reads are invisible)',
    );
    this.handshakeFailures = counter('handshake_failures_total', 'Handshakes refused, by problem', ['problem']);
    this.sandboxesEnded = counter(
      'sandboxes_ended_total',
      'Sandboxes whose serving ended on its own, by state (peer-gone, failed)',
      ['state'],
    ) as Counter<'state'>;
    this.latency = new FaultSeconds({ name: 'sbx_uffd_server_fault_seconds', help: 'fault', registers: [registry] });
    const bySandboxState = new Gauge({
      name: 'sbx_uffd_server_sandboxes',
      help: 'Sandboxes by state',
      labelNames: ['state'],
      registers: [registry],
    });
  }

  private fold(s: SandboxStats): void {
    const prev = this.seen.get(s.sandboxId) ?? {
      faults: 0,
      bytes: 0,
      prefetch: 0,
      wp: 0,
      startFaults: 0,
      passPages: 0,
      passLate: 0,
      hits: 0,
      latency: [],
    };
    const now: Seen = {
      faults: s.faults ?? 0,
      bytes: s.bytesServed ?? 0,
      prefetch: (s.prefetchPages4k ?? 0) * PAGE_4K,
      wp: s.wpFaults ?? 0,
      startFaults: s.recordedPrefetch?.startFaults ?? 0,
      passPages: s.recordedPrefetch?.passPages4k ?? 0,
      passLate: s.recordedPrefetch?.passAlreadyPresent ?? 0,
      hits: s.prefetchHits,
      latency: s.latencyCounts ?? [],
    };
    this.faults.inc(Math.max(0, now.faults - prev.faults));
    this.bytes.inc(Math.max(0, now.bytes - prev.bytes));
    this.prefetch.inc(Math.max(0, now.prefetch - prev.prefetch));
    this.wp.inc(Math.max(0, now.wp - prev.wp));
    this.startFaults.inc(Math.max(0, now.startFaults - prev.startFaults));
    this.passPages.inc(Math.max(0, now.passPages - prev.passPages));
    this.passLate.inc(Math.max(0, now.passLate - prev.passLate));
    this.hits.inc(Math.max(0, now.hits - prev.hits));
    (s.latencyBoundsUs ?? []).forEach((bound, i) => {
      const grown = Math.max(0, (now.latency[i] ?? 0) - (prev.latency[i] ?? 0));
      this.latency.perBound.set(bound, (this.latency.perBound.get(bound) ?? 0) + grown);
    });
    this.seen.set(s.sandboxId, now);
  }

  /** Counts what a sandbox did after the last scrape, before it is forgotten. */
  forget(s: SandboxStats): void {
    this.fold(s);
    // A sandbox resumed later under the same id starts counting from zero again.
    this.seen.delete(s.sandboxId);
  }
}
