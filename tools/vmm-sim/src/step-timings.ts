/**
 * Milliseconds per step of one operation (a snapshot load), logged with its outcome so the
 * bench can show where a load's time goes.
 */
export class StepTimings {
  private last = performance.now();
  private readonly started = this.last;
  readonly steps: Record<string, number> = {};

  /** Ends the step `name` now (the time since the previous mark). */
  mark(name: string): void {
    const now = performance.now();
    this.steps[name] = Math.round((now - this.last) * 100) / 100;
    this.last = now;
  }

  /**
   * Records `name` as the time since `startedAt` without ending the current step: for steps run
   * side by side (their times overlap; the mark after them has the wall time of all).
   */
  record(name: string, startedAt: number): void {
    this.steps[name] = Math.round((performance.now() - startedAt) * 100) / 100;
  }

  /** Every step, and the total since construction, rounded to 0.01 ms. */
  done(): Record<string, number> {
    return { ...this.steps, total: Math.round((performance.now() - this.started) * 100) / 100 };
  }
}
