import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  decodeInfo,
  decodeOptionReply,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOptionRequest,
  InfoType,
  NbdProtocolError,
  Option,
  OptionReply,
  TransmissionFlag,
} from '#nbd';
import { MemoryBlocks } from '#storage';
import type { NbdExport } from './nbd-export.js';
import { NbdNegotiation } from './nbd-negotiation.js';

const disk: NbdExport = { name: 'disk', blocks: new MemoryBlocks(8192), blockSize: 4096 };
const table = { find: (n: string) => (n === '' || n === 'disk' ? disk : undefined), names: () => ['disk'] };

/** Feeds `bytes` in the given pieces; returns the replies as one buffer and the machine. */
function negotiate(bytes: Buffer, cuts: number[]): { out: Buffer; machine: NbdNegotiation } {
  const machine = new NbdNegotiation(table, 1 << 20);
  const out: Buffer[] = [];
  let pending = Buffer.alloc(0);
  let from = 0;
  for (const to of [...cuts.filter((c) => c > 0 && c < bytes.length).sort((a, b) => a - b), bytes.length]) {
    pending = Buffer.concat([pending, bytes.subarray(from, to)]);
    from = to;
    pending = pending.subarray(machine.feed(pending, (b) => out.push(b)));
  }
  return { out: Buffer.concat(out), machine };
}

const session = Buffer.concat([
  encodeClientFlags(3),
  encodeOptionRequest(Option.LIST),
  encodeOptionRequest(Option.STRUCTURED_REPLY),
  encodeOptionRequest(Option.INFO, encodeInfoRequest('nope', [])),
  encodeOptionRequest(Option.GO, encodeInfoRequest('', [InfoType.NAME, InfoType.BLOCK_SIZE])),
]);

describe('NbdNegotiation (no socket)', () => {
  it('answers LIST, refuses what it does not offer, and GO picks the default export with its flags', () => {
    const { out, machine } = negotiate(session, []);
    expect(machine.chosen).toBe(disk);
    const replies = [];
    for (let at = 0; at < out.length;) {
      const r = decodeOptionReply(out.subarray(at))!;
      replies.push(r);
      at += r.size;
    }
    expect(replies.map((r) => [r.option, r.type])).toEqual([
      [Option.LIST, OptionReply.SERVER],
      [Option.LIST, OptionReply.ACK],
      [Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP],
      [Option.INFO, OptionReply.ERR_UNKNOWN],
      [Option.GO, OptionReply.INFO],
      [Option.GO, OptionReply.INFO],
      [Option.GO, OptionReply.INFO],
      [Option.GO, OptionReply.ACK],
    ]);
    const infos = replies.filter((r) => r.type === OptionReply.INFO).map((r) => decodeInfo(r.data));
    expect(infos).toContainEqual({ type: 'name', name: 'disk' });
    expect(infos).toContainEqual({ type: 'block-size', minimum: 1, preferred: 4096, maximum: 1 << 20 });
    const exp = infos.find((i) => i.type === 'export');
    expect(exp).toMatchObject({ size: 8192 });
    // MemoryBlocks can write and says nothing of multi-conn.
    const flags = (exp as { transmissionFlags: number }).transmissionFlags;
    expect(flags & TransmissionFlag.SEND_TRIM).toBeTruthy();
    expect(flags & (TransmissionFlag.READ_ONLY | TransmissionFlag.CAN_MULTI_CONN)).toBe(0);
  });

  it('property: however the bytes are split, the replies and the outcome are the same', () => {
    const whole = negotiate(session, []).out;
    fc.assert(
      fc.property(fc.array(fc.nat(session.length), { maxLength: 12 }), (cuts) => {
        const { out, machine } = negotiate(session, cuts);
        expect(out.equals(whole)).toBe(true);
        expect(machine.chosen).toBe(disk);
      }),
    );
  });

  it('unknown client flags and an unknown EXPORT_NAME lose framing: a protocol error', () => {
    expect(() => negotiate(encodeClientFlags(0x80), [])).toThrow(NbdProtocolError);
    const unknown = Buffer.concat([encodeClientFlags(1), encodeOptionRequest(Option.EXPORT_NAME, Buffer.from('x'))]);
    expect(() => negotiate(unknown, [])).toThrow(/unknown export "x"/);
  });
});
