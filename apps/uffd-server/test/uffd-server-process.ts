import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { dial, unary, waitForServing } from '#grpc';
import { UffdServerClient, type UffdPrepareRequest, type UffdSandboxStats } from '#proto/sbx/uffd';

export const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));

/** A `./sbx uffd-server serve` child process, talked to only through its control socket. */
export class UffdServerProcess {
  readonly dir: string;
  readonly bucket: string;
  readonly cacheDir: string;
  readonly controlSocket: string;
  readonly logs: string[] = [];
  client!: UffdServerClient;
  child!: ChildProcess;
  private exited!: Promise<number | null>;

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'uffd-server-test-'));
    this.bucket = join(this.dir, 'bucket');
    this.cacheDir = join(this.dir, 'cache');
    mkdirSync(this.bucket);
    mkdirSync(this.cacheDir);
    this.controlSocket = join(this.dir, 'ctl.sock');
  }

  async start(extraArgs: string[] = []): Promise<this> {
    if (!existsSync(join(repoRoot, 'dist/apps/uffd-server/src/main.js')))
      throw new Error('dist/apps/uffd-server is not built: run bash scripts/build.sh first');
    this.child = spawn(
      join(repoRoot, 'sbx'),
      [
        'uffd-server',
        'serve',
        '--control-socket',
        this.controlSocket,
        '--bucket',
        this.bucket,
        '--cache-dir',
        this.cacheDir,
        '--metrics-port',
        '0',
        '--handshake-timeout-ms',
        '20000',
        ...extraArgs,
      ],
      { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let partial = '';
    this.child.stdout!.on('data', (chunk: Buffer) => {
      partial += chunk.toString();
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      this.logs.push(...lines);
    });
    this.child.stderr!.on('data', (chunk: Buffer) => this.logs.push(chunk.toString()));
    this.exited = new Promise((resolve) => this.child.once('exit', (code) => resolve(code)));
    try {
      await waitForServing(this.controlSocket, 20_000);
    } catch (err) {
      throw new Error(`${(err as Error).message}\n${this.logs.join('\n')}`, { cause: err });
    }
    this.client = dial(UffdServerClient, this.controlSocket);
    return this;
  }

  get pid(): number {
    return this.child.pid!;
  }

  prepare(req: Partial<UffdPrepareRequest> & { sandboxId: string; socketPath: string }) {
    return unary(this.client, this.client.prepare, {
      buildId: '',
      pageSize: 0,
      prefetchBytes: 0,
      memfilePath: '',
      ...req,
    });
  }

  stopSourcing(sandboxId: string) {
    return unary(this.client, this.client.stopSourcing, { sandboxId });
  }

  exportDiff(sandboxId: string, newBuildId: string, diffPath: string, memfilePath = '') {
    return unary(this.client, this.client.exportDiff, { sandboxId, newBuildId, diffPath, memfilePath }, 60_000);
  }

  stop(sandboxId: string) {
    return unary(this.client, this.client.stop, { sandboxId });
  }

  stats(sandboxId: string): Promise<UffdSandboxStats> {
    return unary(this.client, this.client.stats, { sandboxId });
  }

  list() {
    return unary(this.client, this.client.list, {});
  }

  /** Waits until the sandbox's state satisfies `pred` (states change as peers come and go). */
  async waitFor(
    sandboxId: string,
    pred: (s: UffdSandboxStats) => boolean,
    timeoutMs = 15_000,
  ): Promise<UffdSandboxStats> {
    const deadline = Date.now() + timeoutMs;
    let last: UffdSandboxStats | undefined;
    while (Date.now() < deadline) {
      last = await this.stats(sandboxId);
      if (pred(last)) return last;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`sandbox ${sandboxId} never reached the expected state; last: ${JSON.stringify(last)}`);
  }

  /** The server's open fds (their targets) and mappings of test files: what must not leak. */
  resources(): { fds: string[]; maps: string[] } {
    const fds = readdirSync(`/proc/${this.pid}/fd`)
      .map((fd) => {
        try {
          return readlinkSync(`/proc/${this.pid}/fd/${fd}`);
        } catch {
          return '';
        }
      })
      .filter((t) => t !== '')
      .sort();
    const maps = readFileSync(`/proc/${this.pid}/maps`, 'utf8')
      .split('\n')
      .filter((l) => l.includes(this.dir) || l.includes('memfd:') || l.includes('userfaultfd'));
    return { fds, maps };
  }

  async shutdown(): Promise<number | null> {
    this.client?.close();
    if (this.child && this.child.exitCode === null && this.child.signalCode === null) {
      this.child.kill('SIGTERM');
      const timer = setTimeout(() => this.child.kill('SIGKILL'), 10_000);
      const code = await this.exited;
      clearTimeout(timer);
      rmSync(this.dir, { recursive: true, force: true });
      return code;
    }
    rmSync(this.dir, { recursive: true, force: true });
    return this.child?.exitCode ?? null;
  }
}
