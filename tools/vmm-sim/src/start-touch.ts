/**
 * A guest's working set at start, for benchmarks: `SBX_SIM_START_TOUCH=<MiB>[:<minKiB>-<maxKiB>[:<seed>]]`
 * (set by `/init`, kept in the snapfile) makes `/init` load one byte of every page of `<MiB>` of
 * guest memory before it answers, as a kernel and its processes fault their working set in while
 * a resumed guest starts. The pages lie in runs of `minKiB..maxKiB` (default 256-4096) at
 * pseudo-random page-aligned places, no two overlapping, the runs in pseudo-random order and each
 * run's pages in order (the pattern of bench/cold-resume). The same spec and memory size always
 * give the same runs, so a benchmark can resume the same start again and again.
 */
export const START_TOUCH_VAR = 'SBX_SIM_START_TOUCH';

const KiB = 1024;
const MiB = 1024 * KiB;
const DEFAULT_RUNS = { min: 256 * KiB, max: 4 * MiB };
const DEFAULT_SEED = 20261202;

export interface StartTouch {
  /** `[offset, length]` in bytes, page-aligned, in the order the guest touches them. */
  runs: Array<[number, number]>;
  /** Sum of the runs' lengths: the bytes (whole pages) the start touches. */
  bytes: number;
}

export class StartTouchInvalid extends Error {
  constructor(value: string, why: string) {
    super(`${START_TOUCH_VAR}="${value}": ${why} (want <MiB>[:<minKiB>-<maxKiB>[:<seed>]], e.g. 100:256-4096)`);
  }
}

/** xorshift32: the same runs for the same seed. */
function random(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 2 ** 32;
  };
}

function positive(value: string, text: string | undefined, what: string): number {
  const n = Number(text);
  if (text === undefined || text.trim() === '' || !Number.isFinite(n) || n <= 0)
    throw new StartTouchInvalid(value, `${what} must be a positive number`);
  return n;
}

/** The runs `value` names over a guest of `memorySize` bytes with `pageSize` pages. */
export function parseStartTouch(value: string, memorySize: number, pageSize: number): StartTouch {
  const [mib, runText, seedText, ...rest] = value.split(':');
  if (rest.length > 0) throw new StartTouchInvalid(value, 'too many fields');
  const pages = (bytes: number) => Math.max(1, Math.round(bytes / pageSize));
  const touchPages = pages(positive(value, mib, 'the MiB to touch') * MiB);
  let minPages = pages(DEFAULT_RUNS.min);
  let maxPages = pages(DEFAULT_RUNS.max);
  if (runText !== undefined) {
    const [lo, hi, ...more] = runText.split('-');
    if (more.length > 0 || hi === undefined) throw new StartTouchInvalid(value, 'runs must be <minKiB>-<maxKiB>');
    minPages = pages(positive(value, lo, 'the shortest run') * KiB);
    maxPages = pages(positive(value, hi, 'the longest run') * KiB);
    if (maxPages < minPages) throw new StartTouchInvalid(value, 'the longest run is shorter than the shortest');
  }
  let seed = DEFAULT_SEED;
  if (seedText !== undefined) {
    seed = Number(seedText);
    if (!Number.isSafeInteger(seed) || seed < 0) throw new StartTouchInvalid(value, 'the seed must be an integer ≥ 0');
  }
  const memoryPages = Math.floor(memorySize / pageSize);
  // At most half of memory: runs are placed at random where they fit, which needs room to spare.
  if (touchPages * 2 > memoryPages)
    throw new StartTouchInvalid(value, `more than half of the guest's ${memorySize / MiB} MiB`);
  if (maxPages > memoryPages / 4) throw new StartTouchInvalid(value, 'runs longer than a quarter of guest memory');

  const next = random(seed);
  const taken = new Uint8Array(memoryPages);
  const runs: Array<[number, number]> = [];
  let left = touchPages;
  while (left > 0) {
    const length = Math.min(left, minPages + Math.floor(next() * (maxPages - minPages + 1)));
    const first = Math.floor(next() * (memoryPages - length + 1));
    let free = true;
    for (let p = first; p < first + length && free; p++) free = taken[p] === 0;
    if (!free) continue;
    taken.fill(1, first, first + length);
    runs.push([first * pageSize, length * pageSize]);
    left -= length;
  }
  return { runs, bytes: touchPages * pageSize };
}
