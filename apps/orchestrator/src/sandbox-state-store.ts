import { mkdir, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { NetSlot } from '#proto/sbx/net';
import type { SandboxConfig } from '#proto/orchestrator';

export type SandboxPhase = 'creating' | 'running' | 'pausing' | 'stopping';

/**
 * What a restarted orchestrator needs to find a sandbox's resources again: persisted as
 * `{dataDir}/sandboxes/{id}/state.json` at every phase change.
 */
export interface SandboxStateFile {
  sandboxId: string;
  phase: SandboxPhase;
  config: SandboxConfig;
  buildId: string;
  startTime: string;
  endTime: string;
  slot?: NetSlot;
  deviceOpened?: boolean;
  memorySocket?: string;
  vmm?: { pid: number; startTicks: number; apiSocket: string; stdoutPath: string; stderrPath: string };
  dnsIp?: string;
}

export class SandboxStateStore {
  constructor(readonly root: string) {}

  dir(sandboxId: string): string {
    return join(this.root, sandboxId);
  }

  async create(sandboxId: string): Promise<string> {
    const dir = this.dir(sandboxId);
    await mkdir(dir, { recursive: true });
    return dir;
  }

  async save(state: SandboxStateFile): Promise<void> {
    const dir = this.dir(state.sandboxId);
    const tmp = join(dir, 'state.json.tmp');
    await writeFile(tmp, JSON.stringify(state));
    await rename(tmp, join(dir, 'state.json'));
  }

  async remove(sandboxId: string): Promise<void> {
    await rm(this.dir(sandboxId), { recursive: true, force: true });
  }

  /** Every sandbox directory: its state, or undefined when it has none (died before the first save). */
  async scan(): Promise<{ sandboxId: string; state: SandboxStateFile | undefined }[]> {
    const names = await readdir(this.root).catch(() => [] as string[]);
    const out: { sandboxId: string; state: SandboxStateFile | undefined }[] = [];
    for (const name of names) {
      let state: SandboxStateFile | undefined;
      try {
        state = JSON.parse(await readFile(join(this.root, name, 'state.json'), 'utf8')) as SandboxStateFile;
      } catch {
        state = undefined;
      }
      out.push({ sandboxId: name, state });
    }
    return out;
  }
}
