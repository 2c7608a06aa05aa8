import type { Logger } from '#logging';
import { describeFailures, TeardownFailed, type TeardownStack } from './teardown-stack.js';

/** What a started service hands back: stop gives back everything start took. */
export interface RunningService {
  stop(): Promise<void>;
}

/**
 * Runs a service's start steps, each pushing what it took onto `stack`. When a step throws,
 * the ones before it are given back in reverse order (what could not be is logged) and the
 * error is rethrown: a failed start leaves no socket, port or process behind.
 */
export async function startOrRollback<T>(
  stack: TeardownStack,
  logger: Logger,
  start: (stack: TeardownStack) => Promise<T>,
): Promise<T> {
  try {
    return await start(stack);
  } catch (err) {
    const failures = await stack.unwind();
    if (failures.length) logger.warn({ rollback: describeFailures(failures) }, 'start failed; rollback incomplete');
    throw err;
  }
}

/** Stops by unwinding the stack once (later calls wait for the same run); throws when an entry failed. */
export function stopWith(stack: TeardownStack): () => Promise<void> {
  return async () => {
    const failures = await stack.unwind();
    if (failures.length) throw new TeardownFailed(failures);
  };
}
