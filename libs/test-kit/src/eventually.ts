export interface EventuallyOptions {
  /** How long to keep trying (default 15 s). */
  timeoutMs?: number;
  /** The pause between attempts (default 50 ms). */
  intervalMs?: number;
  /** What is awaited, for the timeout message when `check` returned false. */
  what?: string;
}

/**
 * Calls `check` until it neither throws nor returns false, and resolves to what it returned.
 * Both styles work: a predicate (`() => pool.size > 0`) and an assertion block
 * (`async () => { expect(await list()).toEqual([]) }`). When time runs out the last error is
 * rethrown as is, so an assertion's diff reaches the report. Services settle asynchronously
 * (teardown, background pools, reconnects): tests wait on what they can observe, never a sleep.
 */
export async function eventually<T>(
  check: () => T | Promise<T>,
  { timeoutMs = 15_000, intervalMs = 50, what = 'the condition' }: EventuallyOptions = {},
): Promise<Exclude<T, false>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let failure: unknown;
    try {
      const value = await check();
      if (value !== false) return value as Exclude<T, false>;
    } catch (err) {
      failure = err ?? new Error(`${what} threw ${String(err)}`);
    }
    if (Date.now() >= deadline) throw failure ?? new Error(`${what} not reached in ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
