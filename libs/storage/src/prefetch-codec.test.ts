import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { decodePrefetch, encodePrefetch, type PrefetchSet } from './prefetch-codec.js';
import { PrefetchInvalid } from './storage-errors.js';

// Written by hand from the layout in prefetch-codec.ts: little endian, no padding; the CRC-32
// is zlib's (IEEE) over the 12 entry bytes 03000000 00000000 ff000000.
const GOLDEN_HEX = [
  '5342585046544348', // "SBXPFTCH"
  '01000000', // version 1
  '00100000', // block size 4096
  '0000100000000000', // size 1 MiB
  '03000000', // 3 entries
  '6e124ed2', // crc32 of the entries (Python's zlib.crc32 gives the same)
  '03000000', // block 3 first
  '00000000', // then block 0
  'ff000000', // then block 255 (the last of 256)
].join('');
const GOLDEN: PrefetchSet = { blockSize: 4096, size: 1 << 20, blocks: [3, 0, 255] };

function problemOf(bytes: Uint8Array): string {
  try {
    decodePrefetch(bytes);
  } catch (err) {
    if (err instanceof PrefetchInvalid) return err.problem;
    throw err;
  }
  throw new Error('expected PrefetchInvalid');
}

describe('prefetch codec', () => {
  it('encodes the golden set byte for byte and decodes it back', () => {
    expect(encodePrefetch(GOLDEN).toString('hex')).toBe(GOLDEN_HEX);
    expect(decodePrefetch(Buffer.from(GOLDEN_HEX, 'hex'))).toEqual(GOLDEN);
  });

  it('keeps an empty set and a 2 MiB block size', () => {
    const set = { blockSize: 2 << 20, size: 64 << 20, blocks: [] };
    expect(decodePrefetch(encodePrefetch(set))).toEqual(set);
  });

  it.each([
    ['a short file', (b: Buffer) => b.subarray(0, 20), /shorter than the 32-byte header/],
    ['a truncated entry list', (b: Buffer) => b.subarray(0, b.length - 4), /truncated or trailing/],
    ['trailing bytes', (b: Buffer) => Buffer.concat([b, Buffer.alloc(1)]), /truncated or trailing/],
    ['a bad magic', (b: Buffer) => (b.write('X', 0), b), /bad magic/],
    ['an unknown version', (b: Buffer) => (b.writeUInt32LE(2, 8), b), /version 2 is not supported/],
    ['a flipped entry bit', (b: Buffer) => (b.writeUInt8(b[33]! ^ 1, 33), b), /checksum/],
  ])('rejects %s, saying what is wrong', (_name, mutate, message) => {
    expect(problemOf(mutate(Buffer.from(GOLDEN_HEX, 'hex')))).toMatch(message);
  });

  it('refuses to encode or decode blocks outside the file, duplicates and bad block sizes', () => {
    expect(() => encodePrefetch({ ...GOLDEN, blocks: [256] })).toThrow(/block 256 is outside the file's 256 blocks/);
    expect(() => encodePrefetch({ ...GOLDEN, blocks: [1, 2, 1] })).toThrow(/entry 2: block 1 is listed twice/);
    expect(() => encodePrefetch({ ...GOLDEN, blockSize: 3000 })).toThrow(/block size 3000/);
    expect(() => encodePrefetch({ ...GOLDEN, size: 0 })).toThrow(/size 0 is not positive/);
  });
});

const arbSet: fc.Arbitrary<PrefetchSet> = fc
  .record({ shift: fc.integer({ min: 12, max: 21 }), total: fc.integer({ min: 1, max: 600 }), seed: fc.nat() })
  .chain(({ shift, total }) =>
    fc.record({
      blockSize: fc.constant(2 ** shift),
      // A size that need not be a whole number of blocks: the last block is partial.
      size: fc.integer({ min: (total - 1) * 2 ** shift + 1, max: total * 2 ** shift }),
      blocks: fc.uniqueArray(fc.integer({ min: 0, max: total - 1 }), { maxLength: total }),
    }),
  );

describe('prefetch codec properties', () => {
  it('round-trips every valid set, order kept', () => {
    fc.assert(
      fc.property(arbSet, (set) => {
        const bytes = encodePrefetch(set);
        expect(bytes.length).toBe(32 + 4 * set.blocks.length);
        expect(decodePrefetch(bytes)).toEqual(set);
      }),
      { numRuns: 300 },
    );
  });
});

/** What a decoder must do with any input: a valid set or PrefetchInvalid, nothing else. */
function judge(bytes: Uint8Array): void {
  let set: PrefetchSet;
  try {
    set = decodePrefetch(bytes);
  } catch (err) {
    if (err instanceof PrefetchInvalid) return;
    throw err;
  }
  const total = Math.ceil(set.size / set.blockSize);
  expect(new Set(set.blocks).size).toBe(set.blocks.length);
  for (const b of set.blocks) expect(b).toBeLessThan(total);
  expect(encodePrefetch(set).equals(Buffer.from(bytes))).toBe(true);
}

describe('prefetch decoder fuzz', () => {
  it('never crashes and never accepts a broken set on random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 200 }), (bytes) => judge(bytes)),
      { numRuns: 2000 },
    );
  });

  it('never crashes and never accepts a broken set on mutated valid files', () => {
    const mutation = fc.record({
      kind: fc.constantFrom('flip', 'u32', 'truncate', 'append'),
      at: fc.nat(),
      value: fc.nat({ max: 0xffffffff }),
    });
    fc.assert(
      fc.property(arbSet, fc.array(mutation, { minLength: 1, maxLength: 4 }), (set, mutations) => {
        let b = Buffer.from(encodePrefetch(set));
        for (const m of mutations) {
          const at = b.length === 0 ? 0 : m.at % b.length;
          if (m.kind === 'flip' && b.length > 0) b[at] = (b[at]! ^ (1 << (m.value % 8))) & 0xff;
          else if (m.kind === 'u32' && at + 4 <= b.length) b.writeUInt32LE(m.value, at);
          else if (m.kind === 'truncate') b = b.subarray(0, at);
          else if (m.kind === 'append') b = Buffer.concat([b, Buffer.alloc(1 + (m.value % 8), m.value & 0xff)]);
        }
        judge(b);
      }),
      { numRuns: 2000 },
    );
  });
});
