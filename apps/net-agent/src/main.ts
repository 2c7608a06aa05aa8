import { describeConfig, ConfigInvalid } from '#config';
import { onShutdownSignals, startGrpcServer } from '#grpc';
import { createLogger, type Logger } from '#logging';
import { createRegistry, startMetricsServer, type MetricsServer } from '#metrics';
import { NetAgentService } from '#proto/sbx/net';
import { ConsulSlotReservation } from './consul-slot-reservation.js';
import { MemorySlotReservation } from './memory-slot-reservation.js';
import { registerNetAgentMetrics } from './net-agent-metrics.js';
import { loadNetAgentConfig, type NetAgentConfig } from './net-agent-config.js';
import { createNetAgentService } from './net-agent-service.js';
import { reconcile, type ReconcileResult } from './reconcile.js';
import { SlotLayout } from './slot-layout.js';
import { SlotNetwork } from './slot-network.js';
import { SlotPool } from './slot-pool.js';
import type { SlotReservation } from './slot-reservation.js';

const USAGE = `usage: sbx net-agent <command> [--flag value]...

commands:
  serve     run the agent: reconcile leftovers, keep a pool of ready slots, serve the
            control API (acquire, release, list, stats) on --control-socket until SIGTERM, then
            remove every slot it made
  cleanup   reconcile once (remove leftover slots no process uses, release stale
            reservations) and exit

flags (each also read from SBX_NET_AGENT_<FLAG> in upper snake case):
  --control-socket /run/sbx/net-agent.sock  --metrics-port 9463 (0 = off)   --node-id <hostname>
  --reservation memory|consul        --consul-addr (or CONSUL_HTTP_ADDR)   --consul-prefix ''
  --first-slot 1 --slot-count 16000  --namespace-prefix ns- --host-veth-prefix veth-
  --veth-cidr 10.12.0.0/16 --host-cidr 10.11.0.0/16 --tap-name tap0 --tap-ip 169.254.0.22
  --tap-prefix 30 --guest-ip 169.254.0.21 --ns-veth-name eth0 --uplink <default route dev>
  --blocked-ranges <cidr> (repeat) --metadata-address 169.254.169.254
  --host-table sbx_net --slot-table sbx_slot --removal-group 1457 --enable-forwarding true
  --namespace-setup netlink|ip --nft-mode library|process
  --pool-new-size 32 --pool-reused-size 100 --create-batch 16 --acquire-timeout-ms 5000
  --refill-backoff-min-ms 100 --refill-backoff-max-ms 10000 --log-level info
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  if (!command || command === '--help' || command === '-h' || command === 'help') {
    process.stdout.write(USAGE);
    return command ? 0 : 2;
  }
  if (rest.includes('--help') || rest.includes('-h')) {
    process.stdout.write(USAGE);
    return 0;
  }
  if (command !== 'serve' && command !== 'cleanup') {
    process.stderr.write(`net-agent: unknown command ${JSON.stringify(command)}\n${USAGE}`);
    return 2;
  }
  let config: NetAgentConfig;
  try {
    config = loadNetAgentConfig({ argv: rest });
  } catch (err) {
    if (err instanceof ConfigInvalid) {
      process.stderr.write(`${err.message}\n`);
      return 2;
    }
    throw err;
  }
  const logger = createLogger({ service: 'net-agent', level: config.logLevel });
  logger.info({ config: describeConfig(config) }, 'configuration');
  return command === 'serve' ? serve(config, logger) : cleanup(config, logger);
}

interface Parts {
  layout: SlotLayout;
  reservation: SlotReservation;
  network: SlotNetwork;
}

async function assemble(config: NetAgentConfig, logger: Logger): Promise<Parts> {
  const layout = new SlotLayout(config);
  const uplink = config.uplink || (await SlotNetwork.detectUplink());
  const reservation: SlotReservation =
    config.reservation === 'consul'
      ? new ConsulSlotReservation({
          address: config.consulAddr!,
          token: config.consulToken,
          prefix: config.consulPrefix,
          nodeId: config.nodeId,
          first: layout.first,
          count: config.slotCount,
          timeoutMs: config.consulTimeoutMs,
        })
      : new MemorySlotReservation(layout.first, config.slotCount);
  const network = new SlotNetwork({
    layout,
    rules: {
      slotTable: config.slotTable,
      blockedRanges: config.blockedRanges,
      metadataAddress: config.metadataAddress,
    },
    hostTable: config.hostTable,
    uplink,
    removalGroup: config.removalGroup,
    namespaceSetup: config.namespaceSetup,
    nftMode: config.nftMode,
    logger,
  });
  logger.info(
    { uplink, reservation: reservation.kind, slots: `${layout.first}..${layout.last}` },
    'slot network ready',
  );
  return { layout, reservation, network };
}

/** Reconcile, retrying while the reservation store is down (it logs why each time). */
async function reconcileUntilDone(parts: Parts, logger: Logger, stopping: () => boolean): Promise<ReconcileResult> {
  let backoff = 200;
  for (;;) {
    try {
      return await reconcile({ ...parts, logger });
    } catch (err) {
      if (stopping() || (err as { code?: string }).code !== 'RESERVATION_UNAVAILABLE') throw err;
      logger.error({ err, retryInMs: backoff }, 'reconcile needs the reservation store; retrying');
      await new Promise((r) => setTimeout(r, backoff));
      backoff = Math.min(backoff * 2, 10_000);
    }
  }
}

async function cleanup(config: NetAgentConfig, logger: Logger): Promise<number> {
  const parts = await assemble(config, logger);
  try {
    const result = await reconcile({ ...parts, logger });
    process.stdout.write(
      `removed ${result.removed} leftover slot(s), released ${result.released} reservation(s), ` +
        `${result.adopted.length} in use left alone, in ${result.ms} ms\n`,
    );
    return 0;
  } finally {
    parts.reservation.close();
    parts.network.close();
  }
}

async function serve(config: NetAgentConfig, logger: Logger): Promise<number> {
  let stopping = false;
  let stop: () => Promise<void> = async () => undefined;
  onShutdownSignals(logger, () => {
    stopping = true;
    return stop();
  });

  const parts = await assemble(config, logger);
  const { network, reservation, layout } = parts;
  const registry = createRegistry('net-agent');
  const poolRef: { current?: SlotPool } = {};
  const metrics = registerNetAgentMetrics(registry, () => poolRef.current);
  let metricsServer: MetricsServer | undefined;

  const result = await reconcileUntilDone(parts, logger, () => stopping);
  await network.init(
    result.adopted.map((s) => s.spec),
    config.enableForwarding,
  );
  const pool = new SlotPool({
    network,
    reservation,
    layout,
    newSize: config.poolNewSize,
    reusedSize: config.poolReusedSize,
    batch: config.createBatch,
    backoffMinMs: config.refillBackoffMinMs,
    backoffMaxMs: config.refillBackoffMaxMs,
    acquireTimeoutMs: config.acquireTimeoutMs,
    logger,
    onCreated: (count, ms) => {
      for (let i = 0; i < count; i++) metrics.createSecondsPerSlot.observe(ms / count / 1000);
    },
  });
  poolRef.current = pool;
  pool.adopt(result.adopted);
  pool.start();

  if (config.metricsPort > 0)
    metricsServer = await startMetricsServer(registry, config.metricsHost, config.metricsPort);
  const server = await startGrpcServer({
    address: `unix://${config.controlSocket}`,
    services: [
      {
        name: 'sbx.v1.NetAgent',
        definition: NetAgentService,
        implementation: createNetAgentService({
          pool,
          logger,
          metrics,
          reservation: reservation.kind,
          uplink: network.uplink,
          nodeId: config.nodeId,
        }),
      },
    ],
    logger,
  });
  logger.info({ socket: config.controlSocket, metricsPort: metricsServer?.port ?? 0 }, 'net-agent serving');

  stop = async () => {
    await server.shutdown(2000);
    let failure: unknown;
    try {
      await pool.shutdown();
    } catch (err) {
      failure = err;
    }
    await network.removeHostTable().catch((err: unknown) => (failure ??= err));
    reservation.close();
    network.close();
    await metricsServer?.close();
    if (failure) throw failure;
  };
  if (stopping) await stop();
  // Serves until a signal; onShutdownSignals exits the process.
  return new Promise<number>(() => undefined);
}
