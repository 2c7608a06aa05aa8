import { status, type ServiceError } from '@grpc/grpc-js';
import { unary } from '#grpc';
import type { Logger } from '#logging';
import type { BlockServerClient } from '#proto/sbx/block';
import type { UffdServerClient } from '#proto/sbx/uffd';
import type { Placement } from './instance-placement.js';

/**
 * Noticing that a uffd-server or block-server instance lost a running sandbox's state, so the
 * sandbox is failed cleanly instead of left half-alive (README "Service restarts").
 *
 * - uffd-server: the VMM keeps its userfaultfd, and a restarted instance takes it back and
 *   lists the sandbox again (a fault waits meanwhile). An unreachable instance is waited for
 *   `memoryDownGraceMs`, then its sandboxes are failed (nobody may ever serve their faults); one
 *   that answers without the sandbox (not taken back) has lost it. `failed` is just as final.
 * - block-server keeps devices on disk and reopens them on restart, and the VMM's drive
 *   reconnects to the device socket: an unreachable instance is waited for. Only an instance
 *   that answers without the sandbox's device has lost it.
 */

/** What one instance reported, or that it could not be asked. */
export type InstanceView =
  | { reachable: true; sandboxes: Map<string, string> }
  | { reachable: false; error: string }
  /** Slow or some other error: nothing is concluded this round. */
  | { reachable: 'unknown'; error: string };

export interface LostSandbox {
  sandboxId: string;
  service: 'uffd-server' | 'block-server';
  reason: string;
}

export interface ServiceSurvey {
  memory: InstanceView[];
  devices: InstanceView[];
  memoryInstanceOf(sandboxId: string): number | undefined;
  deviceInstanceOf(sandboxId: string): number | undefined;
}

/**
 * The running sandboxes (taken before the survey, so each was prepared on its instances before
 * they were asked) whose memory or device is gone. Pure: the rules above, nothing else.
 */
export function lostSandboxes(running: string[], survey: ServiceSurvey): LostSandbox[] {
  const lost: LostSandbox[] = [];
  for (const id of running) {
    const m = survey.memoryInstanceOf(id);
    const mem = m === undefined ? undefined : survey.memory[m];
    if (mem?.reachable === false) {
      lost.push({ sandboxId: id, service: 'uffd-server', reason: `uffd-server #${m} unreachable (${mem.error})` });
      continue;
    }
    if (mem?.reachable === true) {
      const state = mem.sandboxes.get(id);
      if (state === undefined) {
        lost.push({
          sandboxId: id,
          service: 'uffd-server',
          reason: `uffd-server #${m} no longer serves it (restarted)`,
        });
        continue;
      }
      if (state === 'failed') {
        lost.push({ sandboxId: id, service: 'uffd-server', reason: `uffd-server #${m} failed serving it` });
        continue;
      }
    }
    const d = survey.deviceInstanceOf(id);
    const dev = d === undefined ? undefined : survey.devices[d];
    if (dev?.reachable === true && !dev.sandboxes.has(id)) {
      lost.push({ sandboxId: id, service: 'block-server', reason: `block-server #${d} no longer has its device` });
    }
  }
  return lost;
}

function viewOf(err: unknown): InstanceView {
  const e = err as Partial<ServiceError>;
  const error = e.details || (err as Error).message;
  return e.code === status.UNAVAILABLE ? { reachable: false, error } : { reachable: 'unknown', error };
}

/** Asks every uffd-server and block-server instance for its List, side by side. */
export async function surveyInstances(
  uffd: Placement<UffdServerClient>,
  block: Placement<BlockServerClient>,
  timeoutMs: number,
): Promise<ServiceSurvey> {
  const [memory, devices] = await Promise.all([
    Promise.all(
      uffd.clients.map((c) =>
        unary(c, c.list, {}, timeoutMs).then(
          (r): InstanceView => ({
            reachable: true,
            sandboxes: new Map(r.sandboxes.map((s) => [s.sandboxId, s.state])),
          }),
          viewOf,
        ),
      ),
    ),
    Promise.all(
      block.clients.map((c) =>
        unary(c, c.list, {}, timeoutMs).then(
          (r): InstanceView => ({ reachable: true, sandboxes: new Map(r.devices.map((d) => [d.sandboxId, ''])) }),
          viewOf,
        ),
      ),
    ),
  ]);
  return {
    memory,
    devices,
    memoryInstanceOf: (id) => uffd.indexOf(id),
    deviceInstanceOf: (id) => block.indexOf(id),
  };
}

export interface ServiceLossWatchOptions {
  intervalMs: number;
  /** Ids of the sandboxes in phase `running` right now. */
  running(): string[];
  survey(): Promise<ServiceSurvey>;
  /** Fails the sandbox (full cleanup, `failed` event); a no-op if it is no longer running. */
  fail(lost: LostSandbox): Promise<void>;
  logger: Logger;
  /** How long an unreachable uffd-server instance is waited for (a restart) before its sandboxes are failed. */
  memoryDownGraceMs?: number;
}

/** A supervisor or Nomad restarts a killed uffd-server within seconds. */
const MEMORY_DOWN_GRACE_MS = 10_000;

/** Surveys the instances every `intervalMs` (one round at a time) and fails what was lost. */
export class ServiceLossWatch {
  private timer: NodeJS.Timeout | undefined;
  private round: Promise<unknown> | undefined;
  /** When each uffd-server instance was first seen unreachable (since its last answer). */
  private readonly memoryDownSince = new Map<number, number>();

  constructor(private readonly o: ServiceLossWatchOptions) {}

  start(): void {
    if (this.o.intervalMs <= 0) return;
    this.timer = setInterval(() => {
      this.round ??= this.check().finally(() => (this.round = undefined));
    }, this.o.intervalMs);
    this.timer.unref();
  }

  async check(): Promise<LostSandbox[]> {
    const running = this.o.running();
    if (running.length === 0) return [];
    let lost: LostSandbox[];
    try {
      lost = lostSandboxes(running, this.withinGrace(await this.o.survey()));
    } catch (err) {
      this.o.logger.warn({ err: (err as Error).message }, 'service survey failed');
      return [];
    }
    await Promise.all(lost.map((l) => this.o.fail(l)));
    return lost;
  }

  /** An instance unreachable for less than the grace is treated as not known this round. */
  private withinGrace(survey: ServiceSurvey): ServiceSurvey {
    const grace = this.o.memoryDownGraceMs ?? MEMORY_DOWN_GRACE_MS;
    const now = Date.now();
    const memory = survey.memory.map((view, i): InstanceView => {
      if (view.reachable !== false) {
        if (view.reachable === true) this.memoryDownSince.delete(i);
        return view;
      }
      const since = this.memoryDownSince.get(i) ?? now;
      this.memoryDownSince.set(i, since);
      return now - since >= grace ? view : { reachable: 'unknown', error: view.error };
    });
    return { ...survey, memory };
  }

  async stop(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    this.timer = undefined;
    await this.round;
  }
}
