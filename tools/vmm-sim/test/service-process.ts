import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from './vmm-sim-process.js';

/** A peer service (`./sbx uffd-server ...`, `./sbx block-server ...`) started for a test. */
export class ServiceProcess {
  readonly output: string[] = [];
  exitCode: number | null | undefined = undefined;
  readonly exited: Promise<number | null>;

  private constructor(readonly child: ChildProcess) {
    child.stdout?.on('data', (c: Buffer) => this.output.push(c.toString()));
    child.stderr?.on('data', (c: Buffer) => this.output.push(c.toString()));
    this.exited = new Promise((res) =>
      child.on('exit', (code, signal) => res((this.exitCode = code ?? (signal ? -1 : null)))),
    );
  }

  /** Starts `./sbx <args>` and waits for `socketPath` to exist. */
  static async start(args: string[], socketPath: string): Promise<ServiceProcess> {
    const child = spawn(join(repoRoot, 'sbx'), args, { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] });
    const proc = new ServiceProcess(child);
    const deadline = Date.now() + 20_000;
    while (!existsSync(socketPath)) {
      if (proc.exitCode !== undefined) throw new Error(`${args.join(' ')} exited at start:\n${proc.output.join('')}`);
      if (Date.now() > deadline) {
        child.kill('SIGKILL');
        throw new Error(`${args[0]} did not open ${socketPath}:\n${proc.output.join('')}`);
      }
      await new Promise((r) => setTimeout(r, 50));
    }
    return proc;
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  /** Signals the service; one still running 10 s after a SIGTERM is killed. */
  async stop(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    if (this.exitCode !== undefined) return this.exited;
    this.child.kill(signal);
    const timer = signal === 'SIGKILL' ? undefined : setTimeout(() => this.child.kill('SIGKILL'), 10_000);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }
}

/** What a process holds: its open fds (by target) and its mappings (by path/kind). */
export interface Holdings {
  fds: string[];
  maps: string[];
}

export function holdings(pid: number): Holdings {
  const fds: string[] = [];
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      fds.push(readlinkSync(`/proc/${pid}/fd/${fd}`).replace(/\[\d+\]$/, '[*]'));
    } catch {
      // closed while listing
    }
  }
  // Anonymous mappings come and go with V8's heap; what a peer may leak are file, memfd and
  // shared mappings, and big anonymous regions the size of guest memory.
  const maps = readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((l) => l.trim() !== '')
    .map((l) => {
      const [range = '', perms = '', , , , ...rest] = l.split(/\s+/);
      const [start = '0', end = '0'] = range.split('-');
      const size = Number(BigInt('0x' + end) - BigInt('0x' + start));
      return { perms, path: rest.join(' '), size };
    })
    .filter(
      (m) =>
        m.path.includes('memfd') || m.perms.endsWith('s') || m.path.startsWith('/tmp') || m.path.includes('vmm-sim'),
    )
    .map((m) => `${m.perms} ${m.path} ${m.size}`);
  return { fds: fds.sort(), maps: maps.sort() };
}
