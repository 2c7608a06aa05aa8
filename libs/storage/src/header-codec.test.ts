import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { NIL_UUID } from './build-id.js';
import { decodeHeader, encodeHeader, type Header } from './header-codec.js';
import type { BuildMapping } from './mappings.js';
import { HeaderInvalid } from './storage-errors.js';

const BUILD = '11223344-5566-7788-99aa-bbccddeeff00';
const BASE = 'a0a1a2a3-b0b1-c0c1-d0d1-e0e1e2e3e4e5';

// Written by hand from Go's binary.Write(LittleEndian) of header.Metadata then each header.BuildMap:
// u64 fields little endian, uuid.UUID as its 16 bytes in RFC 4122 (string) order, no padding.
const GOLDEN_HEX = [
  // metadata: version 2, blockSize 4096, size 16384, generation 3, buildId, baseBuildId
  '0200000000000000',
  '0010000000000000',
  '0040000000000000',
  '0300000000000000',
  '112233445566778899aabbccddeeff00',
  'a0a1a2a3b0b1c0c1d0d1e0e1e2e3e4e5',
  // mapping 0: [0, 8192) -> base at 0
  '0000000000000000',
  '0020000000000000',
  'a0a1a2a3b0b1c0c1d0d1e0e1e2e3e4e5',
  '0000000000000000',
  // mapping 1: [8192, 12288) -> build at 0
  '0020000000000000',
  '0010000000000000',
  '112233445566778899aabbccddeeff00',
  '0000000000000000',
  // mapping 2: [12288, 16384) -> nil (zeros)
  '0030000000000000',
  '0010000000000000',
  '00000000000000000000000000000000',
  '0000000000000000',
].join('');

const GOLDEN: Header = {
  metadata: { version: 2, blockSize: 4096, size: 16384, generation: 3, buildId: BUILD, baseBuildId: BASE },
  mappings: [
    { offset: 0, length: 8192, buildId: BASE, buildStorageOffset: 0 },
    { offset: 8192, length: 4096, buildId: BUILD, buildStorageOffset: 0 },
    { offset: 12288, length: 4096, buildId: NIL_UUID, buildStorageOffset: 0 },
  ],
};

function catchHeaderInvalid(fn: () => unknown): HeaderInvalid {
  try {
    fn();
  } catch (err) {
    if (err instanceof HeaderInvalid) return err;
    throw err;
  }
  throw new Error('expected HeaderInvalid');
}

describe('header codec', () => {
  it('encodes the golden header byte for byte', () => {
    const bytes = encodeHeader(GOLDEN);
    expect(bytes.length).toBe(64 + 3 * 40);
    expect(bytes.toString('hex')).toBe(GOLDEN_HEX);
  });

  it('decodes the golden bytes', () => {
    expect(decodeHeader(Buffer.from(GOLDEN_HEX, 'hex'))).toEqual(GOLDEN);
  });

  it('decodes a 2 MiB huge-page memfile header of version 1 and 3', () => {
    for (const version of [1, 3]) {
      const h: Header = {
        metadata: { ...GOLDEN.metadata, version, blockSize: 2 << 20, size: 4 << 20, generation: 0 },
        mappings: [{ offset: 0, length: 4 << 20, buildId: BUILD, buildStorageOffset: 0 }],
      };
      const bytes = encodeHeader(h);
      expect(bytes.readBigUInt64LE(0)).toBe(BigInt(version));
      expect(bytes.readBigUInt64LE(8)).toBe(2097152n);
      expect(decodeHeader(bytes)).toEqual(h);
    }
  });

  it('accepts a last mapping that ends at a size that is not block-aligned', () => {
    const h: Header = {
      metadata: { ...GOLDEN.metadata, size: 10000 },
      mappings: [
        { offset: 0, length: 8192, buildId: BASE, buildStorageOffset: 0 },
        { offset: 8192, length: 1808, buildId: BUILD, buildStorageOffset: 4096 },
      ],
    };
    expect(decodeHeader(encodeHeader(h))).toEqual(h);
  });

  const bad: Array<[string, (h: Header) => void, RegExp, number | undefined]> = [
    ['version 0', (h) => (h.metadata.version = 0), /version 0 is not supported/, undefined],
    ['version 4 (compressed)', (h) => (h.metadata.version = 4), /version 4 is not supported/, undefined],
    ['block size not a power of two', (h) => (h.metadata.blockSize = 4000), /block size 4000/, undefined],
    ['block size below 512', (h) => (h.metadata.blockSize = 256), /block size 256/, undefined],
    ['a gap', (h) => (h.mappings[1]!.offset = 12288), /gap: \[8192, 12288\)/, 1],
    ['an overlap', (h) => (h.mappings[1]!.offset = 4096), /overlaps or is out of order/, 1],
    ['a zero length', (h) => h.mappings.splice(1, 0, { ...h.mappings[1]!, length: 0 }), /length 0 is not positive/, 1],
    ['unaligned length', (h) => (h.mappings[0]!.length = 8000), /length 8000 is not a multiple of block size 4096/, 0],
    ['past the size', (h) => (h.mappings[2]!.length = 8192), /past the file size 16384/, 2],
    ['short of the size', (h) => h.mappings.pop(), /cover \[0, 12288\) but the file size is 16384/, 2],
    ['unsorted', (h) => h.mappings.reverse(), /gap/, 0],
    ['unaligned storage offset', (h) => (h.mappings[1]!.buildStorageOffset = 100), /storage offset 100/, 1],
    ['nil header build id', (h) => (h.metadata.buildId = NIL_UUID), /nil UUID/, undefined],
  ];
  for (const [name, mutate, message, index] of bad) {
    it(`rejects ${name}, saying what and where`, () => {
      const h = structuredClone(GOLDEN);
      mutate(h);
      const bytes = encodeHeader(h, { validate: false });
      const err = catchHeaderInvalid(() => decodeHeader(bytes));
      expect(err.code).toBe('HEADER_INVALID');
      expect(err.message).toMatch(message);
      expect(err.mappingIndex).toBe(index);
      expect(() => encodeHeader(h)).toThrow(HeaderInvalid);
    });
  }

  it('rejects truncated metadata and trailing partial mappings', () => {
    const bytes = Buffer.from(GOLDEN_HEX, 'hex');
    expect(catchHeaderInvalid(() => decodeHeader(bytes.subarray(0, 63))).message).toMatch(/shorter than the 64-byte/);
    expect(catchHeaderInvalid(() => decodeHeader(bytes.subarray(0, bytes.length - 1))).message).toMatch(
      /39 trailing bytes/,
    );
  });

  it('rejects more mappings than the file has blocks before decoding them', () => {
    const bytes = Buffer.concat([Buffer.from(GOLDEN_HEX, 'hex'), Buffer.alloc(40 * 1000)]);
    const err = catchHeaderInvalid(() => decodeHeader(bytes));
    expect(err.message).toMatch(/1003 mappings for a file of 4 blocks/);
  });

  it('rejects u64 values above 2^53 instead of rounding them', () => {
    const bytes = Buffer.from(GOLDEN_HEX, 'hex');
    bytes.writeBigUInt64LE(1n << 60n, 64 + 40 + 8);
    const err = catchHeaderInvalid(() => decodeHeader(bytes));
    expect(err.message).toMatch(/mapping length \d+ is larger than 2\^53/);
    expect(err.mappingIndex).toBe(1);
  });
});

/** An independent statement of DESIGN.md §2, to judge what the decoder accepts. */
function satisfiesDesign(h: Header): boolean {
  const { size, blockSize } = h.metadata;
  if (size <= 0 || blockSize < 512 || (blockSize & (blockSize - 1)) !== 0) return false;
  const sorted = [...h.mappings].sort((a, b) => a.offset - b.offset);
  if (sorted.some((m, i) => m !== h.mappings[i])) return false;
  let covered = 0;
  for (const m of sorted) {
    if (m.length <= 0 || m.offset % blockSize !== 0) return false;
    if (m.offset !== covered) return false;
    if (m.length % blockSize !== 0 && m.offset + m.length !== size) return false;
    covered += m.length;
  }
  return covered === size;
}

const arbUuid = fc.oneof(fc.constant(NIL_UUID), fc.constant(BUILD), fc.constant(BASE), fc.uuid());

const arbValidHeader: fc.Arbitrary<Header> = fc
  .record({
    version: fc.integer({ min: 1, max: 3 }),
    blockShift: fc.integer({ min: 9, max: 21 }),
    lengths: fc.array(fc.integer({ min: 1, max: 8 }), { minLength: 1, maxLength: 12 }),
    ids: fc.array(arbUuid, { minLength: 12, maxLength: 12 }),
    generation: fc.integer({ min: 0, max: 1000 }),
  })
  .map(({ version, blockShift, lengths, ids, generation }) => {
    const blockSize = 2 ** blockShift;
    const mappings: BuildMapping[] = [];
    let offset = 0;
    lengths.forEach((blocks, i) => {
      mappings.push({ offset, length: blocks * blockSize, buildId: ids[i]!, buildStorageOffset: i * blockSize });
      offset += blocks * blockSize;
    });
    return {
      metadata: { version, blockSize, size: offset, generation, buildId: BUILD, baseBuildId: BASE },
      mappings,
    };
  });

describe('header parser fuzz', () => {
  function judge(bytes: Uint8Array): void {
    let decoded: Header;
    try {
      decoded = decodeHeader(bytes);
    } catch (err) {
      expect(err).toBeInstanceOf(HeaderInvalid);
      expect((err as HeaderInvalid).problem.length).toBeGreaterThan(5);
      return;
    }
    expect(satisfiesDesign(decoded)).toBe(true);
    expect(Buffer.compare(encodeHeader(decoded), Buffer.from(bytes))).toBe(0);
  }

  it('round-trips every valid header', () => {
    fc.assert(
      fc.property(arbValidHeader, (h) => {
        expect(decodeHeader(encodeHeader(h))).toEqual(h);
      }),
      { numRuns: 300 },
    );
  });

  it('never crashes and never accepts a broken mapping set on random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 400 }), (bytes) => judge(bytes)),
      { numRuns: 2000 },
    );
  });

  it('never crashes and never accepts a broken mapping set on mutated valid headers', () => {
    const mutation = fc.oneof(
      fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
      fc.record({
        kind: fc.constant('u64' as const),
        at: fc.nat(),
        value: fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
      }),
      fc.record({ kind: fc.constant('truncate' as const), at: fc.nat(), value: fc.constant(0) }),
      fc.record({ kind: fc.constant('append' as const), at: fc.integer({ min: 1, max: 80 }), value: fc.constant(0) }),
    );
    fc.assert(
      fc.property(arbValidHeader, fc.array(mutation, { minLength: 1, maxLength: 4 }), (h, mutations) => {
        let bytes = Buffer.from(encodeHeader(h));
        for (const m of mutations) {
          if (m.kind === 'flip' && bytes.length > 0) bytes[m.at % bytes.length] = m.value;
          else if (m.kind === 'u64' && bytes.length >= 8) {
            const slots = Math.floor(bytes.length / 8);
            bytes.writeBigUInt64LE(m.value as bigint, (m.at % slots) * 8);
          } else if (m.kind === 'truncate' && bytes.length > 0) bytes = bytes.subarray(0, m.at % bytes.length);
          else if (m.kind === 'append') bytes = Buffer.concat([bytes, Buffer.alloc(m.at, 7)]);
        }
        judge(bytes);
      }),
      { numRuns: 2000 },
    );
  });
});
