import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  decodeRegions,
  encodeHandshake,
  type GuestRegion,
  PAGE_2M,
  PAGE_4K,
  parseHandshake,
} from './handshake-codec.js';
import { HandshakeInvalid } from './handshake-error.js';

const MiB = 1024 * 1024;

function problemOf(fn: () => unknown): string | undefined {
  try {
    fn();
  } catch (err) {
    if (err instanceof HandshakeInvalid) return err.problem;
    throw err;
  }
  return undefined;
}

describe('UFFD handshake codec', () => {
  it('decodes the message Firecracker sends (page_size) byte for byte', () => {
    const golden =
      '[{"base_host_virt_addr":140233326034944,"size":134217728,"offset":0,"page_size":4096},' +
      '{"base_host_virt_addr":140233594470400,"size":67108864,"offset":134217728,"page_size":4096}]';
    const hs = parseHandshake(Buffer.from(golden), { fdCount: 1, memorySize: 192 * MiB });
    expect(hs).toEqual({
      regions: [
        { base: 140233326034944, size: 134217728, offset: 0, pageSize: 4096 },
        { base: 140233594470400, size: 67108864, offset: 134217728, pageSize: 4096 },
      ],
      pageSizeKey: 'page_size',
      hasMemfd: false,
    });
    expect(Buffer.from(encodeHandshake(hs.regions)).toString()).toBe(golden);
  });

  it('accepts older Firecracker page_size_kib, which holds bytes, and a memfd', () => {
    const msg = '[{"base_host_virt_addr":2097152,"size":4194304,"offset":0,"page_size_kib":2097152}]';
    const hs = parseHandshake(msg, { fdCount: 2 });
    expect(hs.regions[0]?.pageSize).toBe(PAGE_2M);
    expect(hs.pageSizeKey).toBe('page_size_kib');
    expect(hs.hasMemfd).toBe(true);
    expect(Buffer.from(encodeHandshake(hs.regions, 'page_size_kib')).toString()).toBe(msg);
  });

  const one = (r: Partial<GuestRegion>) =>
    JSON.stringify([
      {
        base_host_virt_addr: r.base ?? 1 << 30,
        size: r.size ?? MiB,
        offset: r.offset ?? 0,
        page_size: r.pageSize ?? PAGE_4K,
      },
    ]);

  it.each([
    ['not json', 'BAD_JSON', '{oops', 1, undefined],
    ['object', 'NOT_AN_ARRAY', '{"a":1}', 1, undefined],
    ['empty', 'NO_REGIONS', '[]', 1, undefined],
    ['no fd', 'FD_COUNT', one({}), 0, undefined],
    ['three fds', 'FD_COUNT', one({}), 3, undefined],
    ['zero size', 'ZERO_SIZE', one({ size: 0 }), 1, undefined],
    ['unaligned base', 'UNALIGNED', one({ base: (1 << 30) + 512 }), 1, undefined],
    [
      'unaligned offset',
      'UNALIGNED',
      one({ offset: 4096, pageSize: PAGE_2M, size: PAGE_2M, base: 1 << 30 }),
      1,
      undefined,
    ],
    ['bad page size', 'BAD_PAGE_SIZE', one({ pageSize: 8192 }), 1, undefined],
    [
      'mixed page sizes',
      'BAD_PAGE_SIZE',
      JSON.stringify([
        { base_host_virt_addr: 0x200000, size: 0x200000, offset: 0, page_size: 4096 },
        { base_host_virt_addr: 0x600000, size: 0x200000, offset: 0x200000, page_size: 2097152 },
      ]),
      1,
      undefined,
    ],
    ['past the file', 'PAST_MEMORY_FILE', one({ offset: MiB }), 1, MiB],
    [
      'string field',
      'BAD_FIELD',
      '[{"base_host_virt_addr":"1","size":4096,"offset":0,"page_size":4096}]',
      1,
      undefined,
    ],
    ['negative', 'BAD_FIELD', '[{"base_host_virt_addr":-4096,"size":4096,"offset":0,"page_size":4096}]', 1, undefined],
    ['no page size', 'BAD_FIELD', '[{"base_host_virt_addr":4096,"size":4096,"offset":0}]', 1, undefined],
    [
      'overlap in address',
      'OVERLAP',
      JSON.stringify([
        { base_host_virt_addr: 0x10000, size: 0x4000, offset: 0, page_size: 4096 },
        { base_host_virt_addr: 0x13000, size: 0x4000, offset: 0x4000, page_size: 4096 },
      ]),
      1,
      undefined,
    ],
    [
      'overlap in file',
      'OVERLAP',
      JSON.stringify([
        { base_host_virt_addr: 0x10000, size: 0x4000, offset: 0, page_size: 4096 },
        { base_host_virt_addr: 0x20000, size: 0x4000, offset: 0x2000, page_size: 4096 },
      ]),
      1,
      undefined,
    ],
  ] as const)('refuses %s with %s', (_name, problem, payload, fdCount, memorySize) => {
    const opts = memorySize === undefined ? { fdCount } : { fdCount, memorySize };
    expect(problemOf(() => parseHandshake(payload, opts))).toBe(problem);
  });

  it('the error says what is wrong and which region', () => {
    try {
      parseHandshake(one({ offset: MiB }), { fdCount: 1, memorySize: MiB });
      expect.unreachable();
    } catch (err) {
      expect(err).toBeInstanceOf(HandshakeInvalid);
      expect((err as HandshakeInvalid).region).toBe(0);
      expect((err as Error).message).toMatch(
        /region 0: \[1048576, 2097152\) ends past the memory file \(1048576 bytes\)/,
      );
    }
  });

  const regionsArb = fc
    .array(fc.record({ pages: fc.integer({ min: 1, max: 64 }), gapPages: fc.integer({ min: 0, max: 8 }) }), {
      minLength: 1,
      maxLength: 8,
    })
    .chain((specs) =>
      fc.constantFrom(PAGE_4K, PAGE_2M).map((ps) => {
        let base = 2 ** 40;
        let offset = 0;
        return specs.map(({ pages, gapPages }) => {
          const r = { base, size: pages * ps, offset, pageSize: ps };
          base += (pages + gapPages) * ps;
          offset += pages * ps;
          return r;
        });
      }),
    );

  it('round-trips any valid region list (property)', () => {
    fc.assert(
      fc.property(regionsArb, fc.constantFrom('page_size' as const, 'page_size_kib' as const), (regions, key) => {
        const total = regions.reduce((n, r) => n + r.size, 0);
        const hs = parseHandshake(encodeHandshake(regions, key), { fdCount: 1, memorySize: total });
        expect(hs.regions).toEqual(regions);
      }),
    );
  });

  it('never crashes on random or mutated input: it parses to valid regions or throws HandshakeInvalid (fuzz)', () => {
    const mutated = regionsArb.chain((regions) =>
      fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 }), fc.integer({ min: 0, max: 3 })).map(([pos, byte, op]) => {
        const b = Buffer.from(encodeHandshake(regions));
        const i = pos % b.length;
        if (op === 0) b[i] = byte;
        else if (op === 1) return b.subarray(0, i);
        else if (op === 2) return Buffer.concat([b.subarray(0, i), Buffer.from([byte]), b.subarray(i)]);
        return b;
      }),
    );
    const input = fc.oneof(
      mutated,
      fc.uint8Array({ maxLength: 300 }).map((a) => Buffer.from(a)),
      fc.json().map((s) => Buffer.from(s)),
    );
    fc.assert(
      fc.property(input, fc.integer({ min: 0, max: 3 }), (payload, fdCount) => {
        try {
          const hs = parseHandshake(payload, { fdCount, memorySize: 1 << 30 });
          for (const r of hs.regions) {
            expect(r.size).toBeGreaterThan(0);
            expect(r.base % r.pageSize).toBe(0);
            expect(r.offset + r.size).toBeLessThanOrEqual(1 << 30);
          }
        } catch (err) {
          expect(err).toBeInstanceOf(HandshakeInvalid);
        }
      }),
      { numRuns: 2000 },
    );
  });

  it('decodeRegions keeps unknown fields out', () => {
    const { regions } = decodeRegions(
      '[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"extra":1}]',
    );
    expect(Object.keys(regions[0]!).sort()).toEqual(['base', 'offset', 'pageSize', 'size']);
  });
});
