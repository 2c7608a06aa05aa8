import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { createRegistry, startMetricsServer } from '#metrics';
import { UffdServerService } from '#proto/sbx/uffd';
import { startOrRollback, stopWith, TeardownStack, type RunningService } from '#service-kit';
import { BuildStore, configuredFetch, openConfiguredBackend } from '#storage';
import { SandboxRegistry } from './sandbox-registry.js';
import { SandboxRecords } from './sandbox-record.js';
import type { UffdServerConfig } from './uffd-server-config.js';
import { UffdMetrics } from './uffd-metrics.js';
import { uffdServiceImplementation } from './uffd-service.js';

/** `serve`: the control API on a Unix socket, sandboxes prepared, served and stopped through it. */
export function startUffdServer(config: UffdServerConfig, logger: Logger): Promise<RunningService> {
  return startOrRollback(new TeardownStack(), logger, async (stack) => {
    // Local builds ({cacheDir}/builds) and a local-directory bucket are mapped in place; a remote
    // bucket goes through chunk caches, the one layer that retries a fetch while a fault waits.
    const store = new BuildStore({
      ...(config.bucket ? { backend: openConfiguredBackend(config) } : {}),
      ...configuredFetch(config),
      cacheDir: config.cacheDir,
      owner: 'uffd-server',
      fetchRetry: {
        attempts: config.fetchAttempts,
        initialDelayMs: config.fetchRetryDelayMs,
        maxDelayMs: 5000,
        multiplier: 2,
      },
    });
    stack.push('build store', async () => {
      await store.close();
      await store.backend?.close();
    });
    const promRegistry = createRegistry('uffd-server');
    const holder: { registry?: SandboxRegistry } = {};
    const metrics = new UffdMetrics(promRegistry, () => holder.registry);
    const records = new SandboxRecords(config.stateDir || `${config.controlSocket}.sandboxes`);
    // Kept while a record is in it (the next run takes those sandboxes back); gone when empty.
    stack.push('records', async () => records.removeIfEmpty());
    const registry = new SandboxRegistry({
      settings: config,
      builds: store,
      logger,
      onEnded: (s) => {
        metrics.sandboxesEnded.inc({ state: s.state });
        const problem = /invalid UFFD handshake \((\w+)\)/.exec(s.error)?.[1];
        if (problem) metrics.handshakeFailures.inc({ problem });
      },
      onStopped: (final) => metrics.forget(final),
      records,
    });
    holder.registry = registry;
    stack.push('sandboxes', () => registry.shutdown());
    // Before the control API answers: the orchestrator then sees the taken-back sandboxes listed.
    const restart = await registry.adopt();
    if (restart.adopted.length || restart.dropped.length) logger.info(restart, 'sandboxes of the previous process');
    if (config.metricsPort > 0) {
      const metricsServer = await startMetricsServer(promRegistry, config.metricsHost, config.metricsPort);
      stack.push('metrics', () => metricsServer.close());
    }
    const grpc = await startGrpcServer({
      address: `unix://${config.controlSocket}`,
      services: [
        {
          name: 'sbx.v1.UffdServer',
          definition: UffdServerService,
          implementation: uffdServiceImplementation(registry, logger),
        },
      ],
      logger,
      socketMode: config.socketMode === '0660' ? 0o660 : 0o600,
    });
    stack.push('grpc', () => grpc.shutdown(2000));
    logger.info({ socket: config.controlSocket, metricsPort: config.metricsPort }, 'uffd-server serving');
    return { stop: stopWith(stack) };
  });
}
