import { describe, expect, it } from 'vitest';
import { decodeMessage, encodeQuery, Rcode, RrType } from './dns-codec.js';
import { DnsResponder } from './dns-responder.js';
import { QueryCounters, Transport } from './query-counters.js';
import { RecordTable } from './record-table.js';

function setup() {
  const table = new RecordTable('sbx.test');
  table.set('abc', '10.11.0.7');
  const counters = new QueryCounters();
  return { responder: new DnsResponder({ table, counters }), counters };
}

describe('DnsResponder', () => {
  it('answers A with TTL 0, AA set, question echoed', () => {
    const { responder, counters } = setup();
    const reply = decodeMessage(responder.respond(encodeQuery({ id: 5, name: 'abc-1.sbx.test', type: RrType.A }), 0)!);
    expect(reply).toMatchObject({ id: 5, qr: true, aa: true, rd: true, ra: false, rcode: Rcode.NOERROR });
    expect(reply.questions).toEqual([{ name: 'abc-1.sbx.test.', type: 1, class: 1 }]);
    expect(reply.answers).toMatchObject([{ name: 'abc-1.sbx.test.', type: 1, class: 1, ttl: 0, address: '10.11.0.7' }]);
    expect(counters.get('udp', 'A', 'answer')).toBe(1);
  });

  it('gives NXDOMAIN, empty NOERROR, REFUSED, BADVERS, NOTIMP, FORMERR and drops', () => {
    const { responder, counters } = setup();
    const ask = (msg: Buffer, transport: 0 | 1 = Transport.UDP) => {
      const out = responder.respond(msg, transport);
      return out && decodeMessage(out);
    };
    const nx = ask(encodeQuery({ id: 1, name: 'nope', type: RrType.A }))!;
    expect(nx.rcode).toBe(Rcode.NXDOMAIN);
    expect(nx.questions).toHaveLength(1);
    const nodata = ask(encodeQuery({ id: 1, name: 'abc', type: RrType.AAAA }))!;
    expect(nodata).toMatchObject({ rcode: Rcode.NOERROR, answers: [] });
    expect(ask(encodeQuery({ id: 1, name: 'abc', type: RrType.A, class: 3 }))!.rcode).toBe(Rcode.REFUSED);
    const badvers = ask(encodeQuery({ id: 1, name: 'abc', type: RrType.A, edns: { version: 1 } }))!;
    expect(badvers).toMatchObject({ rcode: Rcode.BADVERS, answers: [], opt: { version: 0 } });
    expect(ask(encodeQuery({ id: 1, name: 'abc', type: RrType.A, opcode: 2 }))!.rcode).toBe(Rcode.NOTIMP);
    const twoQuestions = encodeQuery({ id: 1, name: 'abc', type: RrType.A });
    twoQuestions[5] = 2;
    expect(ask(twoQuestions, Transport.TCP)!.rcode).toBe(Rcode.FORMERR);
    expect(ask(Buffer.alloc(5))).toBeNull();
    expect(counters.get('udp', 'A', 'nxdomain')).toBe(1);
    expect(counters.get('udp', 'AAAA', 'nodata')).toBe(1);
    expect(counters.get('tcp', 'none', 'formerr')).toBe(1);
    expect(counters.get('udp', 'none', 'dropped')).toBe(1);
  });

  it('writes the same bytes into a caller buffer as it returns', () => {
    const { responder } = setup();
    const query = encodeQuery({ id: 3, name: 'ABC', type: RrType.A, edns: {} });
    const expected = responder.respond(query, Transport.UDP)!;
    const out = Buffer.alloc(600);
    const length = responder.respondInto(query, Transport.UDP, out, 100, 512);
    expect(out.subarray(100, 100 + length)).toEqual(expected);
    expect(responder.respondInto(query, Transport.UDP, out, 0, 10)).toBe(-1);
  });
});
