import { TypedError } from './typed-error.js';

/**
 * One per sandbox, and one per service start (service-start.ts): each resource is pushed as it is taken; unwinding gives them back in
 * reverse order, whatever step failed. A failing undo does not stop the ones below it.
 */
export interface TeardownEntry {
  /** The resource, named for logs and errors: 'slot', 'device', 'uffd', 'vmm', 'dns'. */
  name: string;
  undo: () => Promise<void>;
}

export interface TeardownFailure {
  name: string;
  error: unknown;
}

export class TeardownStack {
  private entries: TeardownEntry[] = [];
  private unwinding: Promise<TeardownFailure[]> | undefined;

  push(name: string, undo: () => Promise<void>): void {
    if (this.unwinding) throw new Error(`teardown already running; cannot take '${name}'`);
    this.entries.push({ name, undo });
  }

  /** Drops an entry without running it: the resource was handed over or given back on purpose. */
  forget(name: string): boolean {
    const index = this.entries.map((e) => e.name).lastIndexOf(name);
    if (index < 0) return false;
    this.entries.splice(index, 1);
    return true;
  }

  /** Runs one entry now (e.g. stop the VMM before exporting the device) and removes it. */
  async release(name: string): Promise<void> {
    const index = this.entries.map((e) => e.name).lastIndexOf(name);
    if (index < 0) return;
    const [entry] = this.entries.splice(index, 1);
    await entry!.undo();
  }

  has(name: string): boolean {
    return this.entries.some((e) => e.name === name);
  }

  get names(): string[] {
    return this.entries.map((e) => e.name);
  }

  /** Runs every undo in reverse order once; later calls get the same result. */
  unwind(): Promise<TeardownFailure[]> {
    this.unwinding ??= (async () => {
      const failures: TeardownFailure[] = [];
      while (this.entries.length > 0) {
        const entry = this.entries.pop()!;
        try {
          await entry.undo();
        } catch (error) {
          failures.push({ name: entry.name, error });
        }
      }
      return failures;
    })();
    return this.unwinding;
  }
}

export function describeFailures(failures: TeardownFailure[]): string[] {
  return failures.map((f) => `${f.name}: ${f.error instanceof Error ? f.error.message : String(f.error)}`);
}

/** Stopping ran every entry, and these failed. */
export class TeardownFailed extends TypedError {
  readonly code = 'TEARDOWN_FAILED';
  constructor(readonly failures: TeardownFailure[]) {
    super(`teardown: ${describeFailures(failures).join('; ')}`);
  }
}
