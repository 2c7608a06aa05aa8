import { startGrpcServer, type GrpcServerHandle } from '#grpc';
import type { Logger } from '#logging';
import { createRegistry, startMetricsServer, type MetricsServer } from '#metrics';
import { startOrRollback, stopWith, TeardownStack } from '#service-kit';
import { DnsService } from '#proto/sbx/dns';
import { dnsControlService } from './dns-control-service.js';
import type { DnsConfig } from './dns-config.js';
import { DnsResponder } from './dns-responder.js';
import { QueryCounters } from './query-counters.js';
import { RecordTable } from './record-table.js';
import { TcpListener } from './tcp-listener.js';
import { DgramUdpListener } from './dgram-udp-listener.js';
import { BatchUdpListener, BatchUdpUnavailable } from './batch-udp-listener.js';

interface UdpStartOptions {
  host: string;
  port: number;
  responder: DnsResponder;
  counters: QueryCounters;
  logger: Logger;
}

async function startUdp(config: DnsConfig, options: UdpStartOptions): Promise<DgramUdpListener | BatchUdpListener> {
  if (config.udpEngine === 'batch') {
    try {
      return BatchUdpListener.start({ ...options, sockets: config.udpSockets, receivers: config.udpReceivers });
    } catch (err) {
      if (!(err instanceof BatchUdpUnavailable)) throw err;
      options.logger.warn({ reason: err.message }, 'udp: batch engine unavailable, using dgram sockets');
    }
  }
  return DgramUdpListener.start(options);
}

export interface RunningDns {
  readonly host: string;
  /** UDP and TCP share this port. */
  readonly port: number;
  readonly table: RecordTable;
  readonly counters: QueryCounters;
  readonly metricsPort: number | undefined;
  readonly controlSocket: string | undefined;
  /** Closes every socket this service opened; safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Starts the resolver: UDP and TCP on the same port, the gRPC control socket and metrics.
 * When a step fails, what was already started is closed before the error is thrown.
 */
export function startDns(config: DnsConfig, logger: Logger): Promise<RunningDns> {
  const table = new RecordTable(config.zone ?? null);
  for (const record of config.record) table.set(record.name, record.ip);
  const counters = new QueryCounters();
  const responder = new DnsResponder({ table, counters, ttl: config.ttl, ednsUdpSize: config.ednsUdpSize });
  return startOrRollback(new TeardownStack(), logger, async (stack) => {
    const { host } = config.listen;
    // With port 0 the TCP listener must take the port the kernel gave UDP; another process may
    // hold that TCP port, so try a few.
    let udp: DgramUdpListener | BatchUdpListener | undefined;
    let tcp: TcpListener | undefined;
    for (let attempt = 0; !tcp; attempt++) {
      udp = await startUdp(config, { host, port: config.listen.port, responder, counters, logger });
      try {
        tcp = await TcpListener.start({
          host,
          port: udp.port,
          responder,
          logger,
          idleTimeoutMs: config.tcpIdleTimeoutMs,
          maxConnections: config.tcpMaxConnections,
        });
      } catch (err) {
        await udp.close();
        if (config.listen.port !== 0 || attempt >= 5) throw err;
      }
    }
    const udpListener = udp!;
    const tcpListener = tcp;
    stack.push('udp', () => udpListener.close());
    stack.push('tcp', () => tcpListener.close());

    let grpc: GrpcServerHandle | undefined;
    if (config.controlSocket !== 'none') {
      const implementation = dnsControlService(table, logger);
      const server = await startGrpcServer({
        address: `unix://${config.controlSocket}`,
        services: [{ name: 'sbx.v1.Dns', definition: DnsService, implementation }],
        logger,
      });
      stack.push('grpc', () => server.shutdown(2000));
      grpc = server;
    }

    let metrics: MetricsServer | undefined;
    if (config.metricsPort !== 0) {
      const registry = createRegistry('dns');
      counters.register(registry);
      const server = await startMetricsServer(registry, config.metricsHost, config.metricsPort);
      stack.push('metrics', () => server.close());
      metrics = server;
    }

    logger.info(
      { host, port: udpListener.port, records: table.size, zone: config.zone, controlSocket: grpc?.address },
      'dns serving (udp+tcp)',
    );
    return {
      host,
      port: udpListener.port,
      table,
      counters,
      metricsPort: metrics?.port,
      controlSocket: grpc?.address,
      stop: stopWith(stack),
    };
  });
}
