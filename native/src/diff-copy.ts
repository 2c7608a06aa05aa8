import { sbx } from './native-library.js';
import { SyscallError } from './syscall-error.js';

const sbxDiffCopy = sbx.func(
  'int64_t sbx_diff_copy(int src_fd, int out_fd, const uint64_t *runs, uint64_t n_runs, uint64_t page_size, uint64_t parent_addr, int sync_out, uint8_t *classes, uint64_t *counts)',
);

/** What a page of the diff became (`classes` of DiffCopyResult). */
export const DiffPage = { STORED: 0, ZERO: 1, PARENT: 2 } as const;

export interface DiffCopyOptions {
  /** Where the guest's memory is read: a memfd, or a memory file at guest offsets. */
  sourceFd: number;
  /** A fresh file: the stored pages are appended from its start, in order. */
  outFd: number;
  /** Byte ranges of guest memory to export: ascending, page-aligned starts. */
  runs: ReadonlyArray<{ offset: number; length: number }>;
  pageSize: number;
  /** Address where the parent build's memory is mapped in this process (valid over the runs), or 0. */
  parentAddress?: number;
  /** fdatasync the output before answering (writeback is started along the way). */
  sync: boolean;
}

export interface DiffCopyResult {
  /** One per page of the runs, in order: DiffPage.STORED, ZERO or PARENT. */
  classes: Uint8Array;
  storedPages: number;
  zeroPages: number;
  parentPages: number;
  bytesWritten: number;
  /** CPU time the copying thread used (µs): the cost apart from waiting for a loaded machine. */
  cpuMicros: number;
}

/** The source was shorter than a run: `endedAt` is where it ended. */
export class SourceEnded extends Error {
  constructor(readonly endedAt: number) {
    super(`memory ends at ${endedAt}`);
    this.name = 'SourceEnded';
  }
}

/**
 * Copies the pages of `runs` from the source to the diff file on a libuv worker thread (C,
 * `c/lib/sbx_diff_copy.c`): all-zero pages and pages equal to the parent's are classified and
 * skipped, stored pages go out in one writev per window. The event loop does nothing per page.
 */
export function diffCopy(o: DiffCopyOptions): Promise<DiffCopyResult> {
  const runs = new BigUint64Array(o.runs.length * 2);
  let pages = 0;
  o.runs.forEach((r, i) => {
    runs[2 * i] = BigInt(r.offset);
    runs[2 * i + 1] = BigInt(r.length);
    pages += Math.ceil(r.length / o.pageSize);
  });
  const classes = new Uint8Array(Math.max(1, pages));
  const counts = new BigUint64Array(6);
  return new Promise((resolve, reject) => {
    sbxDiffCopy.async(
      o.sourceFd,
      o.outFd,
      runs,
      o.runs.length,
      o.pageSize,
      o.parentAddress ?? 0,
      o.sync ? 1 : 0,
      classes,
      counts,
      (err: unknown, rc: number | bigint) => {
        if (err) return reject(err as Error);
        const n = Number(rc);
        if (n === -61 /* ENODATA */) return reject(new SourceEnded(Number(counts[4])));
        if (n < 0) return reject(new SyscallError('diff copy', -n, `fd ${o.sourceFd} → fd ${o.outFd}`));
        resolve({
          classes: classes.subarray(0, pages),
          storedPages: Number(counts[0]),
          zeroPages: Number(counts[1]),
          parentPages: Number(counts[2]),
          bytesWritten: Number(counts[3]),
          cpuMicros: Number(counts[5]),
        });
      },
    );
  });
}
