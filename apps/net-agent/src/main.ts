import { setTimeout as sleep } from 'node:timers/promises';
import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { createRegistry, startMetricsServer } from '#metrics';
import { serviceMain, startOrRollback, stopWith, TeardownStack, type RunningService } from '#service-kit';
import { NetnsSwitch } from '#native';
import { NetAgentService } from '#proto/sbx/net';
import { EgressProxy } from './egress-proxy.js';
import { parseCidr, type Cidr } from './ipv4.js';
import { createNameResolver } from './name-resolver.js';
import { SlotEgress } from './slot-egress.js';
import { ConsulSlotReservation } from './consul-slot-reservation.js';
import { MemorySlotReservation } from './memory-slot-reservation.js';
import { registerNetAgentMetrics } from './net-agent-metrics.js';
import { netAgentConfigSchema, type NetAgentConfig } from './net-agent-config.js';
import { createNetAgentService } from './net-agent-service.js';
import { reconcile, type ReconcileResult } from './reconcile.js';
import { SlotLayout } from './slot-layout.js';
import { SlotNetwork } from './slot-network.js';
import { SlotPool } from './slot-pool.js';
import { markSlotOwner } from './slot-owner.js';
import { repairSlot } from './slot-repair.js';
import type { SlotSpec } from './slot-layout.js';
import type { SlotReservation } from './slot-reservation.js';

export function main(argv: string[]): Promise<number> {
  return serviceMain('net-agent', argv, [
    {
      name: 'serve',
      about: `Runs the agent: reconciles leftovers, keeps a pool of ready slots, serves the control API
(acquire, release, list, stats) on --control-socket until SIGTERM, then removes its ready slots
(slots in use stay with their sandboxes, and the next run adopts them).`,
      schema: netAgentConfigSchema,
      run: serve,
    },
    {
      name: 'cleanup',
      about: `Reconciles once (removes leftover slots no process uses, releases stale reservations) and exits.`,
      schema: netAgentConfigSchema,
      run: cleanup,
    },
  ]);
}

interface Parts {
  layout: SlotLayout;
  reservation: SlotReservation;
  network: SlotNetwork;
  /** Puts back what a slot lost (adopted at start, or given back for reuse). */
  repair: (spec: SlotSpec) => Promise<string[]>;
  /** Reconcile removes a pooled VMM's slot with no process once held this long. */
  pooledGraceMs: number;
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
  const repair = (spec: SlotSpec) =>
    repairSlot(spec, {
      rules: {
        slotTable: config.slotTable,
        blockedRanges: config.blockedRanges,
        metadataAddress: config.metadataAddress,
      },
      hostTable: config.hostTable,
    });
  return { layout, reservation, network, repair, pooledGraceMs: config.pooledSlotGraceMs };
}

/** Reconcile, retrying while the reservation store is down (it logs why each time). */
async function reconcileUntilDone(parts: Parts, logger: Logger, signal: AbortSignal): Promise<ReconcileResult> {
  let backoff = 200;
  for (;;) {
    try {
      return await reconcile({ ...parts, logger });
    } catch (err) {
      if (signal.aborted || (err as { code?: string }).code !== 'RESERVATION_UNAVAILABLE') throw err;
      logger.error({ err, retryInMs: backoff }, 'reconcile needs the reservation store; retrying');
      await sleep(backoff, undefined, { signal });
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

function serve(config: NetAgentConfig, logger: Logger, signal: AbortSignal): Promise<RunningService> {
  return startOrRollback(new TeardownStack(), logger, async (stack) => {
    const parts = await assemble(config, logger);
    const { network, reservation, layout } = parts;
    stack.push('reservation', async () => reservation.close());
    stack.push('network', async () => network.close());
    const registry = createRegistry('net-agent');
    const poolRef: { current?: SlotPool } = {};
    const metrics = registerNetAgentMetrics(registry, () => poolRef.current);

    const result = await reconcileUntilDone(parts, logger, signal);
    await network.init(
      result.adopted.map((s) => s.spec),
      config.enableForwarding,
    );
    // Slots left to their sandboxes still forward and masquerade through the host table.
    stack.push('host table', async () => {
      if (!poolRef.current?.list().length) await network.removeHostTable();
    });
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
      markOwner: markSlotOwner,
      namespacesInUse: (specs) => network.inUse(specs),
      pooledGraceMs: config.pooledSlotGraceMs,
      pooledStopWaitMs: config.pooledSlotStopWaitMs,
      repair: parts.repair,
      logger,
      onCreated: (count, ms) => {
        for (let i = 0; i < count; i++) metrics.createSecondsPerSlot.observe(ms / count / 1000);
      },
    });
    poolRef.current = pool;
    pool.adopt(result.adopted);
    pool.start();
    stack.push('slots', () => pool.shutdown());

    const netns = new NetnsSwitch();
    stack.push('netns switch', async () => netns.close());
    const proxy = new EgressProxy({
      port: config.egressProxyPort,
      resolver: createNameResolver({
        hostsFile: config.egressHostsFile || undefined,
        dnsServers: config.egressDnsServers,
        timeoutMs: config.egressDialTimeoutMs,
      }),
      alwaysDenied: alwaysDeniedRanges(config),
      netns,
      logger,
      headTimeoutMs: config.egressHeadTimeoutMs,
      dialTimeoutMs: config.egressDialTimeoutMs,
      onConnection: (result) => metrics.egressConnections.inc({ result }),
      tunnelThreads: config.egressTunnelThreads,
      tunnelMode: config.egressTunnelMode,
    });
    // Proxied connections end with the process; adopted slots keep their policy (state files).
    stack.push('egress proxy', async () => proxy.close());
    const egress = new SlotEgress({
      proxy,
      proxyPort: config.egressProxyPort,
      stateDir: config.egressStateDir,
      logger,
    });
    await egress.adopt(result.adopted);

    const metricsServer =
      config.metricsPort > 0 ? await startMetricsServer(registry, config.metricsHost, config.metricsPort) : undefined;
    if (metricsServer) stack.push('metrics', () => metricsServer.close());
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
            egress,
          }),
        },
      ],
      logger,
    });
    stack.push('grpc', () => server.shutdown(2000));
    logger.info({ socket: config.controlSocket, metricsPort: metricsServer?.port ?? 0 }, 'net-agent serving');
    return { stop: stopWith(stack) };
  });
}

/**
 * What the egress proxy never dials, whatever a policy allows: the slot's always-denied ranges,
 * the node's own slot blocks, and what only makes sense on the node itself (this network,
 * loopback, multicast and reserved).
 */
function alwaysDeniedRanges(config: NetAgentConfig): Cidr[] {
  return [
    ...config.blockedRanges,
    `${config.metadataAddress}/32`,
    config.vethCidr,
    config.hostCidr,
    '0.0.0.0/8',
    '127.0.0.0/8',
    '224.0.0.0/3',
  ].map(parseCidr);
}
