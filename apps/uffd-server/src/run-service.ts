import { describeConfig, loadConfig } from '#config';
import { onShutdownSignals, startGrpcServer } from '#grpc';
import { createLogger } from '#logging';
import { createRegistry, startMetricsServer } from '#metrics';
import { UffdServerService } from '#proto/sbx/uffd';
import { BuildStore, openBackend } from '#storage';
import { SandboxRegistry } from './sandbox-registry.js';
import { uffdServerConfigSchema } from './uffd-server-config.js';
import { UffdMetrics } from './uffd-metrics.js';
import { uffdServiceImplementation } from './uffd-service.js';

/** `serve`: the control API on a Unix socket, sandboxes prepared, served and stopped through it. */
export async function runService(argv: string[]): Promise<number> {
  // The shared settings SBX_BUCKET and SBX_CACHE_DIR apply unless overridden for this service.
  const env = {
    ...process.env,
    SBX_UFFD_SERVER_BUCKET: process.env['SBX_UFFD_SERVER_BUCKET'] ?? process.env['SBX_BUCKET'],
    SBX_UFFD_SERVER_CACHE_DIR: process.env['SBX_UFFD_SERVER_CACHE_DIR'] ?? process.env['SBX_CACHE_DIR'],
  };
  const config = loadConfig('uffd-server', uffdServerConfigSchema, 'SBX_UFFD_SERVER_', { argv, env });
  const logger = createLogger({ service: 'uffd-server', level: config.logLevel });
  logger.info({ config: describeConfig(config) }, 'uffd-server starting');
  // Local builds ({cacheDir}/builds) and a local-directory bucket are mapped in place; a remote
  // bucket goes through chunk caches, the one layer that retries a fetch while a fault waits.
  const store = new BuildStore({
    ...(config.bucket ? { backend: openBackend(config.bucket) } : {}),
    cacheDir: config.cacheDir,
    owner: 'uffd-server',
    fetchRetry: {
      attempts: config.fetchAttempts,
      initialDelayMs: config.fetchRetryDelayMs,
      maxDelayMs: 5000,
      multiplier: 2,
    },
  });
  const promRegistry = createRegistry('uffd-server');
  const holder: { registry?: SandboxRegistry } = {};
  const metrics = new UffdMetrics(promRegistry, () => holder.registry);
  const registry = new SandboxRegistry(
    config,
    store,
    logger,
    (s) => {
      metrics.sandboxesEnded.inc({ state: s.state });
      const problem = /invalid UFFD handshake \((\w+)\)/.exec(s.error)?.[1];
      if (problem) metrics.handshakeFailures.inc({ problem });
    },
    (final) => metrics.forget(final),
  );
  holder.registry = registry;
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
  const metricsServer =
    config.metricsPort > 0 ? await startMetricsServer(promRegistry, config.metricsHost, config.metricsPort) : undefined;
  logger.info({ socket: config.controlSocket, metricsPort: metricsServer?.port ?? 0 }, 'uffd-server serving');
  onShutdownSignals(logger, async () => {
    await grpc.shutdown(2000);
    await registry.shutdown();
    await metricsServer?.close();
    await store.close();
    await store.backend?.close();
  });
  return new Promise<number>(() => undefined);
}
