/**
 * The server name (SNI) of a TLS ClientHello, read from the first bytes a client sends.
 * Strict and bounded: every length is checked against what it sits in, the hello may span
 * several handshake records but no more than MAX_HEAD bytes in all, and anything malformed is
 * `invalid` (the connection is then refused), never an exception.
 */
import { normalizeHostName } from './host-name.js';

export type HeadResult =
  { kind: 'more' } | { kind: 'name'; name: string } | { kind: 'none' } | { kind: 'invalid'; reason: string };

/** A ClientHello is at most one 16 KiB record in practice; a few records of slack. */
export const MAX_TLS_HEAD = 4 * (16384 + 5);
const RECORD_HANDSHAKE = 22;
const HANDSHAKE_CLIENT_HELLO = 1;
const EXT_SERVER_NAME = 0;
const NAME_TYPE_HOST = 0;

export function looksLikeTls(head: Uint8Array): boolean {
  return head.length > 0 && head[0] === RECORD_HANDSHAKE;
}

class Invalid extends Error {}

/** A cursor over one buffer that refuses to read past its end. */
class Reader {
  constructor(
    private readonly b: Uint8Array,
    private pos = 0,
    private readonly end = b.length,
  ) {}
  get left(): number {
    return this.end - this.pos;
  }
  u8(): number {
    this.need(1);
    return this.b[this.pos++]!;
  }
  u16(): number {
    return (this.u8() << 8) | this.u8();
  }
  u24(): number {
    return (this.u8() << 16) | this.u16();
  }
  skip(n: number): void {
    this.need(n);
    this.pos += n;
  }
  /** A sub-reader over the next `n` bytes (and skips them here). */
  sub(n: number): Reader {
    this.need(n);
    const r = new Reader(this.b, this.pos, this.pos + n);
    this.pos += n;
    return r;
  }
  bytes(n: number): Uint8Array {
    this.need(n);
    const out = this.b.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
  private need(n: number): void {
    if (n > this.left) throw new Invalid('length runs past its container');
  }
}

/** Joins the fragments of consecutive handshake records; `more` until the hello is whole. */
function handshakeBytes(head: Uint8Array): Uint8Array | 'more' {
  const parts: Uint8Array[] = [];
  let have = 0;
  let pos = 0;
  let wanted: number | undefined;
  // The hello's own header usually sits in the first record: judge it before waiting for the rest.
  if (head.length >= 9 && head[0] === RECORD_HANDSHAKE && ((head[3]! << 8) | head[4]!) >= 4) {
    if (head[5] !== HANDSHAKE_CLIENT_HELLO) throw new Invalid('first handshake message is not a ClientHello');
    const declared = 4 + ((head[6]! << 16) | (head[7]! << 8) | head[8]!);
    if (declared > MAX_TLS_HEAD) throw new Invalid(`ClientHello of ${declared} bytes`);
  }
  while (wanted === undefined || have < wanted) {
    if (head.length - pos < 5) return 'more';
    if (head[pos] !== RECORD_HANDSHAKE) throw new Invalid('not a handshake record');
    if (head[pos + 1] !== 3) throw new Invalid('not a TLS record version');
    const len = (head[pos + 3]! << 8) | head[pos + 4]!;
    if (len === 0 || len > 16384 + 2048) throw new Invalid(`record length ${len}`);
    if (head.length - pos - 5 < len) return 'more';
    parts.push(head.subarray(pos + 5, pos + 5 + len));
    have += len;
    pos += 5 + len;
    if (wanted === undefined && have >= 4) {
      const first = Buffer.concat(parts);
      if (first[0] !== HANDSHAKE_CLIENT_HELLO) throw new Invalid('first handshake message is not a ClientHello');
      wanted = 4 + ((first[1]! << 16) | (first[2]! << 8) | first[3]!);
      if (wanted > MAX_TLS_HEAD) throw new Invalid(`ClientHello of ${wanted} bytes`);
    }
  }
  return Buffer.concat(parts).subarray(0, wanted);
}

export function parseClientHello(head: Uint8Array): HeadResult {
  try {
    const hs = handshakeBytes(head);
    if (hs === 'more') {
      return head.length >= MAX_TLS_HEAD ? { kind: 'invalid', reason: 'ClientHello too long' } : { kind: 'more' };
    }
    const r = new Reader(hs);
    r.skip(4); // type, length (checked above)
    r.skip(2 + 32); // legacy version, random
    const session = r.u8();
    if (session > 32) throw new Invalid(`session id of ${session} bytes`);
    r.skip(session);
    const suites = r.u16();
    if (suites < 2 || suites % 2) throw new Invalid(`cipher suites of ${suites} bytes`);
    r.skip(suites);
    const compressions = r.u8();
    if (compressions < 1) throw new Invalid('no compression method');
    r.skip(compressions);
    if (r.left === 0) return { kind: 'none' }; // no extensions at all
    const exts = r.sub(r.u16());
    if (r.left !== 0) throw new Invalid('bytes after the extensions');
    let name: string | undefined;
    const seen = new Set<number>();
    while (exts.left > 0) {
      const type = exts.u16();
      const body = exts.sub(exts.u16());
      if (seen.has(type)) throw new Invalid(`extension ${type} twice`);
      seen.add(type);
      if (type !== EXT_SERVER_NAME) continue;
      const list = body.sub(body.u16());
      if (body.left !== 0) throw new Invalid('bytes after the server name list');
      while (list.left > 0) {
        const nameType = list.u8();
        const bytes = list.bytes(list.u16());
        if (nameType !== NAME_TYPE_HOST) continue;
        // RFC 6066: at most one host_name; two could let a proxy and a server disagree.
        if (name !== undefined) throw new Invalid('two host names');
        const text = Buffer.from(bytes).toString('latin1');
        const normalized = normalizeHostName(text);
        if (!normalized) throw new Invalid(`server name ${JSON.stringify(text.slice(0, 80))} is not a host name`);
        name = normalized;
      }
      if (name === undefined) throw new Invalid('server name extension without a host name');
    }
    return name === undefined ? { kind: 'none' } : { kind: 'name', name };
  } catch (err) {
    if (err instanceof Invalid) return { kind: 'invalid', reason: err.message };
    throw err;
  }
}
