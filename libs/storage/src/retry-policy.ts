/** How often and how patiently a transient storage failure is retried. */
export interface RetryPolicy {
  /** Attempts in all, the first included. */
  attempts: number;
  initialDelayMs: number;
  maxDelayMs: number;
  multiplier: number;
}

export const DEFAULT_RETRY_POLICY: RetryPolicy = { attempts: 5, initialDelayMs: 100, maxDelayMs: 5000, multiplier: 2 };

/**
 * Runs `operation` until it succeeds, `isRetryable` says no, or the attempts are spent; waits
 * with exponential backoff and jitter in between (so a fleet of readers does not retry in step).
 */
export async function withRetries<T>(
  operation: (attempt: number) => Promise<T>,
  policy: RetryPolicy,
  isRetryable: (err: unknown) => boolean,
  onRetry?: (err: unknown, attempt: number, delayMs: number) => void,
): Promise<T> {
  let delay = policy.initialDelayMs;
  for (let attempt = 1; ; attempt++) {
    try {
      return await operation(attempt);
    } catch (err) {
      if (attempt >= policy.attempts || !isRetryable(err)) throw err;
      const wait = Math.min(policy.maxDelayMs, delay) * (0.5 + Math.random() / 2);
      onRetry?.(err, attempt, wait);
      await new Promise((resolve) => setTimeout(resolve, wait));
      delay *= policy.multiplier;
    }
  }
}

export function isRetryableStorageError(err: unknown): boolean {
  return typeof err === 'object' && err !== null && (err as { retryable?: unknown }).retryable === true;
}
