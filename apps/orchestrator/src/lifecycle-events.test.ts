import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { startRedis, type RedisUnderTest } from '../test/redis-server.js';
import { RedisLifecycleEvents } from './lifecycle-events.js';

/* Against a real redis-server (Debian's) started on a free loopback port for this file. */

const logger = createLogger({ service: 'orchestrator-test', level: 'silent' });
let redis: RedisUnderTest;

beforeAll(async () => {
  redis = await startRedis();
});

afterAll(async () => {
  await redis?.stop();
});

describe('RedisLifecycleEvents', () => {
  it('publishes and removes catalogue entries and appends events to the stream', async () => {
    const events = new RedisLifecycleEvents({
      url: redis.url,
      nodeId: 'node-7',
      prefix: 'sbx:sandbox:',
      stream: 'sbx:events',
      logger,
    });
    const reader = redis.connect();
    try {
      const start = new Date('2026-01-01T00:00:00Z');
      const end = new Date('2026-01-01T01:00:00Z');
      await events.publish({
        sandboxId: 's1',
        nodeId: 'node-7',
        templateId: 'base',
        buildId: 'b',
        hostIp: '10.11.0.2',
        guestIp: '169.254.0.21',
        startTime: start,
        endTime: end,
      });
      expect(await reader.hgetall('sbx:sandbox:s1')).toMatchObject({
        nodeId: 'node-7',
        hostIp: '10.11.0.2',
        startTime: start.toISOString(),
        endTime: end.toISOString(),
      });
      await events.event('created', 's1', { buildId: 'b' });
      await events.event('killed', 's1');
      await events.unpublish('s1');
      expect(await reader.exists('sbx:sandbox:s1')).toBe(0);
      const stream = await reader.xrange('sbx:events', '-', '+');
      const parsed = stream.map(([, fields]) =>
        Object.fromEntries(fields.reduce<string[][]>((acc, v, i) => (i % 2 ? acc : [...acc, [v, fields[i + 1]!]]), [])),
      );
      expect(parsed.map((e) => `${e['type']}:${e['sandboxId']}:${e['nodeId']}`)).toEqual([
        'created:s1:node-7',
        'killed:s1:node-7',
      ]);
    } finally {
      reader.disconnect();
      await events.close();
    }
  });

  it('does not fail a sandbox operation when Redis is down', async () => {
    const events = new RedisLifecycleEvents({
      url: 'redis://127.0.0.1:1',
      nodeId: 'node-7',
      prefix: 'p:',
      stream: 's',
      logger,
    });
    await expect(events.event('created', 's2')).resolves.toBeUndefined();
    await events.close();
  });
});
