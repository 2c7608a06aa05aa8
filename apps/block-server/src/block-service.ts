import { join } from 'node:path';
import { describeConfig, loadConfig } from '#config';
import { onShutdownSignals, startGrpcServer } from '#grpc';
import { createLogger } from '#logging';
import { startMetricsServer } from '#metrics';
import { BlockServerService } from '#proto/sbx/block';
import { BuildStore, openBackend } from '#storage';
import { BlockMetrics } from './block-metrics.js';
import { blockServerImplementation } from './control-service.js';
import { DeviceManager } from './device-manager.js';
import { KernelNbd } from './kernel-attach.js';
import { serviceConfigSchema } from './service-config.js';

/** `./sbx block-server serve` without --base: the control API and every device. */
export async function runService(argv: string[]): Promise<number> {
  // SBX_BUCKET and SBX_CACHE_DIR are shared by every service; our own prefix wins.
  const env = { ...process.env };
  env['SBX_BLOCK_SERVER_BUCKET'] ??= process.env['SBX_BUCKET'];
  env['SBX_BLOCK_SERVER_CACHE_DIR'] ??= process.env['SBX_CACHE_DIR'];
  const config = loadConfig('block-server', serviceConfigSchema, 'SBX_BLOCK_SERVER_', { argv, env });
  const logger = createLogger({ service: 'block-server', level: config.logLevel });
  logger.info({ config: describeConfig(config), mode: 'service' }, 'block-server starting');

  const metrics = new BlockMetrics();
  const kernel = config.kernelAttach === 'off' ? undefined : await KernelNbd.detect(logger);
  const manager = new DeviceManager({
    dataDir: config.dataDir,
    nbdDir: config.nbdDir ?? join(config.dataDir, 'nbd'),
    // Local builds ({cacheDir}/builds, a pause on this node) first, then the bucket.
    builds: new BuildStore({
      ...(config.bucket ? { backend: openBackend(config.bucket) } : {}),
      cacheDir: config.cacheDir ?? join(config.dataDir, 'cache'),
      owner: 'block-server',
    }),
    syncReads: config.readMode === 'sync',
    logger,
    metrics,
    socketMode: config.nbdSocketMode === '0660' ? 0o660 : 0o600,
    releaseTimeoutMs: config.releaseTimeoutMs,
    ...(kernel ? { kernel } : {}),
  });
  const restored = await manager.restore();
  logger.info(restored, 'devices from the previous run');

  const metricsServer =
    config.metricsPort > 0 ? await startMetricsServer(metrics.registry, '127.0.0.1', config.metricsPort) : undefined;
  const grpc = await startGrpcServer({
    address: `unix://${config.controlSocket}`,
    services: [
      {
        name: 'sbx.v1.BlockServer',
        definition: BlockServerService,
        implementation: blockServerImplementation(manager, logger),
      },
    ],
    logger,
  });
  await new Promise<void>((resolve) => {
    onShutdownSignals(logger, async () => {
      await grpc.shutdown(3000);
      await manager.shutdown();
      await kernel?.close();
      await metricsServer?.close();
      resolve();
    });
  });
  return 0;
}
