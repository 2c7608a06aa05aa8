import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freeTcpPort, grpcServing, logLine, ServiceProcess } from '#test-kit';

/** A `./sbx dns serve` child process, as an operator or the orchestrator runs it, on its own temp dir. */
export interface DnsProcess {
  readonly service: ServiceProcess;
  readonly pid: number;
  readonly host: string;
  /** The UDP/TCP port it bound (it listens on port 0 and logs the port). */
  readonly port: number;
  readonly controlSocket: string;
  readonly metricsPort: number;
  readonly logs: string[];
  /** SIGTERM, then the exit code (SIGKILL after 10 s); removes the temp dir. */
  stop(): Promise<number | null>;
}

const SERVING = 'dns serving (udp+tcp)';

export async function startDnsProcess(host: string, extraArgs: string[] = []): Promise<DnsProcess> {
  const dir = mkdtempSync(join(tmpdir(), 'sbx-dns-test-'));
  const controlSocket = join(dir, 'dns.sock');
  const metricsPort = await freeTcpPort();
  const flags = ['--listen', `${host}:0`, '--control-socket', controlSocket, '--metrics-port', String(metricsPort)];
  const service = await ServiceProcess.start({
    args: ['dns', 'serve', ...flags, ...extraArgs],
    // Serving DNS (the port is in that log line) and its control socket.
    ready: async (proc, timeoutMs) => {
      await logLine((e) => e['msg'] === SERVING && Boolean(e['port']))(proc, timeoutMs);
      await grpcServing(controlSocket)(proc, timeoutMs);
    },
    readyTimeoutMs: 20_000,
  }).catch((err: unknown) => {
    rmSync(dir, { recursive: true, force: true });
    throw err;
  });
  return {
    service,
    pid: service.pid,
    host,
    port: Number(service.findLog((e) => e['msg'] === SERVING)!['port']),
    controlSocket,
    metricsPort,
    logs: service.logs,
    stop: async () => {
      const code = await service.stop();
      rmSync(dir, { recursive: true, force: true });
      return code;
    },
  };
}
