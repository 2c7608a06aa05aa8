import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import {
  decodeMessage,
  DnsMessageInvalid,
  encodeQuery,
  encodeResponse,
  frameTcp,
  MAX_POINTER_JUMPS,
  parseQuery,
  Rcode,
  RrType,
  walkName,
  type ParsedQuery,
  type ResponseSpec,
} from './dns-codec.js';

const noAnswer: ResponseSpec = {
  rcode: Rcode.NOERROR,
  address: null,
  ttl: 0,
  ednsUdpSize: null,
  ednsFlags: 0,
  maxLength: 512,
};

function parsed(msg: Uint8Array): ParsedQuery {
  const result = parseQuery(msg);
  if (!result.ok) throw new Error(`expected a query, got ${result.problem}`);
  return result;
}

describe('parseQuery', () => {
  it('finds the question, first label and EDNS fields', () => {
    const msg = encodeQuery({
      id: 0x1234,
      name: 'AbC-8080.sbx.test',
      type: RrType.A,
      edns: { udpSize: 4096, flags: 0x8000 },
    });
    const q = parsed(msg);
    expect(q.id).toBe(0x1234);
    expect(q.labelCount).toBe(3);
    expect(Buffer.from(msg.subarray(q.firstLabelStart, q.firstLabelEnd)).toString()).toBe('AbC-8080');
    expect(q.firstLabelHasUpper).toBe(true);
    expect(q.qtype).toBe(RrType.A);
    expect(q.qclass).toBe(1);
    expect(q.nameEnd).toBe(12 + 1 + 8 + 1 + 3 + 1 + 4 + 1);
    expect(q.questionEnd).toBe(q.nameEnd + 4);
    expect(q.edns).toBe(true);
    expect(q.udpPayloadSize).toBe(4096);
    expect(q.ednsVersion).toBe(0);
    expect(q.ednsFlags).toBe(0x8000);
  });

  it('raises a tiny EDNS payload size to 512 and defaults to 512 without EDNS', () => {
    expect(parsed(encodeQuery({ id: 1, name: 'a', type: 1, edns: { udpSize: 100 } })).udpPayloadSize).toBe(512);
    const plain = parsed(encodeQuery({ id: 1, name: 'a', type: 1 }));
    expect(plain.edns).toBe(false);
    expect(plain.udpPayloadSize).toBe(512);
  });

  it('reports the EDNS version so the server can answer BADVERS', () => {
    expect(parsed(encodeQuery({ id: 1, name: 'a', type: 1, edns: { version: 1 } })).ednsVersion).toBe(1);
  });

  it('accepts the root name', () => {
    const q = parsed(encodeQuery({ id: 1, name: '.', type: RrType.NS }));
    expect(q.labelCount).toBe(0);
    expect(q.questionEnd).toBe(12 + 1 + 4);
  });

  it('drops what it cannot or must not answer', () => {
    expect(parseQuery(new Uint8Array(11))).toMatchObject({ ok: false, problem: 'short-header', rcode: null });
    const response = encodeQuery({ id: 7, name: 'a', type: 1 });
    response[2]! |= 0x80;
    expect(parseQuery(response)).toMatchObject({ ok: false, problem: 'is-response', rcode: null });
  });

  it('answers NOTIMP to other opcodes and FORMERR to broken queries', () => {
    expect(parseQuery(encodeQuery({ id: 7, name: 'a', type: 1, opcode: 4 }))).toMatchObject({
      ok: false,
      problem: 'not-query-opcode',
      rcode: Rcode.NOTIMP,
      id: 7,
    });
    // The question and OPT of another opcode's message are echoed when they parse...
    const notifyWithOpt = encodeQuery({ id: 8, name: 'a', type: 6, opcode: 4, edns: { flags: 0x8000 } });
    expect(parseQuery(notifyWithOpt)).toMatchObject({
      rcode: Rcode.NOTIMP,
      questionEnd: 12 + 3 + 4,
      ednsFlags: 0x8000,
    });
    // ...and when they do not, the answer is still NOTIMP, header only.
    const updateGarbage = Buffer.concat([
      encodeQuery({ id: 9, name: 'a', type: 6, opcode: 5 }),
      Buffer.from([1, 2, 3]),
    ]);
    updateGarbage[5] = 3;
    expect(parseQuery(updateGarbage)).toMatchObject({ rcode: Rcode.NOTIMP, questionEnd: 0, ednsFlags: null });
    const twoQuestions = encodeQuery({ id: 7, name: 'a', type: 1 });
    twoQuestions[5] = 2;
    expect(parseQuery(twoQuestions)).toMatchObject({ problem: 'question-count', rcode: Rcode.FORMERR });
    const cut = encodeQuery({ id: 7, name: 'abc', type: 1 }).subarray(0, 16);
    expect(parseQuery(cut)).toMatchObject({ problem: 'truncated-question', rcode: Rcode.FORMERR });
    const trailing = Buffer.concat([encodeQuery({ id: 7, name: 'abc', type: 1 }), Buffer.from([0])]);
    expect(parseQuery(trailing)).toMatchObject({ problem: 'trailing-bytes', rcode: Rcode.FORMERR, questionEnd: 21 });
  });

  it('rejects a compression pointer or an extended label type in the question', () => {
    const msg = Buffer.from(encodeQuery({ id: 1, name: 'abc', type: 1 }));
    msg[12] = 0xc0;
    msg[13] = 0x0c;
    expect(parseQuery(msg)).toMatchObject({ ok: false, rcode: Rcode.FORMERR });
    msg[12] = 0x41;
    expect(parseQuery(msg)).toMatchObject({ ok: false, rcode: Rcode.FORMERR });
  });

  it('rejects a second OPT, an OPT not owned by the root, and OPT options that do not tile', () => {
    const base = encodeQuery({ id: 1, name: 'abc', type: 1, edns: {} });
    const opt = base.subarray(base.length - 11);
    const twoOpts = Buffer.concat([base, opt]);
    twoOpts[11] = 2;
    expect(parseQuery(twoOpts)).toMatchObject({ problem: 'bad-opt', rcode: Rcode.FORMERR });

    // OPT owned by a compressed name (pointer to the question name).
    const named = Buffer.concat([base.subarray(0, base.length - 11), Buffer.from([0xc0, 12]), opt.subarray(1)]);
    expect(parseQuery(named)).toMatchObject({ problem: 'bad-opt' });

    const badOptions = Buffer.concat([base, Buffer.from([0, 10, 0, 9, 1, 2])]);
    badOptions.writeUInt16BE(6, base.length - 2);
    expect(parseQuery(badOptions)).toMatchObject({ problem: 'bad-opt' });
    const goodOptions = Buffer.concat([base, Buffer.from([0, 10, 0, 2, 1, 2])]);
    goodOptions.writeUInt16BE(6, base.length - 2);
    expect(parseQuery(goodOptions).ok).toBe(true);
  });

  it('skips answer and authority records, with compressed owner names', () => {
    const query = encodeQuery({ id: 1, name: 'abc', type: 1 });
    const record = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4]);
    const msg = Buffer.concat([query, record, record]);
    msg[7] = 1;
    msg[9] = 1;
    expect(parsed(msg).questionEnd).toBe(query.length);
  });

  it('rejects names past 255 bytes and labels past 63', () => {
    const long = Array.from({ length: 5 }, () => 'a'.repeat(60)).join('.');
    const msg = Buffer.alloc(12 + 5 * 61 + 1 + 4);
    msg[5] = 1;
    let pos = 12;
    for (const label of long.split('.')) {
      msg[pos++] = label.length;
      pos += msg.write(label, pos);
    }
    expect(parseQuery(msg)).toMatchObject({ problem: 'bad-name', rcode: Rcode.FORMERR });
    const label64 = Buffer.alloc(12 + 1 + 64 + 1 + 4);
    label64[5] = 1;
    label64[12] = 64;
    expect(parseQuery(label64)).toMatchObject({ rcode: Rcode.FORMERR });
  });
});

describe('walkName (compression pointers)', () => {
  function message(...bytes: number[]): Uint8Array {
    return Uint8Array.from([...new Array<number>(12).fill(0), ...bytes]);
  }

  it('follows a backward pointer and returns the offset after the pointer', () => {
    const msg = message(3, 0x61, 0x62, 0x63, 0, 1, 0x78, 0xc0, 12);
    const labels: string[] = [];
    expect(walkName(msg, 17, msg.length, labels)).toBe(21);
    expect(labels).toEqual(['x', 'abc']);
  });

  it('refuses loops, self references, forward pointers and pointers into the header', () => {
    expect(walkName(message(0xc0, 12), 12, 14)).toBe(-1); // points at itself
    expect(walkName(message(1, 0x61, 0xc0, 12), 12, 16)).toBe(-1); // back into its own name
    expect(walkName(message(0xc0, 14, 0), 12, 15)).toBe(-1); // forward
    expect(walkName(message(0xc0, 2), 12, 14)).toBe(-1); // header
    // Two pointers pointing at each other.
    const loop = message(0, 0, 0xc0, 14, 0xc0, 16);
    expect(walkName(loop, 16, loop.length)).toBe(-1);
  });

  it('caps the number of jumps', () => {
    // A chain of pointers each to the previous one: one more than allowed.
    const bytes = [0];
    for (let i = 0; i <= MAX_POINTER_JUMPS; i++) bytes.push(0xc0, 12 + Math.max(0, bytes.length - 2));
    const msg = message(...bytes);
    expect(walkName(msg, msg.length - 2, msg.length)).toBe(-1);
    const shortChain = message(0, 0xc0, 12, 0xc0, 13);
    expect(walkName(shortChain, 15, shortChain.length)).toBe(17);
  });

  it('caps the expanded length even when each piece is short', () => {
    // 5 x 60-byte labels built from pointers to earlier labels.
    const bytes: number[] = [60, ...new Array<number>(60).fill(0x61), 0];
    let previous = 12;
    for (let i = 0; i < 4; i++) {
      const here = 12 + bytes.length;
      bytes.push(60, ...new Array<number>(60).fill(0x62), 0xc0, previous);
      previous = here;
    }
    const msg = message(...bytes);
    expect(walkName(msg, previous, msg.length)).toBe(-1);
  });

  it('terminates and stays in bounds on arbitrary bytes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ minLength: 0, maxLength: 300 }), fc.nat(300), (bytes, start) => {
        const msg = Uint8Array.from([...new Array<number>(12).fill(0), ...bytes]);
        const offset = Math.min(12 + start, msg.length);
        const next = walkName(msg, offset, msg.length);
        return next === -1 || (next > offset && next <= msg.length);
      }),
      { numRuns: 3000, seed: 6 },
    );
  });
});

describe('encodeResponse', () => {
  it('produces the exact answer bytes: question copied, pointer owner, TTL, address, OPT', () => {
    const query = encodeQuery({ id: 0xbeef, name: 'Sbx', type: RrType.A, edns: { flags: 0x8000 } });
    const q = parsed(query);
    const out = encodeResponse(query, q.questionEnd, {
      rcode: Rcode.NOERROR,
      address: Uint8Array.from([10, 11, 0, 5]),
      ttl: 0,
      ednsUdpSize: 1232,
      ednsFlags: q.ednsFlags,
      maxLength: q.udpPayloadSize,
    });
    expect(out.toString('hex')).toBe(
      [
        'beef', // id
        '8500', // QR AA RD, NOERROR
        '0001000100000001', // counts
        '03536278000001' + '0001', // question: Sbx A IN
        'c00c00010001000000000004' + '0a0b0005', // answer
        '0000290' + '4d0' + '0000' + '8000' + '0000', // OPT: udp 1232, DO echoed
      ].join(''),
    );
  });

  it('sets TC and leaves the answer out when it does not fit', () => {
    const query = encodeQuery({ id: 1, name: 'abc', type: RrType.A });
    const q = parsed(query);
    const out = encodeResponse(query, q.questionEnd, {
      ...noAnswer,
      address: Uint8Array.from([1, 2, 3, 4]),
      maxLength: q.questionEnd + 15,
    });
    const decoded = decodeMessage(out);
    expect(decoded.tc).toBe(true);
    expect(decoded.answers).toEqual([]);
    expect(decoded.questions).toEqual([{ name: 'abc.', type: 1, class: 1 }]);
  });

  it('encodes BADVERS in the OPT record (extended rcode 1, header rcode 0)', () => {
    const query = encodeQuery({ id: 1, name: 'abc', type: RrType.A, edns: { version: 1 } });
    const q = parsed(query);
    const decoded = decodeMessage(
      encodeResponse(query, q.questionEnd, { ...noAnswer, rcode: Rcode.BADVERS, ednsUdpSize: 1232 }),
    );
    expect(decoded.rcode).toBe(Rcode.BADVERS);
    expect(decoded.opt).toEqual({ udpSize: 1232, version: 0, flags: 0 });
  });

  it('answers header-only when the question is not echoable', () => {
    const query = encodeQuery({ id: 0x4242, name: 'abc', type: RrType.A, opcode: 5 });
    const decoded = decodeMessage(encodeResponse(query, 0, { ...noAnswer, rcode: Rcode.NOTIMP }));
    expect(decoded).toMatchObject({ id: 0x4242, qr: true, opcode: 5, rcode: Rcode.NOTIMP, questions: [] });
  });
});

describe('decodeMessage', () => {
  it('round-trips encodeQuery', () => {
    const decoded = decodeMessage(encodeQuery({ id: 9, name: 'x.y', type: RrType.TXT, edns: { udpSize: 1400 } }));
    expect(decoded).toMatchObject({ id: 9, qr: false, rd: true, questions: [{ name: 'x.y.', type: RrType.TXT }] });
    expect(decoded.opt).toEqual({ udpSize: 1400, version: 0, flags: 0 });
  });

  it('throws DnsMessageInvalid, and nothing else, on arbitrary and mutated bytes', () => {
    const seedQuery = encodeQuery({ id: 1, name: 'abc.sbx', type: 1, edns: {} });
    const mutated = fc
      .array(fc.tuple(fc.nat(seedQuery.length - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 6 })
      .map((edits) => {
        const copy = Buffer.from(seedQuery);
        for (const [at, value] of edits) copy[at] = value;
        return copy;
      });
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 600 }), mutated), (bytes) => {
        try {
          decodeMessage(bytes);
        } catch (err) {
          return err instanceof DnsMessageInvalid;
        }
        return true;
      }),
      { numRuns: 5000, seed: 61 },
    );
  });
});

describe('codec fuzz: parseQuery and encodeResponse', () => {
  const seedQueries = [
    encodeQuery({ id: 1, name: 'abc', type: 1 }),
    encodeQuery({ id: 2, name: 'abc-1.sbx.test', type: 28, edns: { udpSize: 4096 } }),
    encodeQuery({ id: 3, name: '.', type: 255, edns: { version: 2 } }),
  ];
  const mutated = fc
    .tuple(
      fc.constantFrom(...seedQueries),
      fc.array(fc.tuple(fc.nat(80), fc.integer({ min: 0, max: 255 })), { maxLength: 8 }),
      fc.nat(8),
      fc.uint8Array({ maxLength: 20 }),
    )
    .map(([seed, edits, cut, tail]) => {
      const copy = Buffer.concat([seed.subarray(0, Math.max(0, seed.length - cut)), tail]);
      for (const [at, value] of edits) if (at < copy.length) copy[at] = value;
      return copy;
    });

  it('never throws; every reply it builds decodes, echoes the id and is a response', () => {
    fc.assert(
      fc.property(fc.oneof(fc.uint8Array({ maxLength: 600 }), mutated), (bytes) => {
        const result = parseQuery(bytes);
        if (!result.ok && result.rcode === null) return true;
        const reply = encodeResponse(bytes, result.questionEnd, {
          ...noAnswer,
          rcode: result.ok ? Rcode.NXDOMAIN : result.rcode!,
          address: result.ok ? Uint8Array.from([1, 2, 3, 4]) : null,
          ednsUdpSize: result.ok && result.edns ? 1232 : null,
        });
        const decoded = decodeMessage(reply);
        expect(decoded.qr).toBe(true);
        expect(decoded.id).toBe(result.id);
        if (result.ok) expect(decoded.questions).toHaveLength(1);
        return true;
      }),
      { numRuns: 10000, seed: 1035 },
    );
  });

  it('frames TCP messages with a big-endian length', () => {
    expect(frameTcp(Uint8Array.from([1, 2, 3])).toString('hex')).toBe('0003010203');
  });
});
