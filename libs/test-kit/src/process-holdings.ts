import { readdirSync, readFileSync, readlinkSync } from 'node:fs';

/**
 * What a process holds, read from /proc: the leak checks of the service tests compare these
 * before and after (an fd or mapping a sandbox left is a leak).
 */

/** The targets of the process's open fds, sorted (`socket:[123]`, `/tmp/x/overlay`, `anon_inode:[userfaultfd]`). */
export function openFds(pid: number): string[] {
  const targets: string[] = [];
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      targets.push(readlinkSync(`/proc/${pid}/fd/${fd}`));
    } catch {
      // closed while listing
    }
  }
  return targets.sort();
}

export interface Mapping {
  perms: string;
  /** The file, `[heap]`, `/memfd:name (deleted)`, or '' for anonymous memory. */
  path: string;
  size: number;
  /** The line of /proc/<pid>/maps. */
  line: string;
}

export function mappings(pid: number): Mapping[] {
  return readFileSync(`/proc/${pid}/maps`, 'utf8')
    .split('\n')
    .filter((line) => line.trim() !== '')
    .map((line) => {
      const [range = '', perms = '', , , , ...rest] = line.split(/\s+/);
      const [start = '0', end = '0'] = range.split('-');
      return { perms, path: rest.join(' '), size: Number(BigInt('0x' + end) - BigInt('0x' + start)), line };
    });
}

/**
 * The process's fd count once it stops changing (the same over `reads` reads `intervalMs`
 * apart): connections of earlier steps, health probes included, may still be closing on the
 * server side when a leak check takes its baseline.
 */
export async function steadyFdCount(
  pid: number,
  { reads = 5, intervalMs = 50, timeoutMs = 10_000 } = {},
): Promise<number> {
  const deadline = Date.now() + timeoutMs;
  let count = openFds(pid).length;
  for (let steady = 0; steady < reads;) {
    if (Date.now() > deadline) throw new Error(`fd count of ${pid} still changing after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, intervalMs));
    const now = openFds(pid).length;
    steady = now === count ? steady + 1 : 0;
    count = now;
  }
  return count;
}
