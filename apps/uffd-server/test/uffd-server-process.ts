import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { dial, unary } from '#grpc';
import { UffdServerClient, type UffdPrepareRequest, type UffdSandboxStats } from '#proto/sbx/uffd';
import { eventually, grpcServing, mappings, openFds, ServiceProcess } from '#test-kit';

/** A `./sbx uffd-server serve` child process with its own bucket and cache, talked to only through its control socket. */
export class UffdServerProcess {
  readonly dir: string;
  readonly bucket: string;
  readonly cacheDir: string;
  readonly controlSocket: string;
  client!: UffdServerClient;
  service: ServiceProcess | undefined;

  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), 'uffd-server-test-'));
    this.bucket = join(this.dir, 'bucket');
    this.cacheDir = join(this.dir, 'cache');
    mkdirSync(this.bucket);
    mkdirSync(this.cacheDir);
    this.controlSocket = join(this.dir, 'ctl.sock');
  }

  async start(extraArgs: string[] = []): Promise<this> {
    this.service = await ServiceProcess.start({
      args: [
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
      ready: grpcServing(this.controlSocket),
    });
    this.client = dial(UffdServerClient, this.controlSocket);
    return this;
  }

  get pid(): number {
    return this.service?.pid ?? -1;
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

  exportDiff(sandboxId: string, newBuildId: string, diffPath: string, memfilePath = '', vmmDirtyLog = false) {
    return unary(
      this.client,
      this.client.exportDiff,
      { sandboxId, newBuildId, diffPath, memfilePath, vmmDirtyLog, keepServing: false, dedup: false, prefetchPath: '' },
      60_000,
    );
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
  waitFor(sandboxId: string, pred: (s: UffdSandboxStats) => boolean, timeoutMs = 15_000): Promise<UffdSandboxStats> {
    return eventually(
      async () => {
        const stats = await this.stats(sandboxId);
        if (pred(stats)) return stats;
        throw new Error(`sandbox ${sandboxId} never reached the expected state; last: ${JSON.stringify(stats)}`);
      },
      { timeoutMs },
    );
  }

  /** The server's open fds (their targets) and mappings of test files: what must not leak. */
  resources(): { fds: string[]; maps: string[] } {
    const maps = mappings(this.pid)
      .map((m) => m.line)
      .filter((l) => l.includes(this.dir) || l.includes('memfd:') || l.includes('userfaultfd'));
    return { fds: openFds(this.pid), maps };
  }

  /** SIGTERM (SIGKILL after 10 s), the exit code; removes the temp dir. */
  async shutdown(): Promise<number | null> {
    this.client?.close();
    const code = (await this.service?.stop()) ?? null;
    rmSync(this.dir, { recursive: true, force: true });
    return code;
  }
}
