/**
 * Progress of long operator work (a template build: rootfs copy, cold boot, snapshot, writing
 * the build). On a terminal one line per step, redrawn in place with a bar; otherwise (a pipe,
 * a log, or --json) plain lines: each step's start, quarter milestones of byte counts, and its
 * end. Always written to stderr by the commands, so --json output on stdout stays parseable.
 */

export interface ProgressEvent {
  step: string;
  /** 1-based position of the step among stepCount. */
  stepIndex: number;
  stepCount: number;
  /** Bytes when total > 1; 0 then 1 for steps without a measure. */
  done: number;
  total: number;
  message: string;
}

export interface ProgressOutput {
  write(text: string): unknown;
  isTTY?: boolean;
  columns?: number;
}

const BAR_WIDTH = 24;
const STEP_WIDTH = 9;

export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}

/** Whether the step counts bytes (a bar makes sense) rather than just starting and ending. */
function measured(e: ProgressEvent): boolean {
  return e.total > 1;
}

function fraction(e: ProgressEvent): number {
  if (e.total <= 0) return 0;
  return Math.min(1, Math.max(0, e.done / e.total));
}

function prefix(e: Pick<ProgressEvent, 'step' | 'stepIndex' | 'stepCount'>): string {
  return `[${e.stepIndex}/${e.stepCount}] ${e.step.padEnd(STEP_WIDTH)}`;
}

/** One terminal line for an event: `[1/4] rootfs    [██████░░░░] 50%  3.0 MiB / 6.0 MiB`. */
export function renderLine(e: ProgressEvent, columns = 80): string {
  let line: string;
  if (measured(e)) {
    const f = fraction(e);
    const filled = Math.round(f * BAR_WIDTH);
    const bar = '█'.repeat(filled) + '░'.repeat(BAR_WIDTH - filled);
    const pct = `${Math.floor(f * 100)}%`.padStart(4);
    line = `${prefix(e)} [${bar}] ${pct}  ${formatBytes(e.done)} / ${formatBytes(e.total)}`;
    if (e.message) line += `  ${e.message}`;
  } else line = `${prefix(e)} … ${e.message}`.trimEnd();
  // A line longer than the terminal wraps, and \r then redraws only its last row.
  return line.length > columns - 1 ? line.slice(0, Math.max(10, columns - 2)) + '…' : line;
}

export class ProgressRenderer {
  private current: (ProgressEvent & { startedAt: number }) | undefined;
  private lastDrawn = '';
  private lastQuarter = -1;

  constructor(
    private readonly out: ProgressOutput,
    private readonly mode: 'tty' | 'lines',
    private readonly now: () => number = () => performance.now(),
  ) {}

  /** `tty` only on a terminal and without --json. */
  static for(out: ProgressOutput, json: boolean): ProgressRenderer {
    return new ProgressRenderer(out, out.isTTY && !json ? 'tty' : 'lines');
  }

  update(e: ProgressEvent): void {
    if (!this.current || this.current.step !== e.step || this.current.stepIndex !== e.stepIndex) {
      this.endStep('done');
      this.current = { ...e, startedAt: this.now() };
      this.lastQuarter = -1;
      if (this.mode === 'lines') this.out.write(`${prefix(e)} ${e.message || 'started'}\n`.replace(/ +\n$/, '\n'));
    }
    this.current = { ...e, startedAt: this.current.startedAt };
    if (this.mode === 'tty') {
      const line = renderLine(e, this.out.columns || 80);
      if (line !== this.lastDrawn) this.out.write(`\r\x1b[K${line}`);
      this.lastDrawn = line;
    } else if (measured(e)) {
      const quarter = Math.floor(fraction(e) * 4);
      if (quarter > this.lastQuarter && quarter > 0) {
        this.out.write(
          `${prefix(e)} ${Math.floor(fraction(e) * 100)}% ${formatBytes(e.done)} / ${formatBytes(e.total)}\n`,
        );
      }
      this.lastQuarter = Math.max(this.lastQuarter, quarter);
    }
  }

  /** Ends the current step's line: `done` after the last event, `failed` or `cancelled` otherwise. */
  finish(outcome: 'done' | 'failed' | 'cancelled' = 'done'): void {
    this.endStep(outcome);
  }

  private endStep(outcome: 'done' | 'failed' | 'cancelled'): void {
    const step = this.current;
    if (!step) return;
    this.current = undefined;
    this.lastDrawn = '';
    const seconds = ((this.now() - step.startedAt) / 1000).toFixed(1);
    const size = measured(step) ? ` ${formatBytes(step.total)}` : '';
    const line = `${prefix(step)} ${outcome}${outcome === 'done' ? size : ''} in ${seconds} s\n`;
    this.out.write(this.mode === 'tty' ? `\r\x1b[K${line}` : line);
  }
}
