import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DirtyBitmap } from './dirty-bitmap.js';

describe('DirtyBitmap', () => {
  it('sets, clears, counts and iterates in ascending order', () => {
    const b = new DirtyBitmap(20);
    for (const i of [17, 3, 3, 0, 8]) b.set(i);
    expect(b.count).toBe(4);
    expect([...b]).toEqual([0, 3, 8, 17]);
    b.clear(3);
    expect(b.has(3)).toBe(false);
    expect(b.has(17)).toBe(true);
    expect(b.count).toBe(3);
    expect(() => b.set(20)).toThrow(RangeError);
  });

  it('marks every block a byte range touches', () => {
    const b = DirtyBitmap.forSize(10 * 4096, 4096);
    b.setBytes(4095, 2, 4096);
    expect([...b]).toEqual([0, 1]);
  });

  it('round-trips through bytes and rejects corrupt input', () => {
    fc.assert(
      fc.property(
        fc
          .integer({ min: 0, max: 300 })
          .chain((n) => fc.tuple(fc.constant(n), fc.uniqueArray(fc.nat(Math.max(0, n - 1)), { maxLength: n }))),
        ([n, set]) => {
          const b = new DirtyBitmap(n);
          for (const i of n === 0 ? [] : set) b.set(i);
          const back = DirtyBitmap.fromBytes(b.toBytes());
          expect([...back]).toEqual([...b]);
          expect(back.count).toBe(b.count);
          expect(back.blockCount).toBe(n);
        },
      ),
    );
    const bytes = new DirtyBitmap(3).toBytes();
    bytes[16] = 0xff;
    expect(() => DirtyBitmap.fromBytes(bytes)).toThrow(/past the block count/);
    expect(() => DirtyBitmap.fromBytes(Buffer.from('nope'))).toThrow(/bad magic/);
    expect(() => DirtyBitmap.fromBytes(bytes.subarray(0, 16))).toThrow(/need 17 bytes/);
  });
});
