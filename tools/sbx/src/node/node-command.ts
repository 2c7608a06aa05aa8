import { mkdir } from 'node:fs/promises';
import { isIP } from 'node:net';
import { resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { createLogger } from '#logging';
import { defaultDataDir, repoRoot, writeNodeRecord } from '../cli/node-target.js';
import { localLayout, localServicePlan } from './service-plan.js';
import { Supervisor, type ServiceStatus } from './supervisor.js';

const usage = `usage: ./sbx node up [--data-dir <dir>] [--grpc-host <addr>] [--grpc-port <port>] [--demo]

Starts the six services of a local node (dns, net-agent, block-server, uffd-server,
orchestrator, proxy on :5007) in dependency order, waits on their health, restarts a crashed one with
backoff, and stops them all on Ctrl-C or SIGTERM.
  --data-dir   where the node keeps its bucket, caches, sockets and logs (default: $SBX_DATA_DIR or .sbx/node in the checkout)
  --grpc-host  the address the SandboxService listens on (default 127.0.0.1: it has no
               authentication; 0.0.0.0 lets every machine that reaches this one drive the node)
  --grpc-port  the orchestrator's SandboxService port (default 5008)
  --demo       once serving, create a sandbox, pause it and resume it, printing each step's time`;

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (sub !== 'up') {
    console.log(usage);
    return sub === '--help' || sub === '-h' ? 0 : 2;
  }
  const { values } = parseArgs({
    args: rest,
    options: {
      'data-dir': { type: 'string' },
      'grpc-host': { type: 'string', default: '127.0.0.1' },
      'grpc-port': { type: 'string', default: '5008' },
      demo: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
    },
    strict: true,
  });
  if (values.help) {
    console.log(usage);
    return 0;
  }
  const grpcPort = Number(values['grpc-port']);
  if (!Number.isInteger(grpcPort) || grpcPort <= 0 || grpcPort > 65535) {
    console.error(`node up: --grpc-port must be a TCP port, got "${values['grpc-port']}"`);
    return 2;
  }
  const grpcHost = values['grpc-host'];
  if (!isIP(grpcHost)) {
    console.error(`node up: --grpc-host must be an IP address, got "${grpcHost}"`);
    return 2;
  }
  const layout = { ...localLayout(resolve(values['data-dir'] ?? defaultDataDir()), grpcPort), grpcHost };
  for (const dir of [layout.dataDir, layout.runDir, layout.bucketDir, layout.cacheDir, layout.logDir]) {
    await mkdir(dir, { recursive: true });
  }
  const logger = createLogger({ service: 'node' });
  const specs = localServicePlan(layout);
  const supervisor = new Supervisor({
    specs,
    launcher: [process.execPath, '--enable-source-maps', resolve(repoRoot, 'dist/tools/sbx/src/main.js')],
    logDir: layout.logDir,
    logger,
  });

  let stopped: () => void = () => undefined;
  const done = new Promise<void>((r) => (stopped = r));
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) {
      // Services run in their own process groups, so a second Ctrl-C reaches only us: cutting
      // their clean-up short would leave namespaces, rules and VMMs behind.
      const busy = supervisor
        .status()
        .filter((s) => s.state === 'stopping' || s.state === 'serving')
        .map((s) => s.name);
      console.log(`${signal}: still stopping (${busy.join(', ') || 'almost done'}): waiting for the clean-up`);
      return;
    }
    stopping = true;
    console.log(`\n${signal}: stopping the node…`);
    await supervisor.stop();
    printStatus(supervisor.status());
    stopped();
  };
  process.on('SIGINT', () => void stop('SIGINT'));
  process.on('SIGTERM', () => void stop('SIGTERM'));
  // A closed terminal: the services, in their own groups, would not hear of it otherwise.
  process.on('SIGHUP', () => void stop('SIGHUP'));
  // After a hang-up, writing to the gone terminal fails; the clean-up must go on regardless.
  process.stdout.on('error', () => undefined);

  console.log(`node: data in ${layout.dataDir}, logs in ${layout.logDir}`);
  try {
    await supervisor.start();
  } catch (err) {
    console.error(`node: ${(err as Error).message}`);
    return 1;
  }
  printStatus(supervisor.status());
  await writeNodeRecord(layout.dataDir, {
    grpcPort,
    sockets: Object.fromEntries(specs.map((s) => [s.name, s.healthTarget])),
    startedAt: new Date().toISOString(),
    pid: process.pid,
    proxy: { port: layout.proxyPort, domain: layout.proxyDomain },
  });
  if (values.demo && !stopping) {
    const { runDemo } = await import('./demo.js');
    try {
      await runDemo({ layout, logger });
    } catch (err) {
      console.error(`demo failed: ${(err as Error).message}`);
    }
  }
  if (!stopping)
    console.log(`\nserving on ${grpcHost}:${grpcPort}; Ctrl-C stops the node and removes everything it made`);
  await done;
  return 0;
}

function printStatus(status: ServiceStatus[]): void {
  const rows = status.map((s) => [s.name, s.state, String(s.pid ?? '-'), String(s.restarts), s.healthTarget]);
  const header = ['service', 'state', 'pid', 'restarts', 'control socket'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ');
  console.log([line(header), ...rows.map(line)].join('\n'));
}
