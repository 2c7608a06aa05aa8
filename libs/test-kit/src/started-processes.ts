/**
 * Every service process a test file started, so a failed test can show their logs
 * (registered by ServiceProcess, read by the vitest setup in logs-on-failure.ts).
 */
export interface StartedProcess {
  readonly name: string;
  readonly logs: readonly string[];
  /** When it exited (ms since epoch), undefined while it runs. */
  readonly endedAt: number | undefined;
}

export const startedProcesses = new Set<StartedProcess>();
