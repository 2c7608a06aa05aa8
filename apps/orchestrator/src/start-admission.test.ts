import { afterEach, describe, expect, it, vi } from 'vitest';
import { CapacityExhausted } from './orchestrator-errors.js';
import { StartAdmission } from './start-admission.js';

afterEach(() => {
  vi.useRealTimers();
});

describe('StartAdmission', () => {
  it('refuses a create at once and gives a waiting resume the next turn', async () => {
    const admission = new StartAdmission(2, 15_000);
    const first = await admission.enter('create');
    await admission.enter('resume');
    await expect(admission.enter('create')).rejects.toThrow(CapacityExhausted);
    let admitted = false;
    const waiting = admission.enter('resume').then((release) => {
      admitted = true;
      return release;
    });
    await Promise.resolve();
    expect({ admitted, waiting: admission.waiting }).toEqual({ admitted: false, waiting: 1 });
    // A create does not jump the queue of resumes.
    first();
    first();
    const release = await waiting;
    expect({ admitted, starting: admission.starting, waiting: admission.waiting }).toEqual({
      admitted: true,
      starting: 2,
      waiting: 0,
    });
    await expect(admission.enter('create')).rejects.toThrow('sandboxes starting at once at its limit (2)');
    release();
    expect(admission.starting).toBe(1);
  });

  it('gives up on a resume after the wait bound, naming the limit and the wait', async () => {
    vi.useFakeTimers();
    const admission = new StartAdmission(1, 15_000);
    await admission.enter('create');
    const waiting = admission.enter('resume');
    const outcome = waiting.then(
      () => 'admitted',
      (err: Error) => err.message,
    );
    await vi.advanceTimersByTimeAsync(14_999);
    expect(admission.waiting).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(await outcome).toBe('sandboxes starting at once (a resume waited 15000 ms) at its limit (1)');
    expect({ waiting: admission.waiting, starting: admission.starting }).toEqual({ waiting: 0, starting: 1 });
  });
});
