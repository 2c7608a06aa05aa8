import { describe, expect, it } from 'vitest';
import { BackgroundSaves } from './background-saves.js';

describe('background state saves', () => {
  it('writes one after another, the state as it is when each runs, and coalesces queued saves', async () => {
    let state = 0;
    let running = 0;
    const written: number[] = [];
    const saves = new BackgroundSaves(async () => {
      running++;
      expect(running).toBe(1);
      const snapshot = state;
      await new Promise((r) => setTimeout(r, 5));
      written.push(snapshot);
      running--;
    });
    saves.soon();
    state = 1;
    saves.soon();
    state = 2;
    saves.soon();
    await saves.flush();
    // The save runs after this tick, with the state as it is then; the two asked for meanwhile are that same save.
    expect(written).toEqual([2]);
    state = 3;
    saves.soon();
    await saves.flush();
    expect(written).toEqual([2, 3]);
  });

  it('flush throws the first failure and no save runs after it; settled does not throw', async () => {
    let calls = 0;
    const saves = new BackgroundSaves(async () => {
      calls++;
      await Promise.resolve();
      throw new Error(`disk full ${calls}`);
    });
    saves.soon();
    await saves.settled();
    saves.soon();
    await expect(saves.flush()).rejects.toThrow('disk full 1');
    expect(calls).toBe(1);
  });
});
