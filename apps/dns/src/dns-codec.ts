import { TypedError } from '#service-kit';
/**
 * DNS wire format (RFC 1035, EDNS(0) from RFC 6891): pure functions over byte arrays, no sockets.
 *
 * The server's hot path is `parseQuery` + `encodeResponse`: the query is walked once, nothing is
 * decoded that the answer does not need, and the answer is the query's header and question copied
 * byte for byte with the answer record appended. `decodeMessage` and `encodeQuery` are the general
 * (slower) halves used by tests, fuzzers and the benchmark.
 */

export const HEADER_LENGTH = 12;
/** RFC 1035 §2.3.4: a name is at most 255 octets on the wire, a label at most 63. */
export const MAX_NAME_LENGTH = 255;
export const MAX_LABEL_LENGTH = 63;
/** Compression pointers followed while reading one name; real messages need a handful. */
export const MAX_POINTER_JUMPS = 32;
/** RFC 1035 §4.2.1: the UDP limit without EDNS. */
export const CLASSIC_UDP_LIMIT = 512;

export const Rcode = {
  NOERROR: 0,
  FORMERR: 1,
  SERVFAIL: 2,
  NXDOMAIN: 3,
  NOTIMP: 4,
  REFUSED: 5,
  /** Extended (RFC 6891 §9): 16 = upper bits 1 in the OPT TTL, 0 in the header. */
  BADVERS: 16,
} as const;

export const Opcode = { QUERY: 0, IQUERY: 1, STATUS: 2, NOTIFY: 4, UPDATE: 5 } as const;

export const RrType = {
  A: 1,
  NS: 2,
  CNAME: 5,
  SOA: 6,
  PTR: 12,
  MX: 15,
  TXT: 16,
  AAAA: 28,
  SRV: 33,
  OPT: 41,
  SVCB: 64,
  HTTPS: 65,
  AXFR: 252,
  ANY: 255,
} as const;

export const RrClass = { IN: 1, CH: 3, ANY: 255 } as const;

// Header flag bits (second 16-bit word).
const FLAG_QR = 0x8000;
const FLAG_AA = 0x0400;
const FLAG_TC = 0x0200;
const FLAG_RD = 0x0100;
const FLAG_CD = 0x0010;
/** EDNS flag word: DNSSEC OK. RFC 3225 §3: copied from query to response. */
export const EDNS_FLAG_DO = 0x8000;

/** Why a packet could not be answered normally. `drop` means no reply at all. */
export type QueryProblem =
  | 'short-header'
  | 'is-response'
  | 'not-query-opcode'
  | 'question-count'
  | 'bad-name'
  | 'truncated-question'
  | 'bad-record'
  | 'bad-opt'
  | 'trailing-bytes';

/** A query parsed as far as answering needs: offsets into the caller's buffer, no copies. */
export interface ParsedQuery {
  ok: true;
  id: number;
  /** The raw flags word of the query. */
  flags: number;
  /** Offset just past QTYPE/QCLASS: bytes [0, questionEnd) are echoed in the answer. */
  questionEnd: number;
  /** Offset of the QNAME's first label's bytes and its end (exclusive); equal when QNAME is the root. */
  firstLabelStart: number;
  firstLabelEnd: number;
  /** Offset just past QNAME's terminating zero byte. */
  nameEnd: number;
  labelCount: number;
  /** The first label has an ASCII upper-case letter (lookups are case-insensitive). */
  firstLabelHasUpper: boolean;
  qtype: number;
  qclass: number;
  /** EDNS(0): present when the query had an OPT record. */
  edns: boolean;
  /** The requestor's UDP payload size (raised to 512 when lower), or 512 without EDNS. */
  udpPayloadSize: number;
  ednsVersion: number;
  /** The EDNS flags word (DO bit). */
  ednsFlags: number;
}

/** A packet that gets an error reply (`rcode`) or, when `rcode` is null, none. */
export interface RejectedQuery {
  ok: false;
  problem: QueryProblem;
  /** Null: drop silently (too short to answer, or a response: answering responses makes loops). */
  rcode: number | null;
  id: number;
  flags: number;
  /** When > 0 the question parsed and [0, questionEnd) may be echoed. */
  questionEnd: number;
  /** Non-null when the query carried a valid OPT record: the reply carries one too (RFC 6891 §6.1.1). */
  ednsFlags: number | null;
}

export type QueryParse = ParsedQuery | RejectedQuery;

function reject(
  problem: QueryProblem,
  rcode: number | null,
  msg: Uint8Array,
  questionEnd = 0,
  ednsFlags: number | null = null,
): RejectedQuery {
  const id = msg.length >= 2 ? (msg[0]! << 8) | msg[1]! : 0;
  const flags = msg.length >= 4 ? (msg[2]! << 8) | msg[3]! : 0;
  // Another opcode's message that does not parse as a query is still answered NOTIMP (header only):
  // what is unimplemented is the opcode, whatever its body looks like.
  if (rcode === Rcode.FORMERR && ((flags >> 11) & 0xf) !== Opcode.QUERY) {
    return { ok: false, problem: 'not-query-opcode', rcode: Rcode.NOTIMP, id, flags, questionEnd: 0, ednsFlags: null };
  }
  return { ok: false, problem, rcode, id, flags, questionEnd, ednsFlags };
}

/**
 * Walks a name starting at `offset` within `msg[0, end)`, following compression pointers safely:
 * each pointer must point strictly before the label that holds it (so no loops), at most
 * MAX_POINTER_JUMPS of them, into the message past the header, and the expanded name stays
 * within MAX_NAME_LENGTH. Returns the offset just past the name as stored (after the first pointer,
 * or after the zero byte), or -1 when the name is malformed. Labels go to `labels` when given.
 */
export function walkName(msg: Uint8Array, offset: number, end: number, labels?: string[]): number {
  let pos = offset;
  let next = -1;
  let jumps = 0;
  let wireLength = 0;
  // Pointers may only go backwards from the lowest position read so far.
  let floor = offset;
  for (;;) {
    if (pos >= end) return -1;
    const len = msg[pos]!;
    if (len === 0) {
      wireLength += 1;
      if (wireLength > MAX_NAME_LENGTH) return -1;
      return next === -1 ? pos + 1 : next;
    }
    const kind = len & 0xc0;
    if (kind === 0xc0) {
      if (pos + 1 >= end) return -1;
      const target = ((len & 0x3f) << 8) | msg[pos + 1]!;
      if (next === -1) next = pos + 2;
      if (++jumps > MAX_POINTER_JUMPS) return -1;
      if (target < HEADER_LENGTH || target >= floor) return -1;
      floor = target;
      pos = target;
      continue;
    }
    // 0x40 and 0x80 are the obsolete extended label types (RFC 6891 §5): not accepted.
    if (kind !== 0) return -1;
    if (pos + 1 + len > end) return -1;
    wireLength += len + 1;
    if (wireLength >= MAX_NAME_LENGTH) return -1;
    if (labels) labels.push(labelText(msg, pos + 1, pos + 1 + len));
    pos += len + 1;
  }
}

function labelText(msg: Uint8Array, start: number, end: number): string {
  let out = '';
  for (let i = start; i < end; i++) {
    const c = msg[i]!;
    if (c === 0x2e || c === 0x5c) out += '\\' + String.fromCharCode(c);
    else if (c > 0x20 && c < 0x7f) out += String.fromCharCode(c);
    else out += '\\' + String(c).padStart(3, '0');
  }
  return out;
}

/**
 * Parses a query far enough to answer it (hot path: no allocation besides the result).
 * Another opcode gets NOTIMP, with the question and OPT echoed when they parse. Exactly one question, no compression in it (a pointer in the first question could only point
 * into the header), the answer and authority sections skipped, the additional section scanned for
 * one OPT record (RFC 6891 §6.1.1: more than one, or one not owned by the root, is FORMERR), and
 * nothing after the last record.
 */
export function parseQuery(msg: Uint8Array): QueryParse {
  const end = msg.length;
  if (end < HEADER_LENGTH) return reject('short-header', null, msg);
  const flags = (msg[2]! << 8) | msg[3]!;
  if (flags & FLAG_QR) return reject('is-response', null, msg);
  const qdcount = (msg[4]! << 8) | msg[5]!;
  if (qdcount !== 1) return reject('question-count', Rcode.FORMERR, msg);

  let pos = HEADER_LENGTH;
  let labelCount = 0;
  let firstLabelStart = pos + 1;
  let firstLabelEnd = pos + 1;
  let firstLabelHasUpper = false;
  let wireLength = 1;
  for (;;) {
    if (pos >= end) return reject('truncated-question', Rcode.FORMERR, msg);
    const len = msg[pos]!;
    if (len === 0) {
      pos++;
      break;
    }
    if (len > MAX_LABEL_LENGTH) return reject('bad-name', Rcode.FORMERR, msg);
    const labelEnd = pos + 1 + len;
    if (labelEnd > end) return reject('truncated-question', Rcode.FORMERR, msg);
    wireLength += len + 1;
    if (wireLength > MAX_NAME_LENGTH) return reject('bad-name', Rcode.FORMERR, msg);
    if (labelCount === 0) {
      firstLabelStart = pos + 1;
      firstLabelEnd = labelEnd;
      for (let i = firstLabelStart; i < labelEnd; i++) {
        const c = msg[i]!;
        if (c >= 0x41 && c <= 0x5a) {
          firstLabelHasUpper = true;
          break;
        }
      }
    }
    labelCount++;
    pos = labelEnd;
  }
  if (labelCount === 0) firstLabelStart = firstLabelEnd = HEADER_LENGTH;
  const nameEnd = pos;
  if (pos + 4 > end) return reject('truncated-question', Rcode.FORMERR, msg);
  const qtype = (msg[pos]! << 8) | msg[pos + 1]!;
  const qclass = (msg[pos + 2]! << 8) | msg[pos + 3]!;
  pos += 4;
  const questionEnd = pos;

  const skipCount = ((msg[6]! << 8) | msg[7]!) + ((msg[8]! << 8) | msg[9]!);
  const arcount = (msg[10]! << 8) | msg[11]!;
  let edns = false;
  let udpPayloadSize = CLASSIC_UDP_LIMIT;
  let ednsVersion = 0;
  let ednsFlags = 0;
  for (let i = 0; i < skipCount + arcount; i++) {
    const ownerStart = pos;
    pos = walkName(msg, pos, end);
    if (pos < 0 || pos + 10 > end) return reject('bad-record', Rcode.FORMERR, msg, questionEnd);
    const type = (msg[pos]! << 8) | msg[pos + 1]!;
    const rdlength = (msg[pos + 8]! << 8) | msg[pos + 9]!;
    if (pos + 10 + rdlength > end) return reject('bad-record', Rcode.FORMERR, msg, questionEnd);
    if (type === RrType.OPT) {
      if (i < skipCount || edns || msg[ownerStart] !== 0) return reject('bad-opt', Rcode.FORMERR, msg, questionEnd);
      edns = true;
      const size = (msg[pos + 2]! << 8) | msg[pos + 3]!;
      udpPayloadSize = size < CLASSIC_UDP_LIMIT ? CLASSIC_UDP_LIMIT : size;
      ednsVersion = msg[pos + 5]!;
      ednsFlags = (msg[pos + 6]! << 8) | msg[pos + 7]!;
      if (!validOptions(msg, pos + 10, pos + 10 + rdlength)) {
        return reject('bad-opt', Rcode.FORMERR, msg, questionEnd);
      }
    }
    pos += 10 + rdlength;
  }
  if (pos !== end) return reject('trailing-bytes', Rcode.FORMERR, msg, questionEnd, edns ? ednsFlags : null);
  if (((flags >> 11) & 0xf) !== Opcode.QUERY) {
    return reject('not-query-opcode', Rcode.NOTIMP, msg, questionEnd, edns ? ednsFlags : null);
  }
  return {
    ok: true,
    id: (msg[0]! << 8) | msg[1]!,
    flags,
    questionEnd,
    firstLabelStart,
    firstLabelEnd,
    nameEnd,
    labelCount,
    firstLabelHasUpper,
    qtype,
    qclass,
    edns,
    udpPayloadSize,
    ednsVersion,
    ednsFlags,
  };
}

/** OPT RDATA is a sequence of {code u16, length u16, data}; they must tile it exactly. */
function validOptions(msg: Uint8Array, start: number, end: number): boolean {
  let pos = start;
  while (pos < end) {
    if (pos + 4 > end) return false;
    pos += 4 + ((msg[pos + 2]! << 8) | msg[pos + 3]!);
  }
  return pos === end;
}

/** What the server answers; the question and id come from the query. */
export interface ResponseSpec {
  rcode: number;
  /** The A record's address (4 bytes), or null for no answer. */
  address: Uint8Array | null;
  ttl: number;
  /** Answer with an OPT record advertising this UDP payload size (null: no OPT). */
  ednsUdpSize: number | null;
  /** Echoed EDNS flags (DO). */
  ednsFlags: number;
  /** Largest message allowed (UDP); past it the answer is dropped and TC set. */
  maxLength: number;
}

/** An A record whose owner is a compression pointer: 2 + 10 + 4 bytes. */
export const A_RECORD_LENGTH = 16;
/** An OPT record without options. */
export const OPT_RECORD_LENGTH = 11;

/**
 * Builds the response to a parsed (or a rejected-but-echoable) query: the query's bytes
 * [0, questionEnd) copied, flags set (QR, AA, opcode/RD/CD kept), counts rewritten, an A record
 * whose owner is a pointer to the question name, and an OPT record when asked. When the whole
 * answer exceeds `maxLength` the answer is left out and TC set (RFC 2181 §9).
 */
export function encodeResponse(query: Uint8Array, questionEnd: number, spec: ResponseSpec): Buffer {
  const out = Buffer.allocUnsafe(responseLength(questionEnd, spec));
  encodeResponseInto(out, 0, query, questionEnd, spec);
  return out;
}

/** The byte length `encodeResponse` will produce (TC answers drop the A record). */
export function responseLength(questionEnd: number, spec: ResponseSpec): number {
  const base = questionEnd > HEADER_LENGTH ? questionEnd : HEADER_LENGTH;
  const optLength = spec.ednsUdpSize === null ? 0 : OPT_RECORD_LENGTH;
  const answer = spec.address !== null && questionEnd > HEADER_LENGTH;
  const full = base + (answer ? A_RECORD_LENGTH : 0) + optLength;
  return full > spec.maxLength && answer ? full - A_RECORD_LENGTH : full;
}

/**
 * `encodeResponse` into `out` at `offset` (the batch UDP path writes straight into the send
 * buffers). `out` must have `responseLength(...)` bytes free at `offset`. Returns that length.
 */
export function encodeResponseInto(
  out: Uint8Array,
  offset: number,
  query: Uint8Array,
  questionEnd: number,
  spec: ResponseSpec,
): number {
  const hasQuestion = questionEnd > HEADER_LENGTH;
  const base = hasQuestion ? questionEnd : HEADER_LENGTH;
  const optLength = spec.ednsUdpSize === null ? 0 : OPT_RECORD_LENGTH;
  let answer = spec.address !== null && hasQuestion;
  let truncated = false;
  if (answer && base + A_RECORD_LENGTH + optLength > spec.maxLength) {
    answer = false;
    truncated = true;
  }
  // A byte loop: for these few dozen bytes it beats creating a subarray view to copy from.
  const copied = query.length >= base ? base : Math.min(query.length, 4);
  for (let i = 0; i < copied; i++) out[offset + i] = query[i]!;
  for (let i = copied; i < base; i++) out[offset + i] = 0;
  const queryFlags = (out[offset + 2]! << 8) | out[offset + 3]!;
  const flags =
    FLAG_QR | (queryFlags & (0x7800 | FLAG_RD | FLAG_CD)) | FLAG_AA | (truncated ? FLAG_TC : 0) | (spec.rcode & 0xf);
  out[offset + 2] = flags >> 8;
  out[offset + 3] = flags & 0xff;
  out[offset + 4] = 0;
  out[offset + 5] = hasQuestion ? 1 : 0;
  out[offset + 6] = 0;
  out[offset + 7] = answer ? 1 : 0;
  out[offset + 8] = 0;
  out[offset + 9] = 0;
  out[offset + 10] = 0;
  out[offset + 11] = optLength ? 1 : 0;
  let pos = offset + base;
  if (answer) {
    const address = spec.address!;
    const ttl = spec.ttl >>> 0;
    // Owner: pointer to the question name at offset 12.
    out[pos] = 0xc0;
    out[pos + 1] = HEADER_LENGTH;
    out[pos + 2] = 0;
    out[pos + 3] = RrType.A;
    out[pos + 4] = 0;
    out[pos + 5] = RrClass.IN;
    out[pos + 6] = ttl >>> 24;
    out[pos + 7] = (ttl >>> 16) & 0xff;
    out[pos + 8] = (ttl >>> 8) & 0xff;
    out[pos + 9] = ttl & 0xff;
    out[pos + 10] = 0;
    out[pos + 11] = 4;
    out[pos + 12] = address[0]!;
    out[pos + 13] = address[1]!;
    out[pos + 14] = address[2]!;
    out[pos + 15] = address[3]!;
    pos += A_RECORD_LENGTH;
  }
  if (optLength) {
    const size = spec.ednsUdpSize!;
    out[pos] = 0;
    out[pos + 1] = 0;
    out[pos + 2] = RrType.OPT;
    out[pos + 3] = size >> 8;
    out[pos + 4] = size & 0xff;
    out[pos + 5] = (spec.rcode >> 4) & 0xff;
    out[pos + 6] = 0; // the EDNS version we speak
    out[pos + 7] = (spec.ednsFlags & EDNS_FLAG_DO) >> 8;
    out[pos + 8] = 0;
    out[pos + 9] = 0;
    out[pos + 10] = 0;
    pos += OPT_RECORD_LENGTH;
  }
  return pos - offset;
}

// ---------------------------------------------------------------------------------------------
// General decoding and query encoding (tests, fuzzing, benchmark).

export interface DecodedQuestion {
  name: string;
  type: number;
  class: number;
}

export interface DecodedRecord {
  name: string;
  type: number;
  class: number;
  ttl: number;
  data: Uint8Array;
  /** For A records: the dotted address. */
  address?: string;
}

export interface DecodedMessage {
  id: number;
  qr: boolean;
  opcode: number;
  aa: boolean;
  tc: boolean;
  rd: boolean;
  ra: boolean;
  /** The full rcode, including the EDNS extended bits when an OPT record is present. */
  rcode: number;
  questions: DecodedQuestion[];
  answers: DecodedRecord[];
  authority: DecodedRecord[];
  additional: DecodedRecord[];
  opt: { udpSize: number; version: number; flags: number } | null;
}

/** Raised by `decodeMessage` on malformed bytes; `offset` is where decoding stopped. */
export class DnsMessageInvalid extends TypedError {
  readonly code = 'DNS_MESSAGE_INVALID';
  constructor(
    readonly reason: string,
    readonly offset: number,
  ) {
    super(`malformed DNS message at offset ${offset}: ${reason}`);
  }
}

function readNameAt(msg: Uint8Array, pos: number): { name: string; next: number } {
  const labels: string[] = [];
  const next = walkName(msg, pos, msg.length, labels);
  if (next < 0) throw new DnsMessageInvalid('bad name (length, label type or compression pointer)', pos);
  return { name: labels.length ? labels.join('.') + '.' : '.', next };
}

/** Decodes a whole message, any section, with compression. Throws DnsMessageInvalid. */
export function decodeMessage(msg: Uint8Array): DecodedMessage {
  if (msg.length < HEADER_LENGTH) throw new DnsMessageInvalid('shorter than the header', 0);
  const u16 = (at: number) => (msg[at]! << 8) | msg[at + 1]!;
  const flags = u16(2);
  const counts = [u16(4), u16(6), u16(8), u16(10)] as const;
  let pos = HEADER_LENGTH;
  const questions: DecodedQuestion[] = [];
  for (let i = 0; i < counts[0]; i++) {
    const { name, next } = readNameAt(msg, pos);
    if (next + 4 > msg.length) throw new DnsMessageInvalid('question cut short', next);
    questions.push({ name, type: u16(next), class: u16(next + 2) });
    pos = next + 4;
  }
  const sections: DecodedRecord[][] = [[], [], []];
  let opt: DecodedMessage['opt'] = null;
  let extendedRcode = 0;
  for (let s = 0; s < 3; s++) {
    for (let i = 0; i < counts[s + 1]!; i++) {
      const { name, next } = readNameAt(msg, pos);
      if (next + 10 > msg.length) throw new DnsMessageInvalid('record header cut short', next);
      const type = u16(next);
      const rdlength = u16(next + 8);
      const dataStart = next + 10;
      if (dataStart + rdlength > msg.length) throw new DnsMessageInvalid('record data cut short', dataStart);
      const ttl = ((msg[next + 4]! << 24) | (msg[next + 5]! << 16) | (msg[next + 6]! << 8) | msg[next + 7]!) >>> 0;
      const record: DecodedRecord = {
        name,
        type,
        class: u16(next + 2),
        ttl,
        data: msg.slice(dataStart, dataStart + rdlength),
      };
      if (type === RrType.A && rdlength === 4) record.address = Array.from(record.data).join('.');
      if (type === RrType.OPT && s === 2) {
        opt = { udpSize: record.class, version: (ttl >>> 16) & 0xff, flags: ttl & 0xffff };
        extendedRcode = ttl >>> 24;
      }
      sections[s]!.push(record);
      pos = dataStart + rdlength;
    }
  }
  return {
    id: u16(0),
    qr: (flags & FLAG_QR) !== 0,
    opcode: (flags >> 11) & 0xf,
    aa: (flags & FLAG_AA) !== 0,
    tc: (flags & FLAG_TC) !== 0,
    rd: (flags & FLAG_RD) !== 0,
    ra: (flags & 0x0080) !== 0,
    rcode: (extendedRcode << 4) | (flags & 0xf),
    questions,
    answers: sections[0]!,
    authority: sections[1]!,
    additional: sections[2]!,
    opt,
  };
}

export interface QuerySpec {
  id: number;
  name: string;
  type: number;
  class?: number;
  rd?: boolean;
  opcode?: number;
  /** Add an OPT record (EDNS). */
  edns?: { udpSize?: number; version?: number; flags?: number };
}

/** Encodes a one-question query (no compression). Throws on a name that cannot be encoded. */
export function encodeQuery(spec: QuerySpec): Buffer {
  const labels = spec.name
    .replace(/\.$/, '')
    .split('.')
    .filter((l) => l.length > 0);
  const nameBytes = labels.reduce((n, l) => n + 1 + Buffer.byteLength(l, 'latin1'), 1);
  if (nameBytes > MAX_NAME_LENGTH) throw new RangeError(`name too long: ${spec.name}`);
  const length = HEADER_LENGTH + nameBytes + 4 + (spec.edns ? OPT_RECORD_LENGTH : 0);
  const out = Buffer.alloc(length);
  out.writeUInt16BE(spec.id & 0xffff, 0);
  out.writeUInt16BE(((spec.opcode ?? 0) << 11) | (spec.rd === false ? 0 : FLAG_RD), 2);
  out.writeUInt16BE(1, 4);
  out.writeUInt16BE(spec.edns ? 1 : 0, 10);
  let pos = HEADER_LENGTH;
  for (const label of labels) {
    const bytes = Buffer.from(label, 'latin1');
    if (bytes.length > MAX_LABEL_LENGTH) throw new RangeError(`label too long: ${label}`);
    out[pos++] = bytes.length;
    out.set(bytes, pos);
    pos += bytes.length;
  }
  out[pos++] = 0;
  out.writeUInt16BE(spec.type, pos);
  out.writeUInt16BE(spec.class ?? RrClass.IN, pos + 2);
  pos += 4;
  if (spec.edns) {
    out[pos] = 0;
    out.writeUInt16BE(RrType.OPT, pos + 1);
    out.writeUInt16BE(spec.edns.udpSize ?? 1232, pos + 3);
    out[pos + 5] = 0;
    out[pos + 6] = spec.edns.version ?? 0;
    out.writeUInt16BE(spec.edns.flags ?? 0, pos + 7);
    out.writeUInt16BE(0, pos + 9);
  }
  return out;
}

/** Wraps a message for DNS over TCP (RFC 1035 §4.2.2: two-byte length prefix). */
export function frameTcp(msg: Uint8Array): Buffer {
  const out = Buffer.allocUnsafe(msg.length + 2);
  out.writeUInt16BE(msg.length, 0);
  out.set(msg, 2);
  return out;
}
