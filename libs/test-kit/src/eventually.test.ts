import { describe, expect, it } from 'vitest';
import { eventually } from './eventually.js';

describe('eventually', () => {
  it('resolves to the first value that is not undefined, null or false', async () => {
    let calls = 0;
    const value = await eventually(() => (++calls < 3 ? false : { calls }), { intervalMs: 1 });
    expect(value).toEqual({ calls: 3 });
  });

  it('treats a throw as not yet and rethrows the last one when time runs out', async () => {
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

  it('names what never came when the check only returned nothing', async () => {
    await expect(eventually(() => undefined, { timeoutMs: 10, intervalMs: 1, what: 'the slot' })).rejects.toThrow(
      'the slot not reached in 10 ms',
    );
  });

  it('accepts a check that passes once an async condition holds', async () => {
    const ready = Date.now() + 20;
    await expect(eventually(async () => Date.now() >= ready, { intervalMs: 1 })).resolves.toBe(true);
  });
});
