import { mkdir, readFile, rename, writeFile } from 'node:fs/promises';
import { dirname } from 'node:path';
import { SandboxConfig } from '#proto/orchestrator';

/** What the node remembers of a sandbox it paused, so a request can resume it (auto_resume). */
export interface PausedSandbox {
  sandboxId: string;
  /** The config it ran with (build id still the one it ran from). */
  config: SandboxConfig;
  /** The build its pause made: the one to resume from. */
  buildId: string;
  /** How long it was set to run (end − start), given again on an auto-resume. */
  timeoutMs: number;
  pausedAt: string;
}

/**
 * Sandboxes paused on this node, kept in one JSON file so an orchestrator restart still knows
 * what a request may resume. An entry goes when the sandbox runs again (resumed by anyone) or
 * is removed; the upstream control plane remains the owner of paused sandboxes.
 */
export class PausedSandboxes {
  private readonly entries = new Map<string, PausedSandbox>();
  private writing: Promise<void> = Promise.resolve();

  constructor(private readonly file: string) {}

  async load(): Promise<void> {
    let text: string;
    try {
      text = await readFile(this.file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw err;
    }
    const list = JSON.parse(text) as (Omit<PausedSandbox, 'config'> & { config: unknown })[];
    for (const e of list) this.entries.set(e.sandboxId, { ...e, config: SandboxConfig.fromJSON(e.config) });
  }

  get(sandboxId: string): PausedSandbox | undefined {
    return this.entries.get(sandboxId);
  }

  list(): PausedSandbox[] {
    return [...this.entries.values()];
  }

  set(entry: PausedSandbox): Promise<void> {
    this.entries.set(entry.sandboxId, entry);
    return this.save();
  }

  delete(sandboxId: string): Promise<void> {
    if (!this.entries.delete(sandboxId)) return Promise.resolve();
    return this.save();
  }

  /** Writes are queued so the file always ends as the last state (write, then rename: never torn). */
  private save(): Promise<void> {
    const body = JSON.stringify(
      this.list().map((e) => ({ ...e, config: SandboxConfig.toJSON(e.config) })),
      null,
      1,
    );
    this.writing = this.writing.then(async () => {
      await mkdir(dirname(this.file), { recursive: true });
      await writeFile(`${this.file}.tmp`, body);
      await rename(`${this.file}.tmp`, this.file);
    });
    return this.writing;
  }
}
