import { Counter, type Registry } from 'prom-client';
import { RrType } from './dns-codec.js';

export const Transport = { UDP: 0, TCP: 1 } as const;
export type TransportIndex = (typeof Transport)[keyof typeof Transport];
const TRANSPORT_LABELS = ['udp', 'tcp'] as const;

/** What happened to one query; the `result` label of sbx_dns_queries_total. */
export const QueryResult = {
  ANSWER: 0,
  NODATA: 1,
  NXDOMAIN: 2,
  FORMERR: 3,
  NOTIMP: 4,
  REFUSED: 5,
  BADVERS: 6,
  TRUNCATED: 7,
  DROPPED: 8,
  SERVFAIL: 9,
} as const;
export type QueryResultIndex = (typeof QueryResult)[keyof typeof QueryResult];
const RESULT_LABELS = [
  'answer',
  'nodata',
  'nxdomain',
  'formerr',
  'notimp',
  'refused',
  'badvers',
  'truncated',
  'dropped',
  'servfail',
] as const;

// A bounded set of qtype labels: any other type is counted as `other`, an unparsed one as `none`.
const NAMED_TYPES = ['A', 'NS', 'CNAME', 'SOA', 'PTR', 'MX', 'TXT', 'AAAA', 'SRV', 'SVCB', 'HTTPS', 'ANY'] as const;
const TYPE_LABELS = [...NAMED_TYPES, 'other', 'none'] as const;
export const QTYPE_NONE = TYPE_LABELS.length - 1;
const QTYPE_OTHER = TYPE_LABELS.length - 2;
const typeSlot = new Uint8Array(65536).fill(QTYPE_OTHER);
NAMED_TYPES.forEach((name, slot) => {
  typeSlot[RrType[name]] = slot;
});

const RESULTS = RESULT_LABELS.length;
const TYPES = TYPE_LABELS.length;

/**
 * Query counts by transport, qtype and result. The hot path only increments a slot of a typed
 * array; the Prometheus counter reads the array when scraped, so a query costs no label lookup.
 */
export class QueryCounters {
  readonly counts = new Float64Array(TRANSPORT_LABELS.length * TYPES * RESULTS);

  /** `qtype` is the wire type, or -1 when the packet had no usable question. */
  count(transport: TransportIndex, qtype: number, result: QueryResultIndex): void {
    const slot = qtype < 0 ? QTYPE_NONE : typeSlot[qtype & 0xffff]!;
    this.counts[(transport * TYPES + slot) * RESULTS + result]! += 1;
  }

  /** Adds another set of counts (from a worker) into this one. */
  add(counts: ArrayLike<number>): void {
    for (let i = 0; i < this.counts.length && i < counts.length; i++) this.counts[i]! += counts[i]!;
  }

  get(transport: 'udp' | 'tcp', qtype: string, result: string): number {
    const t = TRANSPORT_LABELS.indexOf(transport);
    const q = (TYPE_LABELS as readonly string[]).indexOf(qtype);
    const r = (RESULT_LABELS as readonly string[]).indexOf(result);
    if (t < 0 || q < 0 || r < 0) return 0;
    return this.counts[(t * TYPES + q) * RESULTS + r]!;
  }

  /** Registers `sbx_dns_queries_total{transport,qtype,result}` reading these counts at scrape time. */
  register(registry: Registry, refresh?: () => Promise<void>): void {
    const counts = this.counts;
    new Counter({
      name: 'sbx_dns_queries_total',
      help: 'DNS queries received, by transport, query type and result',
      labelNames: ['transport', 'qtype', 'result'] as const,
      registers: [registry],
      async collect() {
        if (refresh) await refresh();
        this.reset();
        for (let t = 0; t < TRANSPORT_LABELS.length; t++) {
          for (let q = 0; q < TYPES; q++) {
            for (let r = 0; r < RESULTS; r++) {
              const value = counts[(t * TYPES + q) * RESULTS + r]!;
              if (value > 0) {
                this.inc({ transport: TRANSPORT_LABELS[t]!, qtype: TYPE_LABELS[q]!, result: RESULT_LABELS[r]! }, value);
              }
            }
          }
        }
      },
    });
  }
}
