import { join } from 'node:path';
import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { startMetricsServer } from '#metrics';
import { startOrRollback, stopWith, TeardownStack, type RunningService } from '#service-kit';
import { BlockServerService } from '#proto/sbx/block';
import { BuildStore, configuredFetch, openConfiguredBackend } from '#storage';
import { BlockMetrics } from './block-metrics.js';
import { blockServerImplementation } from './control-service.js';
import { DeviceManager } from './device-manager.js';
import { KernelNbd } from './kernel-attach.js';
import type { ServiceConfig } from './service-config.js';

/** `./sbx block-server serve` without --base: the control API and every device. */
export function startBlockServer(config: ServiceConfig, logger: Logger): Promise<RunningService> {
  return startOrRollback(new TeardownStack(), logger, async (stack) => {
    const metrics = new BlockMetrics();
    const kernel = config.kernelAttach === 'off' ? undefined : await KernelNbd.detect(logger);
    if (kernel) stack.push('kernel nbd', () => kernel.close());
    const manager = new DeviceManager({
      dataDir: config.dataDir,
      nbdDir: config.nbdDir ?? join(config.dataDir, 'nbd'),
      // Local builds ({cacheDir}/builds, a pause on this node) first, then the bucket.
      builds: new BuildStore({
        ...(config.bucket ? { backend: openConfiguredBackend({ ...config, bucket: config.bucket }) } : {}),
        ...configuredFetch(config),
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
    // Devices are kept on disk at shutdown (and after a failed start) for the next run to reopen.
    stack.push('devices', () => manager.shutdown());
    const restored = await manager.restore();
    logger.info(restored, 'devices from the previous run');
    if (config.metricsPort > 0) {
      const metricsServer = await startMetricsServer(metrics.registry, '127.0.0.1', config.metricsPort);
      stack.push('metrics', () => metricsServer.close());
    }
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
    stack.push('grpc', () => grpc.shutdown(3000));
    return { stop: stopWith(stack) };
  });
}
