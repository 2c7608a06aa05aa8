/**
 * Vitest setup file (vitest.shared.ts): when a test fails, the last log lines of every service
 * process that ran during it are printed, so a failure in CI explains itself without a rerun.
 */
import { beforeEach } from 'vitest';
import { startedProcesses } from './started-processes.js';

const TAIL = 60;

beforeEach(({ onTestFailed }) => {
  const since = Date.now();
  for (const p of startedProcesses) if (p.endedAt !== undefined && p.endedAt < since) startedProcesses.delete(p);
  onTestFailed(() => {
    for (const p of startedProcesses) {
      if (p.endedAt !== undefined && p.endedAt < since) continue;
      console.error(`--- last ${TAIL} log lines of ${p.name}\n${p.logs.slice(-TAIL).join('\n')}`);
    }
  });
});
