import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';
import { PollingRound } from './polling-round.js';

describe('PollingRound', () => {
  beforeEach(() => {
    vi.useFakeTimers();
  });
  afterEach(() => {
    vi.useRealTimers();
  });

  it('polls every member once per interval on one timer, spread over half of it, and holds none once empty', async () => {
    const round = new PollingRound(1000, 4);
    const calls = new Map<number, number>();
    const leave = Array.from({ length: 100 }, (_, i) =>
      round.add(async () => {
        calls.set(i, (calls.get(i) ?? 0) + 1);
      }),
    );
    expect(vi.getTimerCount()).toBe(1);
    await vi.advanceTimersByTimeAsync(1000);
    // Not in one burst: a quarter of the interval in, about half have been polled.
    await vi.advanceTimersByTimeAsync(250);
    expect(calls.size).toBeGreaterThan(40);
    expect(calls.size).toBeLessThan(60);
    await vi.advanceTimersByTimeAsync(250);
    expect([...calls.values()]).toEqual(Array.from({ length: 100 }, () => 1));
    for (const l of leave.slice(0, 50)) l();
    await vi.advanceTimersByTimeAsync(1000);
    expect(calls.get(0)).toBe(1);
    expect(calls.get(99)).toBe(2);
    for (const l of leave.slice(50)) l();
    expect(vi.getTimerCount()).toBe(0);
  });

  it('keeps at most `concurrency` polls in flight and does not start a round over a running one', async () => {
    const round = new PollingRound(1000, 3);
    let inFlight = 0;
    let most = 0;
    let started = 0;
    const release: (() => void)[] = [];
    for (let i = 0; i < 10; i++) {
      round.add(async () => {
        started++;
        inFlight++;
        most = Math.max(most, inFlight);
        await new Promise<void>((r) => release.push(r));
        inFlight--;
      });
    }
    await vi.advanceTimersByTimeAsync(1500);
    expect(inFlight).toBe(3);
    // The next interval comes while the first round still waits: no second round.
    await vi.advanceTimersByTimeAsync(1000);
    expect(started).toBe(3);
    while (release.length) {
      release.shift()!();
      await vi.advanceTimersByTimeAsync(0);
    }
    expect(started).toBe(10);
    expect(most).toBe(3);
  });

  it('a member that fails does not stop the others', async () => {
    const round = new PollingRound(1000, 2);
    const seen: string[] = [];
    round.add(async () => {
      throw new Error('envd unreachable');
    });
    round.add(async () => void seen.push('b'));
    await vi.advanceTimersByTimeAsync(1500);
    expect(seen).toEqual(['b']);
  });
});
