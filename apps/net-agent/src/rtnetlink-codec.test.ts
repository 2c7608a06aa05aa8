import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { addAddress, addDefaultRoute, linkUp, NetlinkMessageInvalid, parseAcks } from './rtnetlink-codec.js';

describe('rtnetlink codec', () => {
  it('encodes link up as RTM_NEWLINK with IFF_UP in flags and change mask', () => {
    const m = linkUp(7, 3);
    expect(m.length).toBe(32);
    expect(m.readUInt32LE(0)).toBe(32);
    expect(m.readUInt16LE(4)).toBe(16); // RTM_NEWLINK
    expect(m.readUInt16LE(6)).toBe(0x5); // REQUEST | ACK
    expect(m.readUInt32LE(8)).toBe(7);
    expect(m.readInt32LE(20)).toBe(3);
    expect(m.readUInt32LE(24)).toBe(1);
    expect(m.readUInt32LE(28)).toBe(1);
  });

  it('encodes an address with IFA_LOCAL and IFA_ADDRESS in network order', () => {
    const m = addAddress(1, 5, '169.254.0.22', 30);
    expect(m.readUInt16LE(4)).toBe(20); // RTM_NEWADDR
    expect(m.readUInt16LE(6)).toBe(0x605); // REQUEST | ACK | EXCL | CREATE
    expect([m.readUInt8(16), m.readUInt8(17), m.readUInt32LE(20)]).toEqual([2, 30, 5]);
    expect(m.subarray(24).toString('hex')).toBe('08000200a9fe0016' + '08000100a9fe0016');
  });

  it('encodes the default route with gateway and output interface', () => {
    const m = addDefaultRoute(2, '10.12.0.2', 4);
    expect(m.readUInt16LE(4)).toBe(24); // RTM_NEWROUTE
    expect([...m.subarray(16, 24)]).toEqual([2, 0, 0, 0, 254, 3, 0, 1]);
    expect(m.subarray(28).toString('hex')).toBe('080005000a0c0002' + '0800040004000000');
  });

  it('parses acks and errors, and rejects truncated input', () => {
    const ack = (seq: number, err: number) => {
      const b = Buffer.alloc(36);
      b.writeUInt32LE(36, 0);
      b.writeUInt16LE(2, 4);
      b.writeUInt32LE(seq, 8);
      b.writeInt32LE(err, 16);
      return b;
    };
    expect(parseAcks(Buffer.concat([ack(1, 0), ack(2, -17)]))).toEqual([
      { seq: 1, errno: 0 },
      { seq: 2, errno: 17 },
    ]);
    expect(() => parseAcks(ack(1, 0).subarray(0, 30))).toThrow(NetlinkMessageInvalid);
  });

  it('never throws anything but NetlinkMessageInvalid on random bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (bytes) => {
        try {
          parseAcks(Buffer.from(bytes));
        } catch (err) {
          expect(err).toBeInstanceOf(NetlinkMessageInvalid);
        }
      }),
      { numRuns: 3000 },
    );
  });
});
