import { spawn, type ChildProcess } from 'node:child_process';
import type { Readiness } from './readiness.js';
import { repoRoot, requireBuilt, sbx } from './repo-root.js';
import { startedProcesses, type StartedProcess } from './started-processes.js';

export interface ServiceStart {
  /** `./sbx` arguments: the service command first (`uffd-server serve --control-socket …`). */
  args: string[];
  /** The name in errors and failure logs (default: the command). */
  name?: string;
  /** A command ./sbx runs under, e.g. `nsenter --net=/run/netns/<node>`. */
  wrapper?: string[];
  /** Runs this instead of ./sbx (a test's own fixture program); skips the dist/ build check. */
  launcher?: string[];
  env?: Record<string, string>;
  /** Resolves when the service is ready; without it, start() returns once the process is spawned. */
  ready?: Readiness;
  /** Bound on `ready` (default 30 s). */
  readyTimeoutMs?: number;
  /** How long stop() waits after SIGTERM before SIGKILL (default 10 s). */
  stopTimeoutMs?: number;
  /** Own process group: stop()'s SIGKILL then reaches whatever the service left running. */
  detached?: boolean;
}

/** Lines kept per process: enough for a failure report, bounded for long soak runs. */
const MAX_LINES = 4000;

/**
 * A service as a child process, started through the launcher the product uses (`./sbx <service>`)
 * and reached by tests only through its sockets. Logs are kept as lines (stdout and stderr), shown
 * in the error of a failed start and, by logs-on-failure.ts, after a failed test.
 */
export class ServiceProcess implements StartedProcess {
  readonly logs: string[] = [];
  readonly name: string;
  /** Resolves to the exit code, or null when a signal ended it. */
  readonly exited: Promise<number | null>;
  endedAt: number | undefined;
  private stopping: Promise<number | null> | undefined;

  private constructor(
    readonly child: ChildProcess,
    private readonly how: ServiceStart,
  ) {
    this.name = how.name ?? how.args[0] ?? 'service';
    if (child.stdout) this.capture(child.stdout);
    if (child.stderr) this.capture(child.stderr);
    this.exited = new Promise((resolve) =>
      child.once('exit', (code) => {
        this.endedAt = Date.now();
        resolve(code);
      }),
    );
  }

  /** Spawns the service and waits for `ready`; on failure the process is killed and the error carries its logs. */
  static async start(how: ServiceStart): Promise<ServiceProcess> {
    if (!how.launcher) requireBuilt(how.args[0] ?? '');
    const argv = [...(how.wrapper ?? []), ...(how.launcher ?? [sbx]), ...how.args];
    const child = spawn(argv[0]!, argv.slice(1), {
      cwd: repoRoot,
      env: { ...process.env, ...how.env },
      stdio: ['ignore', 'pipe', 'pipe'],
      detached: how.detached ?? false,
    });
    const proc = new ServiceProcess(child, how);
    startedProcesses.add(proc);
    if (!how.ready) return proc;
    const timeoutMs = how.readyTimeoutMs ?? 30_000;
    try {
      await Promise.race([
        how.ready(proc, timeoutMs),
        proc.exited.then((code) => {
          throw new Error(`exited ${code} while starting`);
        }),
      ]);
    } catch (err) {
      await proc.kill();
      throw new Error(
        `${proc.name} did not become ready: ${(err as Error).message}\n${proc.logs.slice(-60).join('\n')}`,
        {
          cause: err,
        },
      );
    }
    return proc;
  }

  /** The same service started again with the same arguments (after a crash or a stop). */
  restart(): Promise<ServiceProcess> {
    return ServiceProcess.start(this.how);
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }

  /** The first JSON log entry `match` accepts. */
  findLog(match: (entry: Record<string, unknown>) => boolean): Record<string, unknown> | undefined {
    for (const line of this.logs) {
      if (!line.startsWith('{')) continue;
      try {
        const entry = JSON.parse(line) as Record<string, unknown>;
        if (match(entry)) return entry;
      } catch {
        // a line that only looks like JSON
      }
    }
    return undefined;
  }

  /**
   * Sends `signal` (SIGTERM: the service cleans up and exits) and resolves to the exit code;
   * a service still running `stopTimeoutMs` later is killed, with its process group if detached.
   */
  stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (!this.running) return this.exited;
    if (this.stopping && signal !== 'SIGKILL') return this.stopping;
    this.child.kill(signal);
    if (signal === 'SIGKILL') this.killGroup();
    const timer =
      signal === 'SIGKILL' ? undefined : setTimeout(() => this.killGroup(), this.how.stopTimeoutMs ?? 10_000);
    this.stopping = this.exited.finally(() => clearTimeout(timer));
    return this.stopping;
  }

  /** A crash: SIGKILL, nothing is cleaned up by the service. */
  kill(): Promise<number | null> {
    return this.stop('SIGKILL');
  }

  private killGroup(): void {
    try {
      if (this.how.detached) process.kill(-this.pid, 'SIGKILL');
      else this.child.kill('SIGKILL');
    } catch {
      // already gone
    }
  }

  /** Whole lines only: a chunk may end in the middle of one. */
  private capture(stream: NodeJS.ReadableStream): void {
    let partial = '';
    stream.on('data', (chunk: Buffer) => {
      const lines = (partial + chunk.toString()).split('\n');
      partial = lines.pop() ?? '';
      this.logs.push(...lines.filter((l) => l !== ''));
      if (this.logs.length > MAX_LINES) this.logs.splice(0, this.logs.length - MAX_LINES / 2);
    });
    stream.on('end', () => partial && this.logs.push(partial));
  }
}
