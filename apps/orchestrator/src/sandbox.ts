import type { Logger } from '#logging';
import type { SnapshotBuild } from '#storage';
import type { SandboxConfig } from '#proto/orchestrator';
import type { BlockDevice } from '#proto/sbx/block';
import type { NetSlot } from '#proto/sbx/net';
import type { EnvdClient, EnvdMetrics } from './envd-client.js';
import { pollingRound } from './polling-round.js';
import type { SandboxPhase, SandboxStateFile } from './sandbox-state-store.js';
import { TeardownStack } from '#service-kit';
import type { VmmHandle } from './vmm-launcher.js';

/** One sandbox on this node: its resources (each on the teardown stack) and its times. */
export class Sandbox {
  readonly teardown = new TeardownStack();
  phase: SandboxPhase = 'creating';
  slot: NetSlot | undefined;
  device: BlockDevice | undefined;
  memorySocket: string | undefined;
  vmm: VmmHandle | undefined;
  dnsIp: string | undefined;
  /** envd answered /init (SandboxStateFile.envdInitialized). */
  envdInitialized = false;
  healthy = true;
  lastMetrics: EnvdMetrics | undefined;
  /** Takes it out of the node's polling rounds. */
  private pollers: (() => void)[] = [];

  readonly id: string;
  readonly config: SandboxConfig;
  /** What it was started from, or its last checkpoint: the parent of its next pause. */
  build: SnapshotBuild;
  /** A checkpoint is under way: it stays listed and running, but other changes wait. */
  checkpointing = false;
  readonly startTime: Date;
  endTime: Date;
  /** Its state file and VMM logs. */
  readonly dir: string;
  readonly log: Logger;

  constructor(o: {
    id: string;
    config: SandboxConfig;
    build: SnapshotBuild;
    startTime: Date;
    endTime: Date;
    dir: string;
    log: Logger;
  }) {
    this.id = o.id;
    this.config = o.config;
    this.build = o.build;
    this.startTime = o.startTime;
    this.endTime = o.endTime;
    this.dir = o.dir;
    this.log = o.log;
  }

  get hostIp(): string {
    return this.slot?.hostIp ?? '';
  }

  toState(): SandboxStateFile {
    return {
      sandboxId: this.id,
      phase: this.phase,
      config: this.config,
      buildId: this.build.buildId,
      startTime: this.startTime.toISOString(),
      endTime: this.endTime.toISOString(),
      ...(this.slot ? { slot: this.slot } : {}),
      ...(this.device ? { deviceOpened: true } : {}),
      ...(this.memorySocket ? { memorySocket: this.memorySocket } : {}),
      ...(this.vmm
        ? {
            vmm: {
              pid: this.vmm.pid,
              startTicks: this.vmm.startTicks,
              apiSocket: this.vmm.apiSocket,
              stdoutPath: `${this.dir}/vmm.stdout.log`,
              stderrPath: `${this.dir}/vmm.stderr.log`,
            },
          }
        : {}),
      ...(this.dnsIp ? { dnsIp: this.dnsIp } : {}),
      ...(this.envdInitialized ? { envdInitialized: true } : {}),
    };
  }

  /**
   * envd health (GET /health → 204) and metrics (GET /metrics) polling, like the seed's
   * checks.go, in the node's shared rounds (polling-round.ts) rather than timers of its own.
   * A metrics answer shows envd alive as well as a health answer does, so a health request is
   * sent only when no metrics answer came within the health interval: at 100 sandboxes that is
   * 5 requests a second fewer (each a new connection to a guest), with the same verdicts.
   */
  startPolling(envd: EnvdClient, healthMs: number, metricsMs: number): void {
    this.stopPolling();
    const hostIp = this.hostIp;
    let answeredAt = -Infinity;
    if (healthMs > 0) {
      this.pollers.push(
        pollingRound(healthMs).add(() => {
          if (performance.now() - answeredAt < healthMs) return Promise.resolve();
          return envd.health(hostIp).then((ok) => this.setHealthy(ok));
        }),
      );
    }
    if (metricsMs > 0) {
      this.pollers.push(
        pollingRound(metricsMs).add(() =>
          envd.metrics(hostIp).then((m) => {
            if (!m) return;
            answeredAt = performance.now();
            this.setHealthy(true);
            this.lastMetrics = m;
            this.log.debug({ metrics: m }, 'sandbox metrics');
          }),
        ),
      );
    }
  }

  private setHealthy(ok: boolean): void {
    if (ok !== this.healthy) this.log[ok ? 'info' : 'warn']({ healthy: ok }, 'sandbox health changed');
    this.healthy = ok;
  }

  stopPolling(): void {
    for (const leave of this.pollers) leave();
    this.pollers = [];
  }
}
