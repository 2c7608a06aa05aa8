export interface EventuallyOptions {
  /** How long to keep trying (default 15 s). */
  timeoutMs?: number;
  /** The pause between attempts (default 50 ms). */
  intervalMs?: number;
  /** What is awaited, for the timeout message when `check` never threw. */
  what?: string;
}

type Reached<T> = Exclude<T, undefined | null | false>;

/**
 * Calls `check` until it returns a value other than undefined, null or false, and resolves to
 * that value. A throw (a failed `expect`) counts as not yet; when time runs out the last error
 * is rethrown as is, so an assertion's diff reaches the report. Services settle asynchronously
 * (teardown, background pools, reconnects): tests wait on what they can observe, never a sleep.
 */
export async function eventually<T>(
  check: () => T | Promise<T>,
  { timeoutMs = 15_000, intervalMs = 50, what = 'the condition' }: EventuallyOptions = {},
): Promise<Reached<T>> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    let failure: unknown;
    let value: T | undefined;
    try {
      value = await check();
      if (value !== undefined && value !== null && value !== false) return value as Reached<T>;
    } catch (err) {
      failure = err;
    }
    if (Date.now() >= deadline) {
      if (failure !== undefined) throw failure;
      throw new Error(`${what} not reached in ${timeoutMs} ms (last value: ${String(value)})`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}
