import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, mkdirSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { waitForServing } from '#grpc';
import type { Logger } from '#logging';
import type { ServiceSpec } from './service-plan.js';

export type ServiceState = 'pending' | 'starting' | 'serving' | 'backoff' | 'stopping' | 'stopped' | 'failed';

export interface ServiceStatus {
  name: string;
  state: ServiceState;
  pid: number | undefined;
  restarts: number;
  lastExit: string | undefined;
  healthTarget: string;
}

export interface SupervisorOptions {
  specs: ServiceSpec[];
  /** The command that runs a service: [node, sbx main.js]; the spec's name and args follow. */
  launcher: string[];
  logDir: string;
  logger: Logger;
  healthTimeoutMs?: number;
  /** Longest wait between restarts of a crashing service. */
  maxBackoffMs?: number;
  /** How long a service gets between SIGTERM and SIGKILL. */
  stopGraceMs?: number;
}

interface Supervised {
  spec: ServiceSpec;
  status: ServiceStatus;
  child: ChildProcess | undefined;
  backoffMs: number;
  servingSince: number;
  restartTimer: NodeJS.Timeout | undefined;
  exited: Promise<void> | undefined;
}

/**
 * Runs the node's services as child processes (local mode, DESIGN.md §7): starts them in
 * dependency order, waits on each one's gRPC health, restarts a crashed one with
 * exponential backoff, and stops them in reverse order.
 */
export class Supervisor {
  private readonly services: Supervised[];
  private stopping = false;
  /** The service start() is bringing up: its exit fails the start instead of being restarted. */
  private startingService: Supervised | undefined;

  constructor(private readonly options: SupervisorOptions) {
    this.services = orderByDependencies(options.specs).map((spec) => ({
      spec,
      status: {
        name: spec.name,
        state: 'pending',
        pid: undefined,
        restarts: 0,
        lastExit: undefined,
        healthTarget: spec.healthTarget,
      },
      child: undefined,
      backoffMs: 500,
      servingSince: 0,
      restartTimer: undefined,
      exited: undefined,
    }));
    mkdirSync(options.logDir, { recursive: true });
  }

  /** Starts every service in order; rejects (after stopping what started) if one never gets healthy. */
  async start(): Promise<void> {
    for (const service of this.services) {
      this.startingService = service;
      try {
        await this.launch(service);
      } catch (err) {
        service.status.state = 'failed';
        await this.stop();
        throw err;
      } finally {
        this.startingService = undefined;
      }
    }
  }

  status(): ServiceStatus[] {
    return this.services.map((s) => ({ ...s.status }));
  }

  async stop(): Promise<void> {
    this.stopping = true;
    for (const service of [...this.services].reverse()) {
      if (service.restartTimer) clearTimeout(service.restartTimer);
      const child = service.child;
      if (!child || child.exitCode !== null || child.signalCode !== null) {
        service.status.state = 'stopped';
        continue;
      }
      service.status.state = 'stopping';
      child.kill('SIGTERM');
      const killTimer = setTimeout(() => child.kill('SIGKILL'), this.options.stopGraceMs ?? 10_000);
      await service.exited;
      clearTimeout(killTimer);
      service.status.state = 'stopped';
    }
  }

  private async launch(service: Supervised): Promise<void> {
    const { spec } = service;
    const [command, ...launcherArgs] = this.options.launcher;
    if (!command) throw new Error('supervisor: empty launcher');
    const logPath = join(this.options.logDir, `${spec.name}.log`);
    const logFd = openSync(logPath, 'a');
    service.status.state = 'starting';
    const child = spawn(command, [...launcherArgs, spec.name, ...spec.args], {
      stdio: ['ignore', logFd, logFd],
      env: { ...process.env, ...spec.env },
      // A process group of its own: a terminal's Ctrl-C signals the whole foreground group, and
      // a service signalled at the same moment as the supervisor would take the supervisor's
      // SIGTERM for an impatient second signal and exit without removing what it made. Only
      // the supervisor stops services, in reverse dependency order.
      detached: true,
    });
    closeSync(logFd);
    service.child = child;
    service.status.pid = child.pid;
    service.exited = new Promise((resolve) => child.once('exit', () => resolve()));
    child.once('exit', (code, signal) => this.onExit(service, code, signal));
    this.options.logger.info({ unit: spec.name, pid: child.pid, log: logPath }, 'service started');

    await Promise.race([
      waitForServing(spec.healthTarget, this.options.healthTimeoutMs ?? 30_000),
      service.exited.then(() => {
        throw new Error(`${spec.name} exited before serving (${service.status.lastExit}); see ${logPath}`);
      }),
    ]);
    service.status.state = 'serving';
    service.servingSince = Date.now();
    this.options.logger.info({ unit: spec.name, pid: child.pid }, 'service serving');
  }

  private onExit(service: Supervised, code: number | null, signal: NodeJS.Signals | null): void {
    service.status.lastExit = signal ? `signal ${signal}` : `exit ${code}`;
    service.status.pid = undefined;
    // A restart that dies before serving is restarted again, with a longer wait.
    if (this.stopping || this.startingService === service) return;
    // A service that stayed up a minute earns a fresh backoff; a flapping one waits longer each time.
    if (Date.now() - service.servingSince > 60_000) service.backoffMs = 500;
    const delay = service.backoffMs;
    service.backoffMs = Math.min(service.backoffMs * 2, this.options.maxBackoffMs ?? 30_000);
    service.status.state = 'backoff';
    this.options.logger.warn(
      { unit: service.spec.name, exit: service.status.lastExit, restartInMs: delay },
      'service exited; restarting',
    );
    service.restartTimer = setTimeout(() => {
      service.restartTimer = undefined;
      if (this.stopping) return;
      service.status.restarts++;
      this.launch(service).catch((err: unknown) => {
        this.options.logger.error({ unit: service.spec.name, err }, 'restart failed');
      });
    }, delay);
  }
}

function orderByDependencies(specs: ServiceSpec[]): ServiceSpec[] {
  const byName = new Map(specs.map((s) => [s.name, s]));
  const ordered: ServiceSpec[] = [];
  const visiting = new Set<string>();
  const visit = (spec: ServiceSpec) => {
    if (ordered.includes(spec)) return;
    if (visiting.has(spec.name)) throw new Error(`supervisor: dependency cycle through ${spec.name}`);
    visiting.add(spec.name);
    for (const dep of spec.dependsOn) {
      const target = byName.get(dep);
      if (!target) throw new Error(`supervisor: ${spec.name} depends on unknown service ${dep}`);
      visit(target);
    }
    visiting.delete(spec.name);
    ordered.push(spec);
  };
  specs.forEach(visit);
  return ordered;
}
