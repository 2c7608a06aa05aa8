import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { startOrRollback, stopWith, TeardownFailed, TeardownStack } from '#service-kit';

const logger = createLogger({ service: 'test', level: 'silent' });

describe('startOrRollback', () => {
  it('gives back what the earlier steps took when a later one fails, and rethrows its error', async () => {
    const given: string[] = [];
    const stack = new TeardownStack();
    const start = startOrRollback(stack, logger, async (s) => {
      s.push('grpc', async () => void given.push('grpc'));
      s.push('metrics', async () => {
        given.push('metrics');
        throw new Error('close failed');
      });
      throw new Error('listen EADDRINUSE');
    });
    await expect(start).rejects.toThrow('listen EADDRINUSE');
    expect(given).toEqual(['metrics', 'grpc']);
    expect(stack.names).toEqual([]);
  });

  it('stops once, in reverse order, and reports entries that failed', async () => {
    const given: string[] = [];
    const stack = new TeardownStack();
    const stop = await startOrRollback(stack, logger, async (s) => {
      s.push('listener', async () => void given.push('listener'));
      s.push('pool', async () => {
        given.push('pool');
        throw new Error('slot 3 busy');
      });
      return stopWith(s);
    });
    const failure = await stop().catch((err: unknown) => err);
    expect(failure).toBeInstanceOf(TeardownFailed);
    expect((failure as TeardownFailed).message).toBe('teardown: pool: slot 3 busy');
    await stop().catch(() => undefined);
    expect(given).toEqual(['pool', 'listener']);
  });
});
