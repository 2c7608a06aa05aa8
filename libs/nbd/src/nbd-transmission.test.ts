import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { Command, CommandFlag } from './nbd-constants.js';
import { NbdProtocolError } from './nbd-protocol-error.js';
import {
  decodeRequestHeader,
  decodeSimpleReplyHeader,
  encodeRequestHeader,
  encodeSimpleReplyHeader,
} from './nbd-transmission.js';

describe('request header', () => {
  it('matches the 28 bytes of proto.md', () => {
    const bytes = encodeRequestHeader({
      flags: CommandFlag.FUA,
      type: Command.WRITE,
      cookie: 0x0102030405060708n,
      offset: 0x1_0000_1000,
      length: 4096,
    });
    expect(bytes.toString('hex')).toBe(
      '25609513' + '0001' + '0001' + '0102030405060708' + '0000000100001000' + '00001000',
    );
  });

  it('round-trips every field, also into a caller buffer at an offset', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 0, max: 0xffff }),
        fc.integer({ min: 0, max: 0xffff }),
        fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
        fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }),
        fc.integer({ min: 0, max: 0xffffffff }),
        fc.nat(40),
        (flags, type, cookie, offset, length, at) => {
          const target = Buffer.alloc(at + 28);
          encodeRequestHeader({ flags, type, cookie, offset, length }, target, at);
          expect(decodeRequestHeader(target, at)).toEqual({ flags, type, cookie, offset, length });
        },
      ),
    );
  });

  it('bad magic is a protocol error, short input a RangeError', () => {
    const bytes = encodeRequestHeader({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 1 });
    bytes[3] = 0;
    expect(() => decodeRequestHeader(bytes)).toThrow(NbdProtocolError);
    expect(() => decodeRequestHeader(Buffer.alloc(27))).toThrow(RangeError);
  });
});

describe('simple reply header', () => {
  it('golden bytes and round-trip', () => {
    expect(encodeSimpleReplyHeader(22, 7n).toString('hex')).toBe('67446698' + '00000016' + '0000000000000007');
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), (e, c) => {
        expect(decodeSimpleReplyHeader(encodeSimpleReplyHeader(e, c))).toEqual({ error: e, cookie: c });
      }),
    );
  });

  it('refuses structured replies and garbage', () => {
    expect(() => decodeSimpleReplyHeader(Buffer.from('668e33ef' + '00'.repeat(12), 'hex'))).toThrow(/structured/);
    expect(() => decodeSimpleReplyHeader(Buffer.alloc(16))).toThrow(expect.objectContaining({ code: 'NBD_BAD_MAGIC' }));
  });
});
