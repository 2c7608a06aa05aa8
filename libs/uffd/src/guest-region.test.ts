import { describe, expect, it } from 'vitest';
import {
  addressOfFileOffset,
  fileOffsetOf,
  pageAddress,
  PAGE_2M,
  PAGE_4K,
  regionOf,
  regionsSize,
} from './guest-region.js';

describe('address to memory-file offset', () => {
  const regions = [
    { base: 0x7f0000000000, size: 16 * PAGE_4K, offset: 0, pageSize: PAGE_4K },
    { base: 0x7f1000000000, size: 4 * PAGE_2M, offset: 16 * PAGE_4K, pageSize: PAGE_2M },
  ];

  it('serves a fault at a from r.offset + (a - base), rounded down to the page', () => {
    const r0 = regionOf(regions, 0x7f0000000000 + 5 * PAGE_4K + 123)!;
    expect(fileOffsetOf(r0, 0x7f0000000000 + 5 * PAGE_4K + 123)).toBe(5 * PAGE_4K);
    const a = 0x7f1000000000 + PAGE_2M + 77777;
    const r1 = regionOf(regions, a)!;
    expect(r1).toBe(regions[1]);
    expect(pageAddress(r1, a)).toBe(0x7f1000000000 + PAGE_2M);
    expect(fileOffsetOf(r1, a)).toBe(16 * PAGE_4K + PAGE_2M);
  });

  it('knows addresses outside every region and maps offsets back', () => {
    expect(regionOf(regions, 0x7f0000000000 + 16 * PAGE_4K)).toBeUndefined();
    expect(regionOf(regions, 0x7f0000000000 - 1)).toBeUndefined();
    expect(addressOfFileOffset(regions, 16 * PAGE_4K + 10)).toBe(0x7f1000000000 + 10);
    expect(addressOfFileOffset(regions, regionsSize(regions))).toBeUndefined();
  });
});
