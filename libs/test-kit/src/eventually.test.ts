import { describe, expect, it } from 'vitest';
import { eventually } from './eventually.js';

describe('eventually', () => {
  it('retries a predicate until it holds, and resolves to what the check returned', async () => {
    let calls = 0;
    const value = await eventually(() => (++calls < 3 ? false : { calls }), { intervalMs: 1 });
    expect(value).toEqual({ calls: 3 });
  });

  it('retries an assertion block until it passes (returning nothing counts as passed)', async () => {
    let calls = 0;
    await eventually(
      () => {
        calls++;
        expect(calls).toBe(3);
      },
      { intervalMs: 1 },
    );
    expect(calls).toBe(3);
  });

  it('rethrows the last failure when time runs out', async () => {
    let calls = 0;
    const failing = eventually(
      () => {
        calls++;
        expect(calls).toBe(-1);
      },
      { timeoutMs: 30, intervalMs: 1 },
    );
    await expect(failing).rejects.toThrow(/expected \d+ to be -1/);
    expect(calls).toBeGreaterThan(1);
  });

  it('names what never came when the predicate stayed false', async () => {
    await expect(eventually(() => false, { timeoutMs: 10, intervalMs: 1, what: 'the slot' })).rejects.toThrow(
      'the slot not reached in 10 ms',
    );
  });

  it('waits on an async predicate', async () => {
    const ready = Date.now() + 20;
    await expect(eventually(async () => Date.now() >= ready, { intervalMs: 1 })).resolves.toBe(true);
  });
});
