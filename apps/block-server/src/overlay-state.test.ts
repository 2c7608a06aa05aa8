import { crc32 } from 'node:zlib';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DirtyBitmap } from '#storage';
import { OverlayStateInvalid } from './block-errors.js';
import { decodeOverlayState, encodeOverlayState, type OverlayState } from './overlay-state.js';

function bitmap(blocks: number, set: number[]): DirtyBitmap {
  const b = new DirtyBitmap(blocks);
  for (const i of set) b.set(i);
  return b;
}

const EXPECTED = { blockSize: 4096, size: 3 * 4096, identity: 'b' };

describe('overlay state codec', () => {
  it('golden: a 3-block device, block 0 written, block 2 zeroed', () => {
    const state: OverlayState = {
      ...EXPECTED,
      generation: 5,
      written: bitmap(3, [0]),
      zeroed: bitmap(3, [2]),
      checkpoint: '',
      tracked: bitmap(3, []),
    };
    const body = Buffer.from(
      [
        '534258434f573031', // "SBXCOW01"
        '02000000', // version 2
        '00100000', // block size 4096
        '0030000000000000', // size 12288
        '0500000000000000', // generation 5
        '01000000', // identity length 1
        '62', // "b"
        '1100000000000000', // written map: 17 bytes
        '1100000000000000', // zeroed map: 17 bytes
        '534258424d415031' + '0300000000000000' + '01', // DirtyBitmap: magic, 3 blocks, bit 0
        '534258424d415031' + '0300000000000000' + '04', // bit 2
      ].join(''),
      'hex',
    );
    const sum = Buffer.alloc(4);
    sum.writeUInt32LE(crc32(body), 0);
    const golden = Buffer.concat([body, sum]);
    expect(encodeOverlayState(state).toString('hex')).toBe(golden.toString('hex'));
    const back = decodeOverlayState(golden, 'p', EXPECTED);
    expect({ ...back, written: [...back.written], zeroed: [...back.zeroed], tracked: [...back.tracked] }).toEqual({
      ...EXPECTED,
      generation: 5,
      written: [0],
      zeroed: [2],
      checkpoint: '',
      tracked: [],
    });
  });

  it('golden: after a checkpoint, version 3 adds the checkpoint build and the blocks changed since', () => {
    const state: OverlayState = {
      ...EXPECTED,
      generation: 5,
      written: bitmap(3, [0]),
      zeroed: bitmap(3, [2]),
      checkpoint: 'c1',
      tracked: bitmap(3, [2]),
    };
    const body = Buffer.from(
      [
        '534258434f573031', // "SBXCOW01"
        '03000000', // version 3
        '00100000', // block size 4096
        '0030000000000000', // size 12288
        '0500000000000000', // generation 5
        '01000000', // identity length 1
        '62', // "b"
        '1100000000000000', // written map: 17 bytes
        '1100000000000000', // zeroed map: 17 bytes
        '534258424d415031' + '0300000000000000' + '01', // DirtyBitmap: magic, 3 blocks, bit 0
        '534258424d415031' + '0300000000000000' + '04', // bit 2
        '02000000', // checkpoint length 2
        '6331', // "c1"
        '1100000000000000', // tracked map: 17 bytes
        '534258424d415031' + '0300000000000000' + '04', // bit 2
      ].join(''),
      'hex',
    );
    const sum = Buffer.alloc(4);
    sum.writeUInt32LE(crc32(body), 0);
    const golden = Buffer.concat([body, sum]);
    expect(encodeOverlayState(state).toString('hex')).toBe(golden.toString('hex'));
    const back = decodeOverlayState(golden, 'p', EXPECTED);
    expect([back.checkpoint, [...back.tracked], [...back.written], [...back.zeroed]]).toEqual(['c1', [2], [0], [2]]);
  });

  it('refuses a state made for another block size, size or base, naming the problem', () => {
    const bytes = encodeOverlayState({
      ...EXPECTED,
      generation: 0,
      written: bitmap(3, []),
      zeroed: bitmap(3, []),
      checkpoint: '',
      tracked: bitmap(3, []),
    });
    expect(() => decodeOverlayState(bytes, 'p', { ...EXPECTED, blockSize: 512 })).toThrow(/block size 4096/);
    expect(() => decodeOverlayState(bytes, 'p', { ...EXPECTED, size: 4096 })).toThrow(/size 12288, base is 4096/);
    expect(() => decodeOverlayState(bytes, 'p', { ...EXPECTED, identity: 'c' })).toThrow(/made over "b", not "c"/);
    expect(() => decodeOverlayState(bytes.subarray(0, bytes.length - 1), 'p', EXPECTED)).toThrow(/checksum/);
  });

  it('property: any maps round-trip', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 300 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        fc.string(),
        fc.nat(),
        fc.option(fc.string({ minLength: 1 }), { nil: '' }),
        (blocks, picks, identity, generation, checkpoint) => {
          const written = bitmap(
            blocks,
            picks.filter((_, i) => i % 2 === 0).map((p) => p % blocks),
          );
          const zeroed = bitmap(
            blocks,
            picks.filter((_, i) => i % 2 === 1).map((p) => p % blocks),
          );
          const tracked =
            checkpoint === ''
              ? bitmap(blocks, [])
              : bitmap(
                  blocks,
                  picks.map((p) => (p * 7) % blocks),
                );
          const state = {
            blockSize: 512,
            size: blocks * 512 - 100,
            identity,
            generation,
            written,
            zeroed,
            checkpoint,
            tracked,
          };
          const back = decodeOverlayState(encodeOverlayState(state), 'p', state);
          expect([back.generation, [...back.written], [...back.zeroed], back.checkpoint, [...back.tracked]]).toEqual([
            generation,
            [...written],
            [...zeroed],
            checkpoint,
            [...tracked],
          ]);
        },
      ),
    );
  });

  it('fuzz: random and mutated bytes are refused with OverlayStateInvalid, never anything else', () => {
    const valid = encodeOverlayState({
      ...EXPECTED,
      generation: 1,
      written: bitmap(3, [1]),
      zeroed: bitmap(3, []),
      checkpoint: 'c',
      tracked: bitmap(3, [1]),
    });
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 200 }).map((b) => Buffer.from(b)),
          fc
            .array(fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 1, max: 255 })), { minLength: 1 })
            .map((edits) => {
              const b = Buffer.from(valid);
              for (const [at, x] of edits) b[at]! ^= x;
              return b;
            }),
        ),
        (bytes) => {
          expect(() => decodeOverlayState(bytes, 'p', EXPECTED)).toThrow(OverlayStateInvalid);
        },
      ),
    );
  });
});
