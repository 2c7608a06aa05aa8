import { sbx } from './native-library.js';
import { check } from './syscall-error.js';

const sbxScan = sbx.func(
  'int64_t sbx_pagemap_scan(int fd, uint64_t start, uint64_t end, uint64_t flags, uint64_t mask, uint64_t inverted, uint64_t anyof, uint64_t ret, uint64_t *vec, uint64_t vec_len, uint64_t *walk_end)',
);

/** PAGE_IS_* categories of the PAGEMAP_SCAN ioctl (Linux 6.7+). */
export const PageCategory = {
  WPALLOWED: 1 << 0,
  WRITTEN: 1 << 1,
  FILE: 1 << 2,
  PRESENT: 1 << 3,
  SWAPPED: 1 << 4,
  PFNZERO: 1 << 5,
  HUGE: 1 << 6,
  SOFT_DIRTY: 1 << 7,
} as const;
export const PM_SCAN_WP_MATCHING = 1;
export const PM_SCAN_CHECK_WPASYNC = 2;

export interface PageRange {
  start: number;
  end: number;
  categories: number;
}

export interface PagemapScanOptions {
  flags?: number;
  /** Pages must have all of these categories (after inversion). */
  categoryMask: number;
  categoryInverted?: number;
  categoryAnyOf?: number;
  returnMask: number;
}

/**
 * Scans [start, end) of the address space behind a /proc/<pid>/pagemap fd and returns the
 * ranges matching the categories, merged by the kernel. Loops until the walk covers the range.
 */
export function pagemapScan(pagemapFd: number, start: number, end: number, options: PagemapScanOptions): PageRange[] {
  const ranges: PageRange[] = [];
  const vecLen = 4096;
  const vec = new BigUint64Array(vecLen * 3);
  const walkEnd = new BigUint64Array(1);
  let cursor = start;
  while (cursor < end) {
    const n = check(
      'PAGEMAP_SCAN',
      sbxScan(
        pagemapFd,
        cursor,
        end,
        options.flags ?? 0,
        options.categoryMask,
        options.categoryInverted ?? 0,
        options.categoryAnyOf ?? 0,
        options.returnMask,
        vec,
        vecLen,
        walkEnd,
      ),
    );
    for (let i = 0; i < n; i++) {
      ranges.push({ start: Number(vec[3 * i]), end: Number(vec[3 * i + 1]), categories: Number(vec[3 * i + 2]) });
    }
    const next = Number(walkEnd[0]);
    if (next <= cursor) break;
    cursor = next;
  }
  return ranges;
}
