import { mkdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Gauge } from 'prom-client';
import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { createRegistry, startMetricsServer } from '#metrics';
import { startOrRollback, stopWith, TeardownStack } from '#service-kit';
import { BuildStore, configuredFetch, openConfiguredBackend, type UploadEvent } from '#storage';
import { SandboxServiceService } from '#proto/orchestrator';
import { RoutingService } from '#proto/sbx/routing';
import { TemplateAdminService } from '#proto/sbx/templates';
import { AutoResume } from './auto-resume.js';
import { HttpEnvdClient } from './envd-client.js';
import { GrpcNodeServices } from './grpc-node-services.js';
import { NoLifecycleEvents, RedisLifecycleEvents, type LifecycleEvents } from './lifecycle-events.js';
import type { OrchestratorConfig } from './orchestrator-config.js';
import { ServiceLossWatch, surveyInstances } from './service-loss-watch.js';
import { DnsRecordKeeper } from './dns-record-keeper.js';
import { PausedSandboxes } from './paused-sandboxes.js';
import { reconcileOnStart, type ReconcileReport } from './restart-reconciler.js';
import { RouteFeed } from './route-feed.js';
import { routingService } from './routing-service.js';
import { SandboxManager } from './sandbox-manager.js';
import type { Sandbox } from './sandbox.js';
import { sandboxService } from './sandbox-service.js';
import { SandboxStateStore } from './sandbox-state-store.js';
import { templateAdminService } from './template-admin-service.js';
import { admissionService } from './admission-service.js';
import { AdmissionService } from '#proto/sbx/admission';
import { buildTemplate } from './template-builder.js';
import { TemplateCatalogue } from './template-catalogue.js';
import { chooseVmmCommand, ProcessVmmLauncher } from './vmm-launcher.js';
import { VmmCgroups } from './vmm-cgroups.js';
import { VmmPool } from './vmm-pool.js';

export interface RunningOrchestrator {
  manager: SandboxManager;
  grpcAddress: string;
  reconcile: ReconcileReport;
  stop(): Promise<void>;
}

/**
 * Wires the orchestrator from its configuration: reconcile, sample template, gRPC, metrics. Each
 * part is pushed on one teardown stack as it starts: stop unwinds it, and so does a start that
 * fails half-way (keeping adopted sandboxes running for the next start).
 */
export function startOrchestrator(config: OrchestratorConfig, logger: Logger): Promise<RunningOrchestrator> {
  return startOrRollback(new TeardownStack(), logger, (stack) => start(config, logger, stack));
}

async function start(config: OrchestratorConfig, logger: Logger, stack: TeardownStack): Promise<RunningOrchestrator> {
  const vmmCommand = chooseVmmCommand(config);
  if (vmmCommand.isDouble) {
    logger.warn(
      { vmm: vmmCommand.description },
      'NO FIRECRACKER: FIRECRACKER_BIN and a kernel are not both configured; sandboxes run in the vmm-sim TEST DOUBLE',
    );
  } else logger.info({ vmm: vmmCommand.description, kernel: config.kernelPath }, 'VMM: real Firecracker');

  const socketDir = join(config.dataDir, 's');
  await mkdir(socketDir, { recursive: true, mode: 0o750 });
  await mkdir(config.cacheDir, { recursive: true });
  if (!config.bucket.startsWith('gs://')) await mkdir(config.bucket, { recursive: true });

  const catalogue: LifecycleEvents = config.redisUrl
    ? new RedisLifecycleEvents({
        url: config.redisUrl,
        nodeId: config.nodeId,
        prefix: config.redisPrefix,
        stream: config.redisStream,
        logger,
      })
    : new NoLifecycleEvents();
  // The ingress proxy's routes follow the catalogue (routing-service.ts on the control socket).
  const paused = new PausedSandboxes(join(config.dataDir, 'paused-sandboxes.json'));
  await paused.load();
  const events: RouteFeed = new RouteFeed({
    inner: catalogue,
    paused,
    sandboxes: (): Map<string, Sandbox> => manager.sandboxes,
    logger,
  });
  if (!config.redisUrl) logger.info('REDIS_URL not set: no catalogue or lifecycle events published');
  const services = new GrpcNodeServices(
    {
      uffd: config.uffdServerSockets,
      block: config.blockServerSockets,
      net: config.netAgentSocket,
      dns: config.dnsSocket,
    },
    config.stepTimeoutMs,
  );
  stack.push('service clients', async () => services.close());
  stack.push('catalogue', () => events.close());
  const vmm = new ProcessVmmLauncher(
    vmmCommand,
    undefined,
    VmmCgroups.choose(config.vmmCgroup, config.dataDir, logger),
  );
  const envd = new HttpEnvdClient(config.envdPort);
  const vmmPool = new VmmPool({
    size: config.vmmPoolSize,
    launcher: vmm,
    slots: services.slots,
    socketDir,
    logDir: join(config.dataDir, 'vmm-pool'),
    vmRootfsDir: config.vmRootfsDir,
    logger: logger.child({ component: 'vmm-pool' }),
  });
  // The only writer of {cacheDir}/builds and the only uploader (libs/storage/README.md).
  const builds = new BuildStore({
    backend: openConfiguredBackend(config),
    ...configuredFetch(config),
    cacheDir: config.cacheDir,
    owner: 'orchestrator',
    cache: { ttlMs: config.buildCacheTtlMs },
    uploadRetry: {
      attempts: config.uploadRetries + 1,
      initialDelayMs: config.uploadBackoffMs,
      maxDelayMs: 60_000,
      multiplier: 2,
    },
    onUploadEvent: (e: UploadEvent) => {
      if (e.kind === 'done') logger.info({ buildId: e.buildId, bytes: e.bytes }, 'build uploaded');
      else if (e.kind === 'retry')
        logger.warn(
          { buildId: e.buildId, file: e.file, attempt: e.attempt, err: String(e.error) },
          'build upload failed, retrying',
        );
      else if (e.kind === 'failed') logger.error({ buildId: e.buildId, err: e.error.message }, 'build upload gave up');
    },
  });
  stack.push('build store', () => builds.close()); // waits for uploads in flight
  const templates = new TemplateCatalogue(join(config.dataDir, 'templates.json'));
  await templates.load();
  const states = new SandboxStateStore(join(config.dataDir, 'sandboxes'));
  const manager = new SandboxManager({
    settings: {
      nodeId: config.nodeId,
      maxSandboxes: config.maxSandboxes,
      maxStartingSandboxes: config.maxStartingSandboxes,
      startWaitMs: config.startWaitMs,
      envdTimeoutMs: config.envdTimeoutMs,
      healthIntervalMs: config.healthIntervalMs,
      metricsIntervalMs: config.metricsIntervalMs,
      endTimeCheckMs: config.endTimeCheckMs,
      pauseParallelism: config.pauseParallelism,
      generationCap: config.generationCap,
      pauseMemoryDiff: config.pauseMemoryDiff,
      pauseDedup: config.pauseDedup,
      vmRootfsDir: config.vmRootfsDir,
      socketDir,
    },
    node: { services, vmm, envd, vmmPool },
    builds,
    templates,
    records: { states, events },
    logger,
  });

  let serving = false;
  stack.push('sandboxes', () => manager.shutdown(serving ? config.shutdownSandboxes : 'keep'));
  // Waiting VMMs and their slots go in every mode: nothing of theirs is a sandbox to keep.
  stack.push('vmm pool', () => vmmPool.close());

  const reconcile = await reconcileOnStart({
    manager,
    services,
    vmm,
    envd,
    builds,
    states,
    events,
    socketDir,
    logger,
    envdTimeoutMs: config.envdTimeoutMs,
  });

  if (config.sampleTemplate && !templates.get('base')) {
    await buildTemplate(
      {
        builds,
        templates,
        vmm,
        slots: services.slots,
        kernelPath: config.kernelPath,
        vmRootfsDir: config.vmRootfsDir,
        workDir: socketDir,
        logger,
      },
      { templateId: 'base', rootfsMb: config.sampleRootfsMb, memoryMb: config.sampleMemoryMb, vcpu: 1 },
    );
  }
  manager.startEndTimeEnforcement();
  // After the reconcile, which kills every VMM on the socket dir that no adopted sandbox owns.
  vmmPool.start();

  const registry = createRegistry('orchestrator');
  new Gauge({
    name: 'sbx_orchestrator_sandboxes',
    help: 'Sandboxes on this node by phase',
    labelNames: ['phase'],
    registers: [registry],
    collect() {
      const counts: Record<string, number> = { creating: 0, running: 0, pausing: 0, stopping: 0 };
      for (const s of manager.sandboxes.values()) counts[s.phase] = (counts[s.phase] ?? 0) + 1;
      for (const [phase, n] of Object.entries(counts)) this.set({ phase }, n);
    },
  });
  new Gauge({
    name: 'sbx_orchestrator_uploads_failed',
    help: 'Builds whose upload to the bucket failed after every retry',
    registers: [registry],
    collect() {
      this.set(builds.uploadCounts().failed);
    },
  });
  if (config.metricsPort > 0) {
    const metrics = await startMetricsServer(registry, '127.0.0.1', config.metricsPort);
    stack.push('metrics', () => metrics.close());
  }

  const implementation = sandboxService({
    manager,
    builds,
    bounds: config,
    clientId: config.nodeId,
    logger,
  });
  const served = [{ name: 'SandboxService', definition: SandboxServiceService, implementation }];
  const grpc = await startGrpcServer({ address: `${config.grpcHost}:${config.grpcPort}`, services: served, logger });
  stack.push('grpc', () => grpc.shutdown(5000));
  // The template admin API is internal: only on the control socket, not on the public port.
  const templateAdmin = templateAdminService({
    templates,
    build: (req) =>
      buildTemplate(
        {
          builds,
          templates,
          vmm,
          slots: services.slots,
          kernelPath: config.kernelPath,
          vmRootfsDir: config.vmRootfsDir,
          workDir: socketDir,
          logger,
        },
        req,
      ),
    bounds: config,
    defaultMemoryMb: Math.min(Math.max(config.sampleMemoryMb, config.minRamMb), config.maxRamMb),
    logger,
  });
  stack.push('template builds', () => templateAdmin.stop());
  const adminService = {
    name: 'sbx.v1.TemplateAdmin',
    definition: TemplateAdminService,
    implementation: templateAdmin.implementation,
  };
  const routing = {
    name: 'sbx.v1.Routing',
    definition: RoutingService,
    implementation: routingService({
      feed: events,
      resume: new AutoResume({ feed: events, paused, create: (req) => manager.create(req), logger }),
      logger,
    }),
  };
  if (config.controlSocket) {
    const control = await startGrpcServer({
      address: `unix://${config.controlSocket}`,
      services: [
        ...served,
        adminService,
        routing,
        {
          name: 'sbx.v1.Admission',
          definition: AdmissionService,
          implementation: admissionService({ manager, logger }),
        },
      ],
      logger,
    });
    stack.push('control socket', () => control.shutdown(1000));
  }
  const lossWatch = new ServiceLossWatch({
    intervalMs: config.serviceWatchIntervalMs,
    running: () => [...manager.sandboxes.values()].filter((s) => s.phase === 'running').map((s) => s.id),
    survey: () => surveyInstances(services.uffdPlacement, services.blockPlacement, config.stepTimeoutMs),
    fail: async ({ sandboxId, service, reason }) => {
      const sbx = manager.sandboxes.get(sandboxId);
      if (sbx) await manager.fail(sbx, service, reason);
    },
    logger,
  });
  lossWatch.start();
  stack.push('service loss watch', () => lossWatch.stop());
  // A running sandbox holds a name while its teardown stack holds the matching removal.
  const named = (s: { phase: string; dnsIp: string | undefined; teardown: { has(step: string): boolean } }) =>
    s.phase === 'running' && s.dnsIp !== undefined && s.teardown.has('dns');
  const dnsKeeper = new DnsRecordKeeper({
    intervalMs: config.serviceWatchIntervalMs,
    names: services.names,
    expected: () =>
      [...manager.sandboxes.values()].filter(named).map((s) => ({ sandboxId: s.id, ip: s.dnsIp as string })),
    stillExpected: ({ sandboxId, ip }) => {
      const s = manager.sandboxes.get(sandboxId);
      return s !== undefined && named(s) && s.dnsIp === ip;
    },
    logger,
  });
  dnsKeeper.start();
  stack.push('dns record keeper', () => dnsKeeper.stop());
  logger.info({ address: grpc.address, vmm: vmmCommand.description, adopted: reconcile.adopted.length }, 'serving');

  serving = true;
  return { manager, grpcAddress: grpc.address, reconcile, stop: stopWith(stack) };
}
