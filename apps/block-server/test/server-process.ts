import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { createConnection } from 'node:net';
import { join, resolve } from 'node:path';

export const repoRoot = resolve(import.meta.dirname, '../../..');

/** The real service process, started through the launcher as operators do. */
export class ServerProcess {
  readonly output: string[] = [];
  readonly exited: Promise<number | null>;
  private constructor(readonly child: ChildProcess) {
    child.stdout?.on('data', (d: Buffer) => this.output.push(d.toString()));
    child.stderr?.on('data', (d: Buffer) => this.output.push(d.toString()));
    this.exited = new Promise((res) => child.once('exit', (code) => res(code)));
  }

  static start(args: string[], env: NodeJS.ProcessEnv = {}): ServerProcess {
    if (!existsSync(join(repoRoot, 'dist/apps/block-server/src/main.js'))) {
      throw new Error('block-server is not built: run bash scripts/build.sh');
    }
    const child = spawn(join(repoRoot, 'sbx'), ['block-server', ...args], {
      cwd: repoRoot,
      env: { ...process.env, ...env },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    return new ServerProcess(child);
  }

  get pid(): number {
    return this.child.pid!;
  }

  async openFds(): Promise<string[]> {
    return (await readdir(`/proc/${this.pid}/fd`)).sort();
  }

  /**
   * Waits until something accepts connections on the Unix socket `path` (a stale socket file
   * of a killed run does not count); fails with the process output if it exits first.
   */
  async waitForListening(path: string, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!(existsSync(path) && (await accepts(path)))) {
      if (this.child.exitCode !== null)
        throw new Error(`block-server exited ${this.child.exitCode}: ${this.output.join('')}`);
      if (Date.now() > deadline) throw new Error(`${path} not listening: ${this.output.join('')}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill(signal);
    return this.exited;
  }
}

function accepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createConnection(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
}
