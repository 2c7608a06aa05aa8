import { describe, expect, it } from 'vitest';
import { parseStartTouch, START_TOUCH_VAR } from './start-touch.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const PAGE = 4096;

function pagesOf(runs: Array<[number, number]>): number[] {
  return runs.flatMap(([offset, length]) => Array.from({ length: length / PAGE }, (_, i) => offset / PAGE + i));
}

describe('SBX_SIM_START_TOUCH', () => {
  it('names exactly the MiB asked, in page-aligned runs of 256 KiB-4 MiB inside memory, none overlapping', () => {
    const { runs, bytes } = parseStartTouch('100', 1024 * MiB, PAGE);
    expect(bytes).toBe(100 * MiB);
    expect(runs.reduce((n, [, length]) => n + length, 0)).toBe(100 * MiB);
    const pages = pagesOf(runs);
    expect(new Set(pages).size).toBe(pages.length);
    for (const [offset, length] of runs) {
      expect(offset % PAGE).toBe(0);
      expect(offset + length).toBeLessThanOrEqual(1024 * MiB);
      expect(length).toBeLessThanOrEqual(4 * MiB);
    }
    // Only the last run may be cut short to hit the total.
    for (const [, length] of runs.slice(0, -1)) expect(length).toBeGreaterThanOrEqual(256 * KiB);
    // Spread over memory and not in address order (a start jumps around).
    const offsets = runs.map(([o]) => o);
    expect(offsets).not.toEqual([...offsets].sort((a, b) => a - b));
    expect(Math.max(...offsets) - Math.min(...offsets)).toBeGreaterThan(512 * MiB);
  });

  it('gives the same runs for the same spec and others for another seed; run lengths follow the spec', () => {
    const a = parseStartTouch('8:64-128:7', 256 * MiB, PAGE);
    expect(parseStartTouch('8:64-128:7', 256 * MiB, PAGE)).toEqual(a);
    expect(parseStartTouch('8:64-128:8', 256 * MiB, PAGE).runs).not.toEqual(a.runs);
    expect(a.bytes).toBe(8 * MiB);
    for (const [, length] of a.runs.slice(0, -1)) {
      expect(length).toBeGreaterThanOrEqual(64 * KiB);
      expect(length).toBeLessThanOrEqual(128 * KiB);
    }
    // Fractions of a MiB are rounded to whole pages.
    expect(parseStartTouch('0.01', 64 * MiB, PAGE).bytes).toBe(3 * PAGE);
    // Huge pages: whole 2 MiB pages.
    const huge = parseStartTouch('10:2048-4096', 1024 * MiB, 2 * MiB);
    expect(huge.bytes).toBe(10 * MiB);
    for (const [offset, length] of huge.runs) expect([offset % (2 * MiB), length % (2 * MiB)]).toEqual([0, 0]);
  });

  it.each([
    ['', 'the MiB to touch must be a positive number'],
    ['abc', 'the MiB to touch must be a positive number'],
    ['-5', 'the MiB to touch must be a positive number'],
    ['10:256', 'runs must be <minKiB>-<maxKiB>'],
    ['10:512-256', 'the longest run is shorter than the shortest'],
    ['10:0-256', 'the shortest run must be a positive number'],
    ['10:256-512:x', 'the seed must be an integer'],
    ['10:256-512:1:2', 'too many fields'],
    ['40', "more than half of the guest's 64 MiB"],
    ['4:256-32768', 'runs longer than a quarter of guest memory'],
  ])('refuses %j with a clear message', (value, why) => {
    expect(() => parseStartTouch(value, 64 * MiB, PAGE)).toThrow(why);
    expect(() => parseStartTouch(value, 64 * MiB, PAGE)).toThrow(START_TOUCH_VAR);
  });
});
