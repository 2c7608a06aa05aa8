import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { AggregatorRegistry } from 'prom-client';
import { createRegistry, startMetricsServer } from '#metrics';
import { H2Forwarder } from './h2-forwarder.js';
import { Http1Forwarder } from './http1-forwarder.js';
import { chooseDataPath, NativeRelay } from './native-relay.js';
import { ProtocolListener } from './protocol-listener.js';
import type { ProxyConfig } from './proxy-config.js';
import { ProxyMetrics } from './proxy-metrics.js';
import { RouteResolver } from './route-resolver.js';
import { RouteTable } from './route-table.js';
import { RouteWatch } from './route-watch.js';
import { TcpForwarder } from './tcp-forwarder.js';

export interface RunningProxy {
  readonly dataPath: 'native' | 'node';
  readonly host: string;
  readonly port: number;
  /** Listening port of each `--tcp-forward`, in order. */
  readonly tcpPorts: number[];
  readonly table: RouteTable;
  readonly watch: RouteWatch;
  readonly metricsPort: number | undefined;
  readonly controlSocket: string | undefined;
  /** Stops listening, drops client connections, closes the watch; safe to call twice. */
  stop(): Promise<void>;
}

/**
 * Starts the ingress proxy: route watch, listeners, control socket, metrics. When a step
 * fails, what was already started is closed before the error is thrown.
 */
export async function startProxy(
  config: ProxyConfig,
  logger: Logger,
  /** A worker of several (worker-cluster.ts): the primary serves the control socket and metrics. */
  clusterWorker = false,
): Promise<RunningProxy> {
  const teardown: (() => Promise<void> | void)[] = [];
  const unwind = async () => {
    while (teardown.length) {
      try {
        await teardown.pop()!();
      } catch (err) {
        logger.warn({ err }, 'proxy stop step');
      }
    }
  };
  try {
    const table = new RouteTable();
    const watch = new RouteWatch({ orchestratorSocket: config.orchestratorSocket, table, logger });
    teardown.push(() => watch.stop());
    const registry = config.metricsPort !== 0 ? createRegistry('proxy') : undefined;
    const metrics = new ProxyMetrics(registry, table, () => watch.connected);
    const resolver = new RouteResolver({
      table,
      routing: watch.routing,
      resumeTimeoutMs: config.resumeTimeoutMs,
      logger,
      onResume: (result) => metrics.resumes.inc({ result }),
    });
    const common = { resolver, metrics, logger, connectTimeoutMs: config.upstreamConnectTimeoutMs };
    const http1 = new Http1Forwarder({
      ...common,
      maxIdleUpstreamSockets: config.maxIdleUpstreamSockets,
      idleTimeoutMs: config.clientIdleTimeoutMs,
    });
    const h2 = new H2Forwarder(common);
    teardown.push(
      () => http1.close(),
      () => h2.close(),
    );
    // A sandbox that moved or left: its pooled connections would reach the wrong guest or none.
    table.onChange((previous, current) => {
      if (previous?.hostIp && previous.hostIp !== current?.hostIp) {
        http1.dropIdle(previous.hostIp);
        h2.dropSessions(previous.hostIp);
      }
      const sandboxId = current?.sandboxId ?? previous?.sandboxId;
      logger.debug({ sandboxId, state: current?.state, hostIp: current?.hostIp }, 'route changed');
    });
    watch.start();

    const dataPath = chooseDataPath(config.dataPath);
    let listener: ProtocolListener | undefined = undefined;
    let relay: NativeRelay | undefined;
    if (dataPath === 'native') {
      const native = new NativeRelay({
        threads: config.workers,
        clientIdleTimeoutMs: config.clientIdleTimeoutMs,
        upstreamConnectTimeoutMs: config.upstreamConnectTimeoutMs,
        upstreamIdleTimeoutMs: config.upstreamIdleTimeoutMs,
        table,
        logger,
        // Handoffs come only for connections the listener gave the relay: it is set by then.
        onHandoff: (socket, seen) => listener!.serve(socket, seen),
      });
      relay = native;
      // Closed after the listener (teardown runs backwards): no new connection reaches it then.
      teardown.push(() => native.close());
      metrics.addNativeRelay(native);
    }

    listener = await ProtocolListener.start({
      host: config.listen.host,
      port: config.listen.port,
      http1,
      h2,
      metrics,
      logger,
      idleTimeoutMs: config.clientIdleTimeoutMs,
      relay,
    });
    const started = listener;
    teardown.push(() => started.close());
    const tcpPorts: number[] = [];
    for (const forward of config.tcpForward) {
      const tcp = await TcpForwarder.start({ ...common, forward, host: config.tcpHost });
      tcpPorts.push(tcp.port);
      teardown.push(() => tcp.close());
    }

    let controlSocket: string | undefined;
    if (config.controlSocket !== 'none' && !clusterWorker) {
      const grpc = await startGrpcServer({ address: `unix://${config.controlSocket}`, services: [], logger });
      controlSocket = grpc.address;
      teardown.push(() => grpc.shutdown(2000));
    }
    let metricsPort: number | undefined;
    if (registry && clusterWorker) {
      AggregatorRegistry.setRegistries(registry);
      // prom-client answers the primary's metric requests only once an instance exists here.
      new AggregatorRegistry();
    } else if (registry) {
      const server = await startMetricsServer(registry, config.metricsHost, config.metricsPort);
      metricsPort = server.port;
      teardown.push(() => server.close());
    }
    logger.info(
      {
        host: config.listen.host,
        port: listener.port,
        dataPath,
        ...(relay ? { relayThreads: config.workers } : {}),
        tcpPorts,
        orchestrator: config.orchestratorSocket,
        controlSocket,
      },
      `proxy serving (http/1.1, websocket, h2c; data path ${dataPath})`,
    );
    let stopping: Promise<void> | undefined;
    return {
      dataPath,
      host: config.listen.host,
      port: listener.port,
      tcpPorts,
      table,
      watch,
      metricsPort,
      controlSocket,
      stop: () => (stopping ??= unwind()),
    };
  } catch (err) {
    await unwind();
    throw err;
  }
}
