import { existsSync, readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { MAP_ANONYMOUS, MAP_HUGETLB, MAP_POPULATE, MAP_PRIVATE, PROT_READ, PROT_WRITE, mmap, munmap } from '#native';
import { reserveHugePages } from './huge-page-reservation.js';

const HUGE = 2 * 1024 * 1024;

function ledgerHolds(pid: number): boolean {
  if (!existsSync('/run/sbx-test-huge-pages.json')) return false;
  const ledger = JSON.parse(readFileSync('/run/sbx-test-huge-pages.json', 'utf8')) as {
    holders: Record<string, { pid: number }>;
  };
  return Object.values(ledger.holders).some((h) => h.pid === pid);
}

describe('huge page reservation for tests', () => {
  it('reserves 2 MiB pages a MAP_HUGETLB mapping can populate, and gives them back', () => {
    const reservation = reserveHugePages(2);
    try {
      expect(ledgerHolds(process.pid)).toBe(true);
      const addr = mmap(0, 2 * HUGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE);
      munmap(addr, 2 * HUGE);
    } finally {
      reservation.release();
    }
    expect(ledgerHolds(process.pid)).toBe(false);
    reservation.release();
  });

  it('refuses nonsense', () => {
    expect(() => reserveHugePages(0)).toThrow(RangeError);
  });
});
