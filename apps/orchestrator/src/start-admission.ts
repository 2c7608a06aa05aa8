import { CapacityExhausted } from './orchestrator-errors.js';

/**
 * How many sandboxes may be starting at once on this node (E2B's orchestrator: 3). Starting a
 * VM is the node's costly moment (snapshot load, the first wave of page faults); more at once
 * only makes each slower. A resume of a paused sandbox waits its turn up to `waitMs` (E2B: 15 s),
 * because its user is waiting for that very sandbox; a fresh create is refused at once with
 * RESOURCE_EXHAUSTED so the control plane places it on another node.
 */
export class StartAdmission {
  private startingNow = 0;
  private readonly waiters: { admit: () => void }[] = [];

  constructor(
    readonly limit: number,
    readonly waitMs: number,
  ) {}

  get starting(): number {
    return this.startingNow;
  }

  get waiting(): number {
    return this.waiters.length;
  }

  /** A turn to start; call the returned function once the start is over (either way). */
  async enter(kind: 'create' | 'resume'): Promise<() => void> {
    if (this.startingNow < this.limit && this.waiters.length === 0) {
      this.startingNow++;
      return this.releaser();
    }
    if (kind === 'create' || this.waitMs === 0) {
      throw new CapacityExhausted('sandboxes starting at once', this.limit);
    }
    await new Promise<void>((resolve, reject) => {
      const waiter = {
        admit: () => {
          clearTimeout(timer);
          resolve();
        },
      };
      const timer = setTimeout(() => {
        this.waiters.splice(this.waiters.indexOf(waiter), 1);
        reject(new CapacityExhausted(`sandboxes starting at once (a resume waited ${this.waitMs} ms)`, this.limit));
      }, this.waitMs);
      this.waiters.push(waiter);
    });
    return this.releaser();
  }

  private releaser(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      const next = this.waiters.shift();
      // The turn passes straight to the next waiter, so the count stays the same.
      if (next) next.admit();
      else this.startingNow--;
    };
  }
}
