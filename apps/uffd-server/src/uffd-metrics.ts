import { Counter, Gauge, type Registry } from 'prom-client';
import type { SandboxRegistry } from './sandbox-registry.js';
import type { SandboxStats } from './sandbox-memory.js';

/**
 * Prometheus metrics of uffd-server. Fault counters live in the native engines; they are read
 * at scrape time (per-sandbox deltas folded into process-wide counters, so stopped sandboxes
 * still count).
 */
export class UffdMetrics {
  readonly handshakeFailures: Counter<'problem'>;
  readonly sandboxesEnded: Counter<'state'>;
  private readonly seen = new Map<string, { faults: number; bytes: number; prefetch: number; wp: number }>();
  private readonly counters: { faults: Counter; bytes: Counter; prefetch: Counter; wp: Counter };

  constructor(registry: Registry, sandboxes: () => SandboxRegistry | undefined) {
    this.handshakeFailures = new Counter({
      name: 'uffd_handshake_failures_total',
      help: 'Handshakes refused, by problem',
      labelNames: ['problem'],
      registers: [registry],
    });
    this.sandboxesEnded = new Counter({
      name: 'uffd_sandboxes_ended_total',
      help: 'Sandboxes whose serving ended on its own, by state (peer-gone, failed)',
      labelNames: ['state'],
      registers: [registry],
    });
    const faults = new Counter({ name: 'uffd_faults_total', help: 'Page faults served', registers: [registry] });
    const bytes = new Counter({
      name: 'uffd_bytes_served_total',
      help: 'Bytes installed with UFFDIO_COPY',
      registers: [registry],
    });
    const prefetch = new Counter({
      name: 'uffd_prefetch_pages_total',
      help: '4 KiB units installed ahead of a fault',
      registers: [registry],
    });
    const wp = new Counter({
      name: 'uffd_wp_faults_total',
      help: 'Synchronous write-protect faults',
      registers: [registry],
    });
    this.counters = { faults, bytes, prefetch, wp };
    const latency = new Gauge({
      name: 'uffd_fault_latency_us_bucket',
      help: 'Fault service time, cumulative counts per upper bound in microseconds (live sandboxes)',
      labelNames: ['le'],
      registers: [registry],
    });
    const bySandboxState = new Gauge({
      name: 'uffd_sandboxes',
      help: 'Sandboxes by state',
      labelNames: ['state'],
      registers: [registry],
      collect: () => {
        const list = sandboxes()?.list() ?? [];
        bySandboxState.reset();
        latency.reset();
        const cumulative = new Map<string, number>();
        for (const s of list) {
          bySandboxState.inc({ state: s.state });
          this.fold(s);
          let running = 0;
          (s.latencyBoundsUs ?? []).forEach((bound, i) => {
            running += s.latencyCounts?.[i] ?? 0;
            const le = bound >= Number.MAX_SAFE_INTEGER ? '+Inf' : String(bound);
            cumulative.set(le, (cumulative.get(le) ?? 0) + running);
          });
        }
        for (const [le, v] of cumulative) latency.set({ le }, v);
      },
    });
  }

  private fold(s: SandboxStats): void {
    const { faults, bytes, prefetch, wp } = this.counters;
    const prev = this.seen.get(s.sandboxId) ?? { faults: 0, bytes: 0, prefetch: 0, wp: 0 };
    const now = {
      faults: s.faults ?? 0,
      bytes: s.bytesServed ?? 0,
      prefetch: s.prefetchPages4k ?? 0,
      wp: s.wpFaults ?? 0,
    };
    faults.inc(Math.max(0, now.faults - prev.faults));
    bytes.inc(Math.max(0, now.bytes - prev.bytes));
    prefetch.inc(Math.max(0, now.prefetch - prev.prefetch));
    wp.inc(Math.max(0, now.wp - prev.wp));
    this.seen.set(s.sandboxId, now);
  }

  /** Counts what a sandbox did after the last scrape, before it is forgotten. */
  forget(s: SandboxStats): void {
    this.fold(s);
    // A sandbox resumed later under the same id starts counting from zero again.
    this.seen.delete(s.sandboxId);
  }
}
