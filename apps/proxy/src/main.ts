import cluster from 'node:cluster';
import { ConfigInvalid, describeConfig, loadConfig } from '#config';
import { onShutdownSignals } from '#grpc';
import { createLogger } from '#logging';
import { chooseDataPath } from './native-relay.js';
import { proxyConfigSchema } from './proxy-config.js';
import { startProxy } from './proxy-service.js';
import { startProxyWorkers, WORKER_READY } from './worker-cluster.js';

const USAGE = `usage: ./sbx proxy serve [options]

Ingress proxy: a request for {port}-{sandboxId}.{any domain} (or with headers
e2b-sandbox-id and e2b-sandbox-port) goes to that port of the running sandbox on this node.
HTTP/1.1 with keep-alive, WebSocket and other upgrades, HTTP/2 cleartext with prior knowledge.
Routes come from the orchestrator's control socket; a paused sandbox whose auto_resume policy
is "any" is resumed on request. A sandbox with a traffic access token requires header
e2b-traffic-access-token.

options (each also read from the environment as SBX_PROXY_<NAME>):
  --listen <ip:port>                  client address (default 0.0.0.0:5007)
  --orchestrator-socket <path>        the orchestrator's control socket (default /run/sbx/orchestrator.sock)
  --control-socket <path>             gRPC health socket, or "none" (default /run/sbx/proxy.sock)
  --domain <domain>                   domain for ./sbx url (default localhost); routing takes any
  --tcp-forward <port>=<id>:<port>    plain TCP forward of a node port to a sandbox port (repeatable)
  --tcp-host <ip>                     address the TCP forwards listen on (default 0.0.0.0)
  --upstream-connect-timeout-ms <ms>  connect bound to a sandbox port (default 10000)
  --resume-timeout-ms <ms>            wait for a sandbox to resume or start (default 60000)
  --max-idle-upstream-sockets <n>     node path: idle keep-alive connections per sandbox port (default 128)
  --client-idle-timeout-ms <ms>       close idle client connections (default 620000)
  --data-path <native|node>           who carries HTTP/1.1: the C relay of libsbxnative on its own
                                      threads, handing everything else to Node, or Node alone
                                      (default native when libsbxnative has the relay)
  --workers <n>                       native: relay threads in this process; node: processes
                                      sharing the client port (default 1)
  --upstream-idle-timeout-ms <ms>     native: close pooled sandbox connections idle this long (default 4000)
  --metrics-port <port>               Prometheus metrics on 127.0.0.1, 0 = off (default 9465)
  --log-level <level>                 pino level (default info)

Serves until SIGTERM or SIGINT (client connections are dropped; sandboxes are not touched).`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--help' || command === '-h' || command === 'help') {
    console.log(USAGE);
    return 0;
  }
  if (command !== 'serve') {
    console.error(command ? `proxy: unknown command ${JSON.stringify(command)}\n\n${USAGE}` : USAGE);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(USAGE);
    return 0;
  }
  let config;
  try {
    config = loadConfig('proxy', proxyConfigSchema, 'SBX_PROXY_', { argv: rest });
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(err.message);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ service: 'proxy', level: config.logLevel });
  if (cluster.isWorker) {
    const proxy = await startProxy(config, logger, true);
    onShutdownSignals(logger, () => proxy.stop());
    process.send?.(WORKER_READY);
  } else if (config.workers > 1 && chooseDataPath(config.dataPath) === 'node') {
    logger.info({ config: describeConfig(config) }, 'proxy starting');
    const workers = await startProxyWorkers(config, logger);
    onShutdownSignals(logger, () => workers.stop());
  } else {
    logger.info({ config: describeConfig(config) }, 'proxy starting');
    const proxy = await startProxy(config, logger);
    onShutdownSignals(logger, () => proxy.stop());
  }
  // Serve until a signal: onShutdownSignals exits the process once everything is closed.
  return new Promise<number>(() => undefined);
}
