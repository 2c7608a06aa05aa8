import { readFile } from 'node:fs/promises';

/**
 * A process as found in /proc: its start time (clock ticks since boot) tells a live VMM from
 * an unrelated process that reused its pid after a restart.
 */
export interface ProcessIdentity {
  pid: number;
  startTicks: number;
}

export async function processStartTicks(pid: number): Promise<number | undefined> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    // Field 2 (comm) may hold spaces and parentheses; the fields after the last ')' are fixed.
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const state = rest[0];
    if (state === 'Z' || state === 'X') return undefined;
    const ticks = Number(rest[19]);
    return Number.isFinite(ticks) ? ticks : undefined;
  } catch {
    return undefined;
  }
}

export async function processCmdline(pid: number): Promise<string[]> {
  try {
    return (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0').filter(Boolean);
  } catch {
    return [];
  }
}

/** Alive, not a zombie, and the same process (same start time) as recorded. */
export async function isSameProcess(identity: ProcessIdentity): Promise<boolean> {
  const ticks = await processStartTicks(identity.pid);
  return ticks !== undefined && ticks === identity.startTicks;
}
