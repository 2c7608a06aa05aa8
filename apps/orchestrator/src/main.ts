import { ConfigInvalid } from '#config';
import { onShutdownSignals } from '#grpc';
import { createLogger } from '#logging';
import { loadOrchestratorConfig } from './orchestrator-config.js';
import { startOrchestrator } from './orchestrator-server.js';

const HELP = `usage: ./sbx orchestrator serve [flags]

Serves SandboxService (E2B's orchestrator.proto) on TCP and drives uffd-server, block-server,
net-agent and dns through their control sockets. Every flag can also be set in the
environment as SBX_ORCHESTRATOR_<FLAG> (e.g. SBX_ORCHESTRATOR_GRPC_PORT).

flags:
  --grpc-port <port>             upstream SandboxService port (default 5008)
  --grpc-host <host>             listen address (default 0.0.0.0)
  --control-socket <path>        the same API on a Unix socket (default /run/sbx/orchestrator.sock)
  --data-dir <dir>               state, sockets, template catalogue (default /var/lib/sbx/orchestrator)
  --bucket <dir>                 build bucket, a local directory or gs://bucket (SBX_BUCKET)
  --gcs-endpoint <url>           GCS JSON API endpoint for gs:// when not Google's, e.g. fake-gcs-server (SBX_GCS_ENDPOINT)
  --cache-dir <dir>              local build cache (SBX_CACHE_DIR)
  --uffd-server-sockets <path>   uffd-server control socket; repeat for several instances
  --block-server-sockets <path>  block-server control socket; repeat for several instances
  --net-agent-socket <path>      net-agent control socket
  --dns-socket <path>            dns control socket
  --firecracker-bin <path>       Firecracker (FIRECRACKER_BIN); with --kernel-path, else the vmm-sim double
  --kernel-path <path>           guest kernel (FIRECRACKER_KERNEL)
  --redis-url <url>              catalogue and lifecycle events in Redis (REDIS_URL); optional
  --pause-parallelism <n>        pauses at once (default 8)
  --generation-cap <n>           layers before a pause compacts them (default 10)
  --envd-timeout-ms <ms>         envd /init retry budget (default 10000)
  --service-watch-interval-ms <ms>  how often uffd/block instances are asked what they still hold;
                                 sandboxes one lost are failed and cleaned up (default 2000, 0 = off)
  --vmm-cgroup auto|off|<dir>    a cgroup v2 of its own for each VMM, outside the orchestrator's, so a
                                 restart that kills the orchestrator's cgroup (Nomad) spares them
                                 (default auto: <cgroup2 mount>/sbx-vmm when mounted)
  --shutdown-sandboxes kill|keep on SIGTERM kill sandboxes, or keep them for the next run to adopt
  --sample-template true|false   build the sample template 'base' when missing (default true)
  --metrics-port <port>          Prometheus on 127.0.0.1 (default 9460, 0 = off)
`;

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (!sub || sub === '--help' || sub === '-h' || rest.includes('--help')) {
    console.log(HELP);
    return sub ? 0 : 2;
  }
  if (sub !== 'serve') {
    console.error(`orchestrator: unknown subcommand '${sub}'\n\n${HELP}`);
    return 2;
  }
  let config;
  try {
    config = loadOrchestratorConfig(rest);
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(err.message);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ service: 'orchestrator', level: config.logLevel });
  const running = await startOrchestrator(config, logger);
  onShutdownSignals(logger, () => running.stop());
  await new Promise<never>(() => undefined);
  return 0;
}
