import { ConfigInvalid, describeConfig, loadConfig } from '#config';
import { onShutdownSignals } from '#grpc';
import { createLogger } from '#logging';
import { dnsConfigSchema } from './dns-config.js';
import { startDns } from './dns-service.js';

const USAGE = `usage: ./sbx dns serve [options]

Authoritative DNS for sandbox names: an A query for {sandboxId} or {sandboxId}-{anything}
(any letter case, optionally under --zone) answers the sandbox's host IP with TTL 0.

options (each also read from the environment as SBX_DNS_<NAME>):
  --listen <ip:port>          UDP and TCP address (default 127.0.0.4:53)
  --record <name>=<ipv4>      a record to serve from the start (repeatable)
  --control-socket <path>     gRPC control socket, or "none" (default /run/sbx/dns.sock)
  --zone <zone>               also answer {sandboxId}.{zone}
  --metrics-port <port>       Prometheus metrics on 127.0.0.1, 0 = off (default 9464)
  --ttl <seconds>             answer TTL (default 0)
  --edns-udp-size <bytes>     UDP payload size advertised with EDNS (default 1232)
  --udp-engine batch|dgram    UDP through recvmmsg/sendmmsg batches, or Node dgram (default batch)
  --udp-sockets <n>           UDP sockets sharing the port with SO_REUSEPORT (default 1)
  --udp-receivers <n>         receives in flight per UDP socket (default 1)
  --tcp-idle-timeout-ms <ms>  close idle TCP connections (default 10000)
  --tcp-max-connections <n>   concurrent TCP connections (default 1024)
  --log-level <level>         pino level (default info)

Serves until SIGTERM or SIGINT.`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (command === '--help' || command === '-h' || command === 'help') {
    console.log(USAGE);
    return 0;
  }
  if (command !== 'serve') {
    console.error(command ? `dns: unknown command ${JSON.stringify(command)}\n\n${USAGE}` : USAGE);
    return 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    console.log(USAGE);
    return 0;
  }
  let config;
  try {
    config = loadConfig('dns', dnsConfigSchema, 'SBX_DNS_', { argv: rest });
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      console.error(err.message);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ service: 'dns', level: config.logLevel });
  logger.info({ config: describeConfig(config) }, 'dns starting');
  const dns = await startDns(config, logger);
  onShutdownSignals(logger, () => dns.stop());
  // Serve until a signal: onShutdownSignals exits the process once everything is closed.
  return new Promise<number>(() => undefined);
}
