import { spawn, type ChildProcess } from 'node:child_process';

export interface PeerProcessOptions {
  name: string;
  binary: string;
  args: string[];
  env?: NodeJS.ProcessEnv;
  cwd?: string;
  /** Run inside this network namespace (`/run/netns/<name>`, through nsenter). */
  netns?: string;
}

/**
 * One running test peer (consul, nomad, fake-gcs-server): its output kept for failure messages,
 * stopped with SIGTERM (SIGKILL after `graceMs`) and waited for, so nothing outlives the test.
 */
export class PeerProcess {
  readonly logs: string[] = [];
  readonly child: ChildProcess;
  readonly exited: Promise<number | null>;
  private exitCode: number | null | undefined;

  constructor(readonly options: PeerProcessOptions) {
    const [file, args] = options.netns
      ? ['nsenter', [`--net=/run/netns/${options.netns}`, '--', options.binary, ...options.args]]
      : [options.binary, options.args];
    this.child = spawn(file, args, {
      env: options.env ?? process.env,
      cwd: options.cwd,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    for (const stream of [this.child.stdout, this.child.stderr]) {
      let partial = '';
      stream?.setEncoding('utf8');
      stream?.on('data', (chunk: string) => {
        const lines = (partial + chunk).split('\n');
        partial = lines.pop() ?? '';
        this.logs.push(...lines);
        if (this.logs.length > 2000) this.logs.splice(0, this.logs.length - 2000);
      });
    }
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitCode = code ?? (signal ? null : 0);
        resolve(this.exitCode);
      });
      this.child.once('error', (err) => {
        this.logs.push(`spawn failed: ${err.message}`);
        this.exitCode = null;
        resolve(null);
      });
    });
  }

  get running(): boolean {
    return this.exitCode === undefined;
  }

  /** Calls `check` until it gives true; fails early, with the peer's last output, if the peer exits. */
  async waitUntil(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      if (!this.running)
        throw new Error(`${this.options.name} exited (${this.exitCode}) before ${what}:\n${this.tail()}`);
      if (await check().catch(() => false)) return;
      if (Date.now() > deadline)
        throw new Error(`${this.options.name}: ${what} not reached in ${timeoutMs} ms:\n${this.tail()}`);
      await new Promise((r) => setTimeout(r, 100));
    }
  }

  tail(lines = 40): string {
    return this.logs.slice(-lines).join('\n');
  }

  async stop(graceMs = 10_000): Promise<number | null> {
    if (this.running) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), graceMs);
      await this.exited;
      clearTimeout(timer);
    }
    return this.exited;
  }
}
