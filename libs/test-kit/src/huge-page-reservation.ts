import {
  closeSync,
  mkdirSync,
  openSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { randomUUID } from 'node:crypto';

/**
 * 2 MiB hugetlb pages for a test that needs them: raises `vm.nr_hugepages` by what the test
 * asks for (root only) and gives them back when it is done, so huge-page tests run on any
 * machine instead of being skipped where no pages were reserved. Test files run in parallel
 * processes, so the read-modify-write of the sysctl happens under a lock directory, and a
 * ledger records every holder (pid and pages): the setting goes back to what it was before the
 * first holder once the last one releases, also when a holder died without releasing.
 */
export interface HugePageReservation {
  readonly pages: number;
  /** Idempotent; also runs when the process exits. */
  release(): void;
}

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
const LEDGER = '/run/sbx-test-huge-pages.json';
const LOCK = '/run/sbx-test-huge-pages.lock';
const STALE_LOCK_MS = 30_000;

interface Ledger {
  /** nr_hugepages before the first holder. */
  base: number;
  holders: Record<string, { pid: number; pages: number }>;
}

export class HugePagesUnavailable extends Error {
  readonly code = 'HUGE_PAGES_UNAVAILABLE';
  constructor(
    readonly wanted: number,
    readonly got: number,
    why: string,
  ) {
    super(`cannot reserve ${wanted} 2 MiB huge pages (vm.nr_hugepages): ${why}`);
    this.name = 'HugePagesUnavailable';
  }
}

export function reserveHugePages(pages: number): HugePageReservation {
  if (!Number.isInteger(pages) || pages <= 0) throw new RangeError(`huge pages to reserve: ${pages}`);
  if (process.getuid?.() !== 0) throw new HugePagesUnavailable(pages, 0, 'writing vm.nr_hugepages needs root');
  const token = randomUUID();
  withLock(() => {
    const ledger = readLedger();
    ledger.holders[token] = { pid: process.pid, pages };
    const target = apply(ledger);
    const total = hugePagesTotal();
    if (total < target) {
      // The kernel found fewer free 2 MiB ranges than asked: give back what we took.
      delete ledger.holders[token];
      apply(ledger);
      throw new HugePagesUnavailable(
        pages,
        Math.max(0, total - (target - pages)),
        `the kernel allocated ${total} of ${target}`,
      );
    }
  });
  let released = false;
  const release = () => {
    if (released) return;
    released = true;
    process.off('exit', release);
    withLock(() => {
      const ledger = readLedger();
      delete ledger.holders[token];
      apply(ledger);
    });
  };
  process.on('exit', release);
  return { pages, release };
}

/** Writes base + live holders' pages (dropping dead holders), or the base and no ledger when none is left. */
function apply(ledger: Ledger): number {
  for (const [token, h] of Object.entries(ledger.holders)) if (!alive(h.pid)) delete ledger.holders[token];
  const held = Object.values(ledger.holders).reduce((n, h) => n + h.pages, 0);
  const target = ledger.base + held;
  writeFileSync(NR_HUGEPAGES, `${target}\n`);
  if (held === 0) rmSync(LEDGER, { force: true });
  else {
    writeFileSync(`${LEDGER}.tmp`, JSON.stringify(ledger));
    renameSync(`${LEDGER}.tmp`, LEDGER);
  }
  return target;
}

function readLedger(): Ledger {
  try {
    return JSON.parse(readFileSync(LEDGER, 'utf8')) as Ledger;
  } catch {
    return { base: Number(readFileSync(NR_HUGEPAGES, 'utf8').trim()), holders: {} };
  }
}

function hugePagesTotal(): number {
  return Number(/HugePages_Total:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

const sleeper = new Int32Array(new SharedArrayBuffer(4));

function withLock(fn: () => void): void {
  for (;;) {
    try {
      mkdirSync(LOCK);
      break;
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
      let owner = 0;
      try {
        owner = Number(readFileSync(`${LOCK}/pid`, 'utf8'));
      } catch {
        // the owner has not written its pid yet
      }
      let age: number;
      try {
        age = Date.now() - statSync(LOCK).mtimeMs;
      } catch {
        continue;
      }
      if ((owner > 0 && !alive(owner)) || age > STALE_LOCK_MS) rmSync(LOCK, { recursive: true, force: true });
      else Atomics.wait(sleeper, 0, 0, 10);
    }
  }
  try {
    const fd = openSync(`${LOCK}/pid`, 'w');
    writeSync(fd, String(process.pid));
    closeSync(fd);
    fn();
  } finally {
    rmSync(LOCK, { recursive: true, force: true });
  }
}
