import { describe, expect, it } from 'vitest';
import { describeFailures, TeardownStack } from './teardown-stack.js';

describe('TeardownStack', () => {
  it('gives resources back in reverse order, once, and goes on past a failing undo', async () => {
    const stack = new TeardownStack();
    const order: string[] = [];
    stack.push('slot', async () => void order.push('slot'));
    stack.push('device', async () => {
      order.push('device');
      throw new Error('device busy');
    });
    stack.push('vmm', async () => void order.push('vmm'));
    const failures = await stack.unwind();
    expect(order).toEqual(['vmm', 'device', 'slot']);
    expect(describeFailures(failures)).toEqual(['device: device busy']);
    expect(await stack.unwind()).toBe(failures);
    expect(order).toHaveLength(3);
    expect(() => stack.push('late', async () => undefined)).toThrow(/teardown already running/);
  });

  it('releases one entry early and forgets handed-over ones', async () => {
    const stack = new TeardownStack();
    const order: string[] = [];
    stack.push('slot', async () => void order.push('slot'));
    stack.push('dns', async () => void order.push('dns'));
    stack.push('vmm', async () => void order.push('vmm'));
    await stack.release('vmm');
    expect(stack.forget('dns')).toBe(true);
    expect(stack.names).toEqual(['slot']);
    await stack.unwind();
    expect(order).toEqual(['vmm', 'slot']);
  });
});
