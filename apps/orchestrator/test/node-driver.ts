import type { Redis } from 'ioredis';
import { expect } from 'vitest';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { eventually } from '#test-kit';
import { NodeUnderTest, type NodeOptions } from './node-under-test.js';
import { startRedis, type RedisUnderTest } from './redis-server.js';

/** What a sandbox leaves behind on the node; compared with a baseline after it is gone. */
export const FOOTPRINT_KEYS = ['slotsInUse', 'devices', 'uffd', 'dns', 'vmmProcesses', 'sandboxDirs', 'sockets'];

export function sandboxConfig(id: string, extra: Partial<SandboxConfig> = {}): SandboxConfig {
  return {
    templateId: 'base',
    buildId: '',
    kernelVersion: 'vmlinux-6.1',
    firecrackerVersion: 'v1.10',
    hugePages: false,
    sandboxId: id,
    envVars: {},
    metadata: {},
    envdVersion: '0.2.0',
    vcpu: 1,
    ramMb: 0,
    teamId: 'team-restart',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: 'base',
    executionId: '',
    volumeMounts: [],
    ...extra,
  };
}

/** Teardown across the node is asynchronous: checks of what is left are retried this long. */
const SETTLE = { timeoutMs: 30_000, intervalMs: 250 };

/**
 * Drives a NodeUnderTest through SandboxService only, and reads the lifecycle events and
 * catalogue a real user of the node would see in Redis.
 */
export class NodeDriver {
  baseline: Record<string, string[]> = {};

  constructor(
    readonly node: NodeUnderTest,
    private readonly redis: Redis,
    private readonly redisServer?: RedisUnderTest,
  ) {}

  /**
   * A whole node publishing to its own redis-server (on a Unix socket: the orchestrator runs in
   * the node's network namespace), warmed up, for one test file; stop() takes all of it down.
   */
  static async start(options: Omit<NodeOptions, 'redisUrl'>): Promise<NodeDriver> {
    const redisServer = await startRedis({ unixSocket: `/tmp/${options.tag}-redis-${process.pid}.sock` });
    const reader = redisServer.connect();
    let node: NodeUnderTest | undefined;
    try {
      node = await NodeUnderTest.start({ ...options, redisUrl: redisServer.url });
      const driver = new NodeDriver(node, reader, redisServer);
      await driver.warmUp();
      return driver;
    } catch (err) {
      await node?.stop();
      reader.disconnect();
      await redisServer.stop();
      throw err;
    }
  }

  async stop(): Promise<void> {
    await this.node.stop();
    this.redis.disconnect();
    await this.redisServer?.stop();
  }

  /** Creates and deletes one sandbox (the orchestrator's channels open), then records the baseline. */
  async warmUp(): Promise<void> {
    await this.create('warm');
    await this.remove('warm');
    this.baseline = await this.node.footprint();
  }

  /** Creates the sandbox; resolves to its host IP (from its DNS record). */
  async create(id: string, extra: Partial<SandboxConfig> = {}): Promise<string> {
    // A failed create shows the services' logs (the test kit prints them for a failed test).
    const { node } = this;
    await unary(
      node.client,
      node.client.create,
      { sandbox: sandboxConfig(id, extra), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
      120_000,
    );
    const record = (await node.footprint())['dns']!.find((r) => r.startsWith(`${id}=`));
    return record?.split('=')[1] ?? '';
  }

  async remove(id: string): Promise<void> {
    await unary(this.node.client, this.node.client.delete, { sandboxId: id }, 60_000);
  }

  async pause(id: string, buildId: string): Promise<void> {
    await unary(this.node.client, this.node.client.pause, { sandboxId: id, templateId: 'base', buildId }, 120_000);
  }

  async listIds(): Promise<string[]> {
    const res = await unary(this.node.client, this.node.client.list, {}, 10_000);
    return res.sandboxes.map((s) => s.config!.sandboxId).sort();
  }

  async events(id: string): Promise<Record<string, string>[]> {
    const entries = await this.redis.xrange('sbx:events', '-', '+');
    return entries
      .map(([, f]) => {
        const o: Record<string, string> = {};
        for (let i = 0; i < f.length; i += 2) o[f[i]!] = f[i + 1]!;
        return o;
      })
      .filter((e) => e['sandboxId'] === id);
  }

  async eventTypes(id: string): Promise<string[]> {
    return (await this.events(id)).map((e) => e['type']!);
  }

  /** Polls until none of `ids` is listed any more (the orchestrator noticed and cleaned up). */
  async waitUntilGone(ids: string[]): Promise<void> {
    await eventually(async () => expect((await this.listIds()).filter((id) => ids.includes(id))).toEqual([]), SETTLE);
  }

  /** Everything sandboxes took is back to the baseline (polled: teardown is asynchronous). */
  async expectFootprintBack(): Promise<void> {
    await eventually(async () => {
      const after = await this.node.footprint();
      for (const key of FOOTPRINT_KEYS) expect(after[key], key).toEqual(this.baseline[key]);
      // Slots went back to net-agent's pool: every slot namespace is one net-agent accounts for.
      expect(after['namespaces']!.length).toBe(Number(after['agentSlots']![0]));
    }, SETTLE);
  }

  /** Each sandbox gone from List, with one `failed` event naming the service, its catalogue entry gone. */
  async expectFailed(ids: string[], service: string): Promise<void> {
    await this.waitUntilGone(ids);
    await eventually(async () => {
      for (const id of ids) {
        const failed = (await this.events(id)).filter((e) => e['type'] === 'failed');
        expect(failed.length, `${id}: one failed event`).toBe(1);
        expect(failed[0]!['step']).toBe(service);
        expect(await this.redis.exists(`sbx:sandbox:${id}`), `${id}: catalogue entry removed`).toBe(0);
      }
    }, SETTLE);
  }
}
