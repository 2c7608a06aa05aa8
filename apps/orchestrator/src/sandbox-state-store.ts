import { mkdirSync } from 'node:fs';
import { readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
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
  /**
   * envd answered /init. A create writes its `running` state while /init is under way, so a
   * restart that finds this missing sends /init again (it is idempotent) before adopting.
   */
  envdInitialized?: boolean;
}

export class SandboxStateStore {
  /**
   * Per sandbox, its last save or removal: they run one at a time (saves share a temporary
   * file, and a removal must not race a save into the directory it removes).
   */
  private readonly turns = new Map<string, Promise<void>>();

  constructor(readonly root: string) {}

  dir(sandboxId: string): string {
    return join(this.root, sandboxId);
  }

  /** On the event loop: one mkdir at the head of every create, where a trip through the libuv pool costs more. */
  create(sandboxId: string): string {
    const dir = this.dir(sandboxId);
    mkdirSync(dir, { recursive: true });
    return dir;
  }

  save(state: SandboxStateFile): Promise<void> {
    const dir = this.dir(state.sandboxId);
    return this.inTurn(state.sandboxId, async () => {
      const tmp = join(dir, 'state.json.tmp');
      await writeFile(tmp, JSON.stringify(state));
      await rename(tmp, join(dir, 'state.json'));
    });
  }

  remove(sandboxId: string): Promise<void> {
    return this.inTurn(sandboxId, () => rm(this.dir(sandboxId), { recursive: true, force: true }));
  }

  private inTurn(sandboxId: string, work: () => Promise<void>): Promise<void> {
    const done = (this.turns.get(sandboxId) ?? Promise.resolve()).then(work);
    const turn = done.catch(() => undefined);
    this.turns.set(sandboxId, turn);
    void turn.then(() => {
      if (this.turns.get(sandboxId) === turn) this.turns.delete(sandboxId);
    });
    return done;
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
