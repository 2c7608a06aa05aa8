import {
  A_RECORD_LENGTH,
  encodeResponse,
  encodeResponseInto,
  OPT_RECORD_LENGTH,
  parseQuery,
  Rcode,
  responseLength,
  RrClass,
  RrType,
  type ResponseSpec,
} from './dns-codec.js';
import {
  QueryResult,
  Transport,
  type QueryCounters,
  type QueryResultIndex,
  type TransportIndex,
} from './query-counters.js';
import type { RecordTable } from './record-table.js';

export interface ResponderOptions {
  table: RecordTable;
  counters: QueryCounters;
  /** TTL of every answer: 0, sandboxes come and go (DESIGN.md §6). */
  ttl?: number;
  /** The UDP payload size we advertise in OPT (1232: the DNS flag day 2020 value). */
  ednsUdpSize?: number;
}

/** TCP messages are bounded only by the two-byte length prefix. */
const TCP_LIMIT = 65535;

/**
 * Decides the answer to one query message; no sockets. Drops (no reply) packets too short to
 * answer and packets that are themselves responses.
 */
export class DnsResponder {
  private readonly table: RecordTable;
  private readonly counters: QueryCounters;
  private readonly ttl: number;
  private readonly ednsUdpSize: number;
  // Reused for every query: the hot path allocates only the response bytes (or nothing).
  private readonly spec: ResponseSpec = {
    rcode: 0,
    address: null,
    ttl: 0,
    ednsUdpSize: null,
    ednsFlags: 0,
    maxLength: TCP_LIMIT,
  };

  constructor(options: ResponderOptions) {
    this.table = options.table;
    this.counters = options.counters;
    this.ttl = options.ttl ?? 0;
    this.ednsUdpSize = options.ednsUdpSize ?? 1232;
  }

  /** The response as a new buffer, or null for no reply. */
  respond(msg: Buffer, transport: TransportIndex): Buffer | null {
    const questionEnd = this.decide(msg, transport);
    return questionEnd < 0 ? null : encodeResponse(msg, questionEnd, this.spec);
  }

  /**
   * The response written into `out` at `offset`; returns its length, 0 for no reply, or -1 when it
   * needs more than `room` bytes (cannot happen for answers this server gives under 512 bytes).
   */
  respondInto(msg: Buffer, transport: TransportIndex, out: Uint8Array, offset: number, room: number): number {
    const questionEnd = this.decide(msg, transport);
    if (questionEnd < 0) return 0;
    if (responseLength(questionEnd, this.spec) > room) return -1;
    return encodeResponseInto(out, offset, msg, questionEnd, this.spec);
  }

  /** Fills `this.spec`, counts the query, returns the question end to echo (or -1: drop). */
  private decide(msg: Buffer, transport: TransportIndex): number {
    const spec = this.spec;
    const query = parseQuery(msg);
    if (!query.ok) {
      if (query.rcode === null) {
        this.counters.count(transport, -1, QueryResult.DROPPED);
        return -1;
      }
      this.counters.count(transport, -1, query.rcode === Rcode.NOTIMP ? QueryResult.NOTIMP : QueryResult.FORMERR);
      spec.rcode = query.rcode;
      spec.address = null;
      spec.ednsUdpSize = query.ednsFlags === null ? null : this.ednsUdpSize;
      spec.ednsFlags = query.ednsFlags ?? 0;
      spec.maxLength = TCP_LIMIT;
      return query.questionEnd;
    }
    spec.maxLength = transport === Transport.UDP ? query.udpPayloadSize : TCP_LIMIT;
    spec.ednsUdpSize = query.edns ? this.ednsUdpSize : null;
    spec.ednsFlags = query.ednsFlags;
    spec.ttl = this.ttl;
    spec.rcode = Rcode.NOERROR;
    spec.address = null;
    let result: QueryResultIndex;
    if (query.edns && query.ednsVersion > 0) {
      // RFC 6891 §6.1.3: we speak version 0 only.
      spec.rcode = Rcode.BADVERS;
      result = QueryResult.BADVERS;
    } else if (query.qclass !== RrClass.IN && query.qclass !== RrClass.ANY) {
      spec.rcode = Rcode.REFUSED;
      result = QueryResult.REFUSED;
    } else {
      const entry = this.table.resolve(msg, query);
      if (entry === undefined) {
        spec.rcode = Rcode.NXDOMAIN;
        result = QueryResult.NXDOMAIN;
      } else if (query.qtype === RrType.A || query.qtype === RrType.ANY) {
        spec.address = entry.bytes;
        // encodeResponse leaves the answer out (and sets TC) when it does not fit.
        const withAnswer = query.questionEnd + A_RECORD_LENGTH + (query.edns ? OPT_RECORD_LENGTH : 0);
        result = withAnswer > spec.maxLength ? QueryResult.TRUNCATED : QueryResult.ANSWER;
      } else {
        result = QueryResult.NODATA;
      }
    }
    this.counters.count(transport, query.qtype, result);
    return query.questionEnd;
  }
}
