import { describe, expect, it } from 'vitest';
import { formatBytes, ProgressRenderer, renderLine, type ProgressEvent } from './progress-bar.js';

const MiB = 1024 * 1024;

function output(isTTY: boolean) {
  const writes: string[] = [];
  return { writes, out: { isTTY, columns: 100, write: (t: string) => writes.push(t) } };
}

function ev(step: string, stepIndex: number, done: number, total: number, message = ''): ProgressEvent {
  return { step, stepIndex, stepCount: 4, done, total, message };
}

/** A template build as the orchestrator streams it: bytes of the rootfs copy, then three steps. */
function build(r: ProgressRenderer) {
  for (let done = 0; done <= 8 * MiB; done += MiB) r.update(ev('rootfs', 1, done, 8 * MiB));
  r.update(ev('boot', 2, 0, 1, 'cold boot: 1 vCPU, 128 MiB'));
  r.update(ev('snapshot', 3, 0, 1, 'pause, Full snapshot'));
  r.update(ev('build', 4, 0, 1, 'upload'));
  r.update(ev('build', 4, 1, 1, 'done'));
  r.finish();
}

describe('progress bar', () => {
  it('formats byte counts in binary units', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KiB');
    expect(formatBytes(6 * MiB)).toBe('6.0 MiB');
    expect(formatBytes(3 * 1024 * MiB)).toBe('3.0 GiB');
  });

  it('draws a bar proportional to the bytes done, within the terminal width', () => {
    const half = renderLine(ev('rootfs', 1, 4 * MiB, 8 * MiB));
    expect(half).toBe(`[1/4] rootfs    [${'█'.repeat(12)}${'░'.repeat(12)}]  50%  4.0 MiB / 8.0 MiB`);
    expect(renderLine(ev('rootfs', 1, 8 * MiB, 8 * MiB))).toContain(`[${'█'.repeat(24)}] 100%`);
    expect(renderLine(ev('boot', 2, 0, 1, 'cold boot'))).toBe('[2/4] boot      … cold boot');
    expect(renderLine(ev('rootfs', 1, 1, 8 * MiB, 'x'.repeat(200)), 60).length).toBeLessThanOrEqual(59);
  });

  it('on a terminal redraws one line per step in place and ends each with its time', () => {
    const { writes, out } = output(true);
    let t = 0;
    const r = new ProgressRenderer(out, 'tty', () => (t += 100));
    build(r);
    const text = writes.join('');
    const finished = text.split('\n').map((l) => l.slice(l.lastIndexOf('\r') + 1).replace('\x1b[K', ''));
    expect(finished).toEqual([
      expect.stringMatching(/^\[1\/4\] rootfs {4}done 8\.0 MiB in \d+\.\d s$/),
      expect.stringMatching(/^\[2\/4\] boot {6}done in/),
      expect.stringMatching(/^\[3\/4\] snapshot {2}done in/),
      expect.stringMatching(/^\[4\/4\] build {5}done in/),
      '',
    ]);
    // The copy was redrawn once per MiB (9 distinct lines), all on the same terminal line.
    expect(writes.filter((w) => w.includes('[1/4] rootfs    [')).length).toBe(9);
    expect(text.split('\n')[0]).toContain('\r\x1b[K');
  });

  it('without a terminal (or with --json) writes plain lines: starts, quarters, ends', () => {
    const { writes, out } = output(false);
    build(ProgressRenderer.for(out, false));
    const text = writes.join('');
    expect(text.includes('\r') || text.includes('\x1b')).toBe(false);
    expect(text.trimEnd().split('\n')).toEqual([
      '[1/4] rootfs    started',
      '[1/4] rootfs    25% 2.0 MiB / 8.0 MiB',
      '[1/4] rootfs    50% 4.0 MiB / 8.0 MiB',
      '[1/4] rootfs    75% 6.0 MiB / 8.0 MiB',
      '[1/4] rootfs    100% 8.0 MiB / 8.0 MiB',
      expect.stringMatching(/^\[1\/4\] rootfs {4}done 8\.0 MiB in/),
      '[2/4] boot      cold boot: 1 vCPU, 128 MiB',
      expect.stringMatching(/^\[2\/4\] boot {6}done in/),
      '[3/4] snapshot  pause, Full snapshot',
      expect.stringMatching(/^\[3\/4\] snapshot {2}done in/),
      '[4/4] build     upload',
      expect.stringMatching(/^\[4\/4\] build {5}done in/),
    ]);
    const tty = output(true);
    expect(ProgressRenderer.for(tty.out, true)).toBeInstanceOf(ProgressRenderer);
    ProgressRenderer.for(tty.out, true).update(ev('boot', 2, 0, 1, 'x'));
    expect(tty.writes.join('').includes('\x1b')).toBe(false);
  });

  it('marks the step that was running when the work failed', () => {
    const { writes, out } = output(false);
    const r = new ProgressRenderer(out, 'lines');
    r.update(ev('boot', 2, 0, 1, 'cold boot'));
    r.finish('failed');
    expect(writes.at(-1)).toMatch(/^\[2\/4\] boot {6}failed in/);
    r.finish('failed');
    expect(writes.length).toBe(2);
  });
});
