import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { InfoType, Option, OptionReply, TransmissionFlag } from './nbd-constants.js';
import {
  decodeClientFlags,
  decodeExportName,
  decodeExportNameReply,
  decodeInfo,
  decodeInfoRequest,
  decodeOptionReply,
  decodeOptionRequest,
  decodeServerEntry,
  decodeServerGreeting,
  encodeClientFlags,
  encodeExportNameReply,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoName,
  encodeInfoRequest,
  encodeOptionErrorReply,
  encodeOptionReply,
  encodeOptionRequest,
  encodeServerEntry,
  encodeServerGreeting,
} from './nbd-handshake.js';
import { NbdProtocolError } from './nbd-protocol-error.js';

describe('greeting', () => {
  it('matches the bytes of proto.md: NBDMAGIC IHAVEOPT flags', () => {
    expect(encodeServerGreeting(3).toString('hex')).toBe('4e42444d41474943' + '49484156454f5054' + '0003');
    expect(decodeServerGreeting(encodeServerGreeting(1))).toEqual({ handshakeFlags: 1 });
  });

  it('waits for 18 bytes, refuses oldstyle and garbage', () => {
    expect(decodeServerGreeting(encodeServerGreeting().subarray(0, 17))).toBeUndefined();
    const oldstyle = Buffer.from('4e42444d414749430000420281861253', 'hex');
    expect(() => decodeServerGreeting(Buffer.concat([oldstyle, Buffer.alloc(2)]))).toThrow(/oldstyle/);
    expect(() => decodeServerGreeting(Buffer.alloc(18, 0x41))).toThrow(NbdProtocolError);
  });

  it('client flags round-trip', () => {
    expect(encodeClientFlags(3).toString('hex')).toBe('00000003');
    expect(decodeClientFlags(encodeClientFlags(3))).toBe(3);
    expect(decodeClientFlags(Buffer.alloc(3))).toBeUndefined();
  });
});

describe('options', () => {
  it('encodes NBD_OPT_GO with golden bytes', () => {
    const data = encodeInfoRequest('disk', [InfoType.BLOCK_SIZE]);
    expect(data.toString('hex')).toBe('00000004' + Buffer.from('disk').toString('hex') + '0001' + '0003');
    const req = encodeOptionRequest(Option.GO, data);
    expect(req.subarray(0, 16).toString('hex')).toBe('49484156454f5054' + '00000007' + '0000000c');
    const decoded = decodeOptionRequest(req);
    expect(decoded?.option).toBe(Option.GO);
    expect(decoded?.size).toBe(28);
    expect(decodeInfoRequest(decoded!.data)).toEqual({ exportName: 'disk', requests: [InfoType.BLOCK_SIZE] });
  });

  it('returns undefined until the whole option has arrived, and decodes back-to-back options', () => {
    const two = Buffer.concat([encodeOptionRequest(Option.LIST), encodeOptionRequest(Option.ABORT)]);
    for (let cut = 0; cut < 16; cut++) expect(decodeOptionRequest(two.subarray(0, cut))).toBeUndefined();
    const first = decodeOptionRequest(two)!;
    expect(first.option).toBe(Option.LIST);
    expect(decodeOptionRequest(two.subarray(first.size))?.option).toBe(Option.ABORT);
  });

  it('rejects a wrong magic and an oversized option', () => {
    const bad = encodeOptionRequest(Option.LIST);
    bad[0] = 0;
    expect(() => decodeOptionRequest(bad)).toThrow(expect.objectContaining({ code: 'NBD_BAD_MAGIC' }));
    const big = encodeOptionRequest(Option.GO, Buffer.alloc(10));
    expect(() => decodeOptionRequest(big, 9)).toThrow(expect.objectContaining({ code: 'NBD_OPTION_TOO_LARGE' }));
  });

  it('rejects info requests whose lengths do not add up', () => {
    expect(() => decodeInfoRequest(Buffer.alloc(3))).toThrow(/at least 6/);
    const lying = encodeInfoRequest('x', [1, 2]);
    lying.writeUInt16BE(5, 5);
    expect(() => decodeInfoRequest(lying)).toThrow(expect.objectContaining({ code: 'NBD_BAD_OPTION_DATA' }));
    const longName = Buffer.alloc(10);
    longName.writeUInt32BE(1000, 0);
    expect(() => decodeInfoRequest(longName)).toThrow(/runs past/);
    expect(() => decodeExportName(Buffer.alloc(5000))).toThrow(/exceeds 4096/);
  });

  it('option replies: golden header, error message, partial input', () => {
    const reply = encodeOptionReply(Option.GO, OptionReply.ACK);
    expect(reply.toString('hex')).toBe('0003e889045565a9' + '00000007' + '00000001' + '00000000');
    const err = encodeOptionErrorReply(99, OptionReply.ERR_UNSUP, 'option 99 not supported');
    const decoded = decodeOptionReply(err)!;
    expect(decoded.type).toBe(0x80000001);
    expect(decoded.data.toString()).toBe('option 99 not supported');
    expect(decodeOptionReply(err.subarray(0, err.length - 1))).toBeUndefined();
  });

  it('info payloads round-trip', () => {
    const flags = TransmissionFlag.HAS_FLAGS | TransmissionFlag.SEND_FLUSH;
    expect(encodeInfoExport(1 << 30, flags).toString('hex')).toBe('0000' + '0000000040000000' + '0005');
    expect(decodeInfo(encodeInfoExport(1 << 30, flags))).toEqual({
      type: 'export',
      size: 1 << 30,
      transmissionFlags: flags,
    });
    expect(decodeInfo(encodeInfoName('root'))).toEqual({ type: 'name', name: 'root' });
    expect(decodeInfo(encodeInfoBlockSize(1, 4096, 33554432))).toEqual({
      type: 'block-size',
      minimum: 1,
      preferred: 4096,
      maximum: 33554432,
    });
    expect(decodeInfo(Buffer.from('0009', 'hex'))).toEqual({ type: 'unknown', infoType: 9 });
    expect(() => decodeInfo(Buffer.from('000000', 'hex'))).toThrow(/expected 12/);
  });

  it('export-name reply with and without the 124 zero bytes', () => {
    expect(encodeExportNameReply(4096, 1, false).length).toBe(134);
    expect(encodeExportNameReply(4096, 1, true).length).toBe(10);
    expect(decodeExportNameReply(encodeExportNameReply(4096, 0x15, true), true)).toEqual({
      size: 4096,
      transmissionFlags: 0x15,
      bytes: 10,
    });
    expect(decodeExportNameReply(Buffer.alloc(133), false)).toBeUndefined();
  });

  it('list entries round-trip', () => {
    expect(decodeServerEntry(encodeServerEntry('sbx-1'))).toBe('sbx-1');
    expect(() => decodeServerEntry(Buffer.from('000000ff41', 'hex'))).toThrow(/runs past/);
  });
});

describe('fuzz', () => {
  it('option request: round-trips any option and data', () => {
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.uint8Array({ maxLength: 300 }), (option, data) => {
        const decoded = decodeOptionRequest(encodeOptionRequest(option, data), 1024)!;
        expect(decoded.option).toBe(option);
        expect(Buffer.compare(decoded.data, Buffer.from(data))).toBe(0);
      }),
    );
  });

  it('info request: round-trips names and request lists', () => {
    fc.assert(
      fc.property(
        fc.string({ maxLength: 200 }),
        fc.array(fc.integer({ min: 0, max: 0xffff }), { maxLength: 20 }),
        (n, r) => {
          expect(decodeInfoRequest(encodeInfoRequest(n, r))).toEqual({ exportName: n, requests: r });
        },
      ),
    );
  });

  it('decoders given random or mutated bytes either decode, wait, or throw a protocol error', () => {
    const valid = [
      encodeOptionRequest(Option.GO, encodeInfoRequest('disk', [0, 1, 3])),
      encodeOptionRequest(Option.INFO, encodeInfoRequest('', [])),
      encodeOptionReply(Option.GO, OptionReply.INFO, encodeInfoExport(1 << 20, 1)),
    ];
    const input = fc.oneof(
      fc.uint8Array({ maxLength: 64 }),
      fc
        .tuple(
          fc.constantFrom(...valid),
          fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { maxLength: 4 }),
        )
        .map(([base, edits]) => {
          const copy = Buffer.from(base);
          for (const [at, value] of edits) copy[at % copy.length] = value;
          return copy;
        }),
    );
    fc.assert(
      fc.property(input, (bytes) => {
        for (const decode of [
          () => decodeOptionRequest(bytes),
          () => decodeOptionReply(bytes),
          () => decodeServerGreeting(bytes),
          () => decodeInfoRequest(bytes.subarray(16)),
          () => decodeInfo(bytes.subarray(20)),
          () => decodeServerEntry(bytes),
        ]) {
          try {
            decode();
          } catch (err) {
            expect(err).toBeInstanceOf(NbdProtocolError);
          }
        }
      }),
      { numRuns: 2000 },
    );
  });
});
