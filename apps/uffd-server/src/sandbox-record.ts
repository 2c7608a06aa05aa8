import { mkdirSync, readdirSync, readFileSync, renameSync, rmdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { GuestRegion } from '#uffd';
import type { TrackingMode } from './tracking-mode.js';

/**
 * What a restarted uffd-server needs to serve a sandbox again without a new handshake: written
 * once the handshake is taken, removed when the sandbox is stopped or its serving ends. The VMM
 * keeps the userfaultfd (and the memfd) open for the VM's life, so a new process takes them back
 * from it (pidfd_getfd) under the fd numbers recorded here.
 */
export interface SandboxRecord {
  version: 1;
  sandboxId: string;
  socketPath: string;
  buildId?: string;
  memfilePath?: string;
  pageSize?: number;
  blockSize?: number;
  prefetchBytes: number;
  peerPid: number;
  /** /proc/<pid>/stat start time: a reused pid is not the VMM. */
  peerStartTime: string;
  uffdFd: number;
  memfdFd?: number;
  regions: GuestRegion[];
  tracking: TrackingMode;
}

/** Start time (clock ticks since boot) of a process, or undefined if it is gone. */
export function processStartTime(pid: number): string | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Field 22, counted after the command name (which may hold spaces and parentheses).
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[19];
  } catch {
    return undefined;
  }
}

/** One directory per uffd-server instance, one JSON file per sandbox (written whole, renamed in place). */
export class SandboxRecords {
  constructor(readonly dir: string) {
    mkdirSync(dir, { recursive: true, mode: 0o700 });
  }

  private path(sandboxId: string): string {
    return join(this.dir, `${sandboxId}.json`);
  }

  write(record: SandboxRecord): void {
    const tmp = `${this.path(record.sandboxId)}.tmp`;
    writeFileSync(tmp, JSON.stringify(record), { mode: 0o600 });
    renameSync(tmp, this.path(record.sandboxId));
  }

  remove(sandboxId: string): void {
    rmSync(this.path(sandboxId), { force: true });
  }

  /** Removes the directory when it holds no record (a clean stop with no sandbox left). */
  removeIfEmpty(): void {
    try {
      rmdirSync(this.dir);
    } catch {
      // ENOTEMPTY: records for the next run; ENOENT: already gone
    }
  }

  /** Every record left by an earlier process; unreadable ones are returned as errors and removed. */
  readAll(): Array<SandboxRecord | { file: string; error: string }> {
    const out: Array<SandboxRecord | { file: string; error: string }> = [];
    for (const name of readdirSync(this.dir)) {
      const file = join(this.dir, name);
      if (!name.endsWith('.json')) {
        rmSync(file, { force: true }); // a write cut short
        continue;
      }
      try {
        const r = JSON.parse(readFileSync(file, 'utf8')) as SandboxRecord;
        if (r.version !== 1 || typeof r.sandboxId !== 'string' || !Array.isArray(r.regions))
          throw new Error('not a version 1 sandbox record');
        out.push(r);
      } catch (err) {
        rmSync(file, { force: true });
        out.push({ file, error: (err as Error).message });
      }
    }
    return out;
  }
}
