import { isIPv4 } from 'node:net';
import { HEADER_LENGTH, type ParsedQuery } from './dns-codec.js';
import { TypedError } from '#service-kit';

/** A record name or address the table refuses; the gRPC edge maps it to INVALID_ARGUMENT. */
export class RecordInvalid extends TypedError {
  readonly code = 'DNS_RECORD_INVALID';
  constructor(
    readonly recordName: string,
    readonly ip: string,
    reason: string,
  ) {
    super(`invalid DNS record ${JSON.stringify(recordName)} -> ${JSON.stringify(ip)}: ${reason}`);
  }
}

export interface DnsRecordEntry {
  /** The sandbox id, lower case: one DNS label. */
  name: string;
  ip: string;
  /** The address as the 4 bytes an A record carries. */
  bytes: Uint8Array;
  /** The name's bytes, compared against the query without building a string. */
  key: Uint8Array;
}

/** FNV-1a over ASCII-lower-cased bytes, cut to 30 bits so V8 keeps it a small integer. */
function nameHash(bytes: Uint8Array, start: number, end: number): number {
  let h = 0x811c9dc5;
  for (let i = start; i < end; i++) {
    let c = bytes[i]!;
    if (c >= 0x41 && c <= 0x5a) c |= 0x20;
    h = Math.imul(h ^ c, 0x01000193);
  }
  return h & 0x3fffffff;
}

// One DNS label (at most 63 bytes), in the orchestrator's sandbox id alphabet: letters, digits,
// _ and -, not starting with -. Ids may hold dashes: `{id}-{anything}` is matched longest id
// first, so an id with a dash wins over a shorter id that is its prefix.
const LABEL = /^[a-z0-9_][a-z0-9_-]{0,62}$/;

/**
 * Sandbox name → host IP, keyed by the lower-cased sandbox id alone (no trailing dot, no zone):
 * a query name is reduced to its first label before lookup, so `{id}`, `{id}-{anything}` and
 * either one under the configured zone all hit the same entry, in any letter case.
 */
export class RecordTable {
  private readonly records = new Map<string, DnsRecordEntry>();
  /** The hot-path index: name hash → entries (a list only on a hash collision). */
  private readonly byHash = new Map<number, DnsRecordEntry[]>();
  /** Scratch for `resolve`: label lengths at which a dash ends an id prefix. */
  private readonly dashes = new Int32Array(64);
  /** The zone as wire-format labels after the first one, lower case, with the final zero byte. */
  private readonly zoneWire: Uint8Array | null;
  private readonly zoneLabelCount: number;

  constructor(readonly zone: string | null = null) {
    const labels = (zone ?? '')
      .toLowerCase()
      .split('.')
      .filter((l) => l.length > 0);
    if (labels.length === 0) {
      this.zoneWire = null;
      this.zoneLabelCount = 0;
      return;
    }
    for (const label of labels) {
      if (label.length > 63 || !/^[a-z0-9_-]+$/.test(label)) throw new RangeError(`invalid zone ${zone}`);
    }
    const wire = Buffer.alloc(labels.reduce((n, l) => n + l.length + 1, 1));
    let pos = 0;
    for (const label of labels) {
      wire[pos++] = label.length;
      pos += wire.write(label, pos, 'latin1');
    }
    this.zoneWire = wire;
    this.zoneLabelCount = labels.length;
  }

  get size(): number {
    return this.records.size;
  }

  /** Adds or replaces the record for `name`. */
  set(name: string, ip: string): DnsRecordEntry {
    const key = name.toLowerCase();
    if (!LABEL.test(key)) {
      throw new RecordInvalid(
        name,
        ip,
        'the name must be one DNS label of letters, digits, _ and - (1 to 63 chars, not starting with -)',
      );
    }
    if (!isIPv4(ip)) throw new RecordInvalid(name, ip, 'the address must be an IPv4 address');
    const entry: DnsRecordEntry = {
      name: key,
      ip,
      bytes: Uint8Array.from(ip.split('.').map(Number)),
      key: Buffer.from(key, 'latin1'),
    };
    this.unindex(key);
    this.records.set(key, entry);
    const hash = nameHash(entry.key, 0, entry.key.length);
    const bucket = this.byHash.get(hash);
    if (bucket) bucket.push(entry);
    else this.byHash.set(hash, [entry]);
    return entry;
  }

  /** Removes the record only if it still points at `ip` (a newer sandbox may own the name now). */
  remove(name: string, ip: string): boolean {
    const key = name.toLowerCase();
    const entry = this.records.get(key);
    if (!entry || entry.ip !== ip) return false;
    this.unindex(key);
    this.records.delete(key);
    return true;
  }

  private unindex(key: string): void {
    const entry = this.records.get(key);
    if (!entry) return;
    const hash = nameHash(entry.key, 0, entry.key.length);
    const bucket = this.byHash.get(hash)?.filter((e) => e !== entry);
    if (bucket?.length) this.byHash.set(hash, bucket);
    else this.byHash.delete(hash);
  }

  get(name: string): DnsRecordEntry | undefined {
    return this.records.get(name.toLowerCase());
  }

  list(): DnsRecordEntry[] {
    return [...this.records.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  /**
   * The record a parsed query's name resolves to, or undefined. The name must be one label, or
   * one label followed by the zone; the label is the id itself or `{id}-{anything}`.
   */
  resolve(msg: Uint8Array, query: ParsedQuery): DnsRecordEntry | undefined {
    if (query.labelCount !== 1 && !this.inZone(msg, query)) return undefined;
    const start = query.firstLabelStart;
    const end = query.firstLabelEnd;
    if (end <= start) return undefined;
    // One pass: the whole label's hash, and the prefix lengths ending before each dash.
    const dashes = this.dashes;
    let dashCount = 0;
    let h = 0x811c9dc5;
    for (let i = start; i < end; i++) {
      let c = msg[i]!;
      if (c === 0x2d && i > start) dashes[dashCount++] = i - start;
      if (c >= 0x41 && c <= 0x5a) c |= 0x20;
      h = Math.imul(h ^ c, 0x01000193);
    }
    const exact = this.find(h & 0x3fffffff, msg, start, end - start);
    if (exact !== undefined || dashCount === 0) return exact;
    // `{id}-{anything}`: the longest id that is a record wins.
    for (let d = dashCount - 1; d >= 0; d--) {
      const length = dashes[d]!;
      const entry = this.find(nameHash(msg, start, start + length), msg, start, length);
      if (entry !== undefined) return entry;
    }
    return undefined;
  }

  private find(hash: number, msg: Uint8Array, start: number, length: number): DnsRecordEntry | undefined {
    const bucket = this.byHash.get(hash);
    if (bucket === undefined) return undefined;
    for (let b = 0; b < bucket.length; b++) {
      const entry = bucket[b]!;
      const key = entry.key;
      if (key.length !== length) continue;
      let same = true;
      for (let i = 0; i < length; i++) {
        let c = msg[start + i]!;
        if (c >= 0x41 && c <= 0x5a) c |= 0x20;
        if (c !== key[i]) {
          same = false;
          break;
        }
      }
      if (same) return entry;
    }
    return undefined;
  }

  private inZone(msg: Uint8Array, query: ParsedQuery): boolean {
    const zone = this.zoneWire;
    if (zone === null || query.labelCount !== 1 + this.zoneLabelCount) return false;
    const from = query.firstLabelEnd;
    if (query.nameEnd - from !== zone.length || from < HEADER_LENGTH) return false;
    for (let i = 0; i < zone.length; i++) {
      let c = msg[from + i]!;
      if (c >= 0x41 && c <= 0x5a) c |= 0x20;
      if (c !== zone[i]) return false;
    }
    return true;
  }
}
