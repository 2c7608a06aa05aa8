import { describeConfig, loadConfig } from '#config';
import { onShutdownSignals, startGrpcServer } from '#grpc';
import { createLogger } from '#logging';
import { createRegistry, startMetricsServer } from '#metrics';
import { UffdServerService } from '#proto/sbx/uffd';
import { join } from 'node:path';
import { BuildCache, BuildStore, LocalBackend, openBackend } from '#storage';
import { MemoryLayerResolver } from './memory-layers.js';
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
  const backend = config.bucket ? openBackend(config.bucket) : undefined;
  // A local-directory bucket is mapped in place; a remote one goes through a chunk cache.
  const store =
    backend && !(backend instanceof LocalBackend)
      ? new BuildStore({ backend, cache: new BuildCache({ cacheDir: join(config.cacheDir, 'uffd-server') }) })
      : undefined;
  const resolver = new MemoryLayerResolver({
    cacheDir: config.cacheDir,
    ...(backend ? { backend } : {}),
    ...(store ? { store } : {}),
  });
  const promRegistry = createRegistry('uffd-server');
  const holder: { registry?: SandboxRegistry } = {};
  const metrics = new UffdMetrics(promRegistry, () => holder.registry);
  const registry = new SandboxRegistry(config, resolver, logger, (s) => {
    metrics.sandboxesEnded.inc({ state: s.state });
    const problem = /invalid UFFD handshake \((\w+)\)/.exec(s.error)?.[1];
    if (problem) metrics.handshakeFailures.inc({ problem });
  });
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
    await store?.close();
    await store?.cache.close();
    await backend?.close();
  });
  return new Promise<number>(() => undefined);
}
