import { describe, expect, it } from 'vitest';
import { bootImagePage, bootPageIsZero, bootSeed } from './boot-image.js';

describe('cold boot image', () => {
  it('is a function of the machine configuration only', () => {
    const seed = bootSeed({ vcpuCount: 2, memSizeMib: 64 });
    expect(bootSeed({ vcpuCount: 2, memSizeMib: 64 })).toBe(seed);
    expect(bootSeed({ vcpuCount: 1, memSizeMib: 64 })).not.toBe(seed);
    const a = new Uint8Array(4096);
    const b = new Uint8Array(4096);
    bootImagePage(seed, 7, a);
    bootImagePage(seed, 7, b);
    expect(Buffer.from(a).equals(Buffer.from(b))).toBe(true);
  });

  it('leaves about one page in four zero and makes the others differ', () => {
    const seed = bootSeed({ vcpuCount: 1, memSizeMib: 16 });
    const seen = new Set<string>();
    let zero = 0;
    const page = new Uint8Array(4096);
    for (let i = 0; i < 1024; i++) {
      bootImagePage(seed, i, page);
      const isZero = page.every((x) => x === 0);
      expect(isZero).toBe(bootPageIsZero(seed, i));
      if (isZero) zero++;
      else seen.add(Buffer.from(page).toString('base64'));
    }
    expect(zero).toBeGreaterThan(150);
    expect(zero).toBeLessThan(360);
    expect(seen.size).toBe(1024 - zero);
  });
});
