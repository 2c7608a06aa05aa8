import { Redis } from 'ioredis';
import type { Logger } from '#logging';

export type LifecycleEventType = 'created' | 'resumed' | 'paused' | 'checkpointed' | 'killed' | 'failed';

/** The catalogue entry of one running sandbox: where it runs and until when. */
export interface CatalogueEntry {
  sandboxId: string;
  nodeId: string;
  templateId: string;
  buildId: string;
  hostIp: string;
  guestIp: string;
  startTime: Date;
  endTime: Date;
}

/** Where the node publishes its running sandboxes and their lifecycle events. */
export interface LifecycleEvents {
  publish(entry: CatalogueEntry): Promise<void>;
  unpublish(sandboxId: string): Promise<void>;
  event(type: LifecycleEventType, sandboxId: string, fields?: Record<string, string>): Promise<void>;
  close(): Promise<void>;
}

/** Without Redis the node works the same; nothing is published. */
export class NoLifecycleEvents implements LifecycleEvents {
  async publish(): Promise<void> {}
  async unpublish(): Promise<void> {}
  async event(): Promise<void> {}
  async close(): Promise<void> {}
}

/**
 * Redis: a hash per running sandbox at `{prefix}{sandboxId}` and one stream of lifecycle
 * events. A Redis outage is logged and never fails a sandbox operation.
 */
export class RedisLifecycleEvents implements LifecycleEvents {
  private readonly redis: Redis;

  private readonly nodeId: string;
  private readonly prefix: string;
  private readonly stream: string;
  private readonly logger: Logger;

  constructor(options: { url: string; nodeId: string; prefix: string; stream: string; logger: Logger }) {
    ({ nodeId: this.nodeId, prefix: this.prefix, stream: this.stream, logger: this.logger } = options);
    this.redis = new Redis(options.url, { lazyConnect: false, maxRetriesPerRequest: 2, enableOfflineQueue: true });
    this.redis.on('error', (err: Error) => this.logger.warn({ err: err.message }, 'redis error'));
  }

  async publish(entry: CatalogueEntry): Promise<void> {
    await this.guard('catalogue publish', entry.sandboxId, () =>
      this.redis.hset(this.prefix + entry.sandboxId, {
        sandboxId: entry.sandboxId,
        nodeId: entry.nodeId,
        templateId: entry.templateId,
        buildId: entry.buildId,
        hostIp: entry.hostIp,
        guestIp: entry.guestIp,
        startTime: entry.startTime.toISOString(),
        endTime: entry.endTime.toISOString(),
      }),
    );
  }

  async unpublish(sandboxId: string): Promise<void> {
    await this.guard('catalogue remove', sandboxId, () => this.redis.del(this.prefix + sandboxId));
  }

  async event(type: LifecycleEventType, sandboxId: string, fields: Record<string, string> = {}): Promise<void> {
    const flat = Object.entries({
      ...fields,
      type,
      sandboxId,
      nodeId: this.nodeId,
      at: new Date().toISOString(),
    }).flat();
    await this.guard(`event ${type}`, sandboxId, () =>
      this.redis.xadd(this.stream, 'MAXLEN', '~', '100000', '*', ...flat),
    );
  }

  async close(): Promise<void> {
    await this.redis.quit().catch(() => this.redis.disconnect());
  }

  private async guard(what: string, sandboxId: string, op: () => Promise<unknown>): Promise<void> {
    try {
      await op();
    } catch (err) {
      this.logger.warn({ sandboxId, err: (err as Error).message }, `redis ${what} failed`);
    }
  }
}
