import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const repoRoot = fileURLToPath(new URL('../../..', import.meta.url));

/** A `./sbx dns serve` child process, as an operator or the orchestrator runs it. */
export interface DnsProcess {
  readonly child: ChildProcess;
  readonly pid: number;
  readonly host: string;
  readonly port: number;
  readonly controlSocket: string;
  readonly metricsPort: number;
  readonly logs: string[];
  /** SIGTERM, then the exit code (SIGKILL after 10 s); removes the temp dir. */
  stop(): Promise<number | null>;
}

export async function freeTcpPort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const address = server.address();
      const port = typeof address === 'object' && address ? address.port : 0;
      server.close(() => resolve(port));
    });
  });
}

export async function startDnsProcess(host: string, extraArgs: string[] = []): Promise<DnsProcess> {
  const launcher = join(repoRoot, 'sbx');
  if (!existsSync(join(repoRoot, 'dist/apps/dns/src/main.js'))) {
    throw new Error('dist/apps/dns is not built: run bash scripts/build.sh first');
  }
  const dir = mkdtempSync(join(tmpdir(), 'sbx-dns-test-'));
  const controlSocket = join(dir, 'dns.sock');
  const metricsPort = await freeTcpPort();
  const child = spawn(
    launcher,
    [
      'dns',
      'serve',
      '--listen',
      `${host}:0`,
      '--control-socket',
      controlSocket,
      '--metrics-port',
      String(metricsPort),
      ...extraArgs,
    ],
    { cwd: repoRoot, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  const logs: string[] = [];
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`dns did not start in 20 s:\n${logs.join('\n')}`)), 20_000);
    let partial = '';
    child.stdout!.on('data', (chunk: Buffer) => {
      partial += chunk.toString();
      const lines = partial.split('\n');
      partial = lines.pop() ?? '';
      for (const line of lines) {
        logs.push(line);
        try {
          const entry = JSON.parse(line) as { msg?: string; port?: number };
          if (entry.msg === 'dns serving (udp+tcp)' && entry.port) {
            clearTimeout(timer);
            resolve(entry.port);
          }
        } catch {
          // not JSON: keep it in the logs
        }
      }
    });
    child.stderr!.on('data', (chunk: Buffer) => logs.push(chunk.toString()));
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`dns exited with ${code} before serving:\n${logs.join('\n')}`));
    });
  }).catch((err: unknown) => {
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
    throw err;
  });
  let stopping: Promise<number | null> | undefined;
  return {
    child,
    pid: child.pid!,
    host,
    port,
    controlSocket,
    metricsPort,
    logs,
    stop() {
      stopping ??= (async () => {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
        const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
        const code = await exited;
        clearTimeout(timer);
        rmSync(dir, { recursive: true, force: true });
        return code;
      })();
      return stopping;
    },
  };
}
