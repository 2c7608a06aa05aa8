import cluster, { type Worker } from 'node:cluster';
import { startGrpcServer } from '#grpc';
import type { Logger } from '#logging';
import { startMetricsServer } from '#metrics';
import { AggregatorRegistry } from 'prom-client';
import type { ProxyConfig } from './proxy-config.js';

/** What a worker sends the primary once its listeners are up. */
export const WORKER_READY = 'sbx-proxy-worker-ready';

/** The workers' metrics, summed, served as one registry (prom-client asks each worker over IPC). */
class WorkersRegistry extends AggregatorRegistry<'text/plain; version=0.0.4; charset=utf-8'> {
  override metrics(): Promise<string> {
    return this.clusterMetrics();
  }
}

export interface RunningWorkers {
  readonly pids: number[];
  stop(): Promise<void>;
}

/**
 * `--workers N`: N processes share the client port (node:cluster hands each new connection to
 * one of them), so the proxy uses as many cores as it is given. This primary holds the control
 * socket and the metrics endpoint, starts a worker again when one dies, and on stop sends each
 * SIGTERM and waits for it to exit.
 */
export async function startProxyWorkers(config: ProxyConfig, logger: Logger): Promise<RunningWorkers> {
  const registry = config.metricsPort !== 0 ? new WorkersRegistry() : undefined;
  let stopping = false;
  let starting = true;
  const workers = new Set<Worker>();
  const fork = (): Promise<Worker> =>
    new Promise((resolve, reject) => {
      const worker = cluster.fork();
      workers.add(worker);
      const onExit = (code: number | null) => reject(new Error(`proxy worker exited ${code} while starting`));
      worker.once('exit', onExit);
      worker.on('message', (m: unknown) => {
        if (m !== WORKER_READY) return;
        worker.off('exit', onExit);
        resolve(worker);
      });
    });
  cluster.on('exit', (worker, code, signal) => {
    workers.delete(worker);
    if (stopping || starting) return;
    logger.error({ workerPid: worker.process.pid, code, signal }, 'proxy worker died; starting another');
    setTimeout(() => {
      if (!stopping) fork().catch((err: unknown) => logger.error({ err }, 'proxy worker restart failed'));
    }, 1000).unref();
  });
  const stopWorkers = async () => {
    stopping = true;
    await Promise.all(
      [...workers].map(
        (w) =>
          new Promise<void>((resolve) => {
            if (w.isDead()) return resolve();
            w.once('exit', () => resolve());
            w.process.kill('SIGTERM');
          }),
      ),
    );
  };
  try {
    await Promise.all(Array.from({ length: config.workers }, fork));
  } catch (err) {
    await stopWorkers();
    throw err;
  }
  starting = false;
  const grpc =
    config.controlSocket !== 'none'
      ? await startGrpcServer({ address: `unix://${config.controlSocket}`, services: [], logger })
      : undefined;
  const metrics = registry ? await startMetricsServer(registry, config.metricsHost, config.metricsPort) : undefined;
  const pids = [...workers].map((w) => w.process.pid!);
  logger.info({ workers: pids, controlSocket: grpc?.address, metricsPort: metrics?.port }, 'proxy workers serving');
  return {
    pids,
    async stop() {
      await stopWorkers();
      await grpc?.shutdown(2000);
      await metrics?.close();
    },
  };
}
