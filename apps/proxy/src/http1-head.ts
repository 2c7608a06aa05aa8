/**
 * HTTP/1.1 message heads (RFC 9112), parsed strictly from raw bytes: the request line or status
 * line and the header fields, plus what a proxy that passes bodies through byte for byte must
 * know about framing. Anything ambiguous (a bare LF, obs-fold, Content-Length with
 * Transfer-Encoding, two different lengths, a coding other than chunked) is refused rather than
 * guessed: two parties reading one message two ways is how requests get smuggled.
 */

/** A head the proxy will not pass on; `status` is what the client is answered (400, 431, 501). */
export class HeadInvalid extends Error {
  constructor(
    message: string,
    readonly status: number = 400,
  ) {
    super(message);
    this.name = 'HeadInvalid';
  }
}

/** Node's own default limit for a whole head; nginx's large_client_header_buffers is 4 × 8 KiB. */
export const MAX_HEAD_BYTES = 16 * 1024;

const CRLF2 = Buffer.from('\r\n\r\n');

// RFC 9110 §5.6.2 token characters; a method and a header name are tokens.
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
// A request target: visible ASCII only (origin-form, absolute-form, authority-form or `*`).
const TARGET = /^[\x21-\x7e]+$/;

export interface MessageHead {
  /** Bytes from the start of the buffer through the blank line ending the head. */
  length: number;
  /** HTTP/1.x minor version: 1 or 0. */
  minor: number;
  /** The header lines as sent (`Name: value`, case and order kept). */
  lines: string[];
  /**
   * For each line, its lower-cased name when it is one the proxy may act on (picked by length,
   * so most lines are never sliced or lower-cased), else ''.
   */
  keys: string[];
  /** Content-Length, or -1 when absent. */
  contentLength: number;
  /** Transfer-Encoding: chunked (the only coding accepted). */
  chunked: boolean;
  /** The Connection header's tokens, lower-cased (close, keep-alive, upgrade, named fields). */
  connection: string[];
}

export interface RequestHead extends MessageHead {
  method: string;
  target: string;
}

export interface ResponseHead extends MessageHead {
  status: number;
  /** Transfer-Encoding is present but chunked is not its last coding: the body ends at close. */
  untilClose: boolean;
}

/**
 * Where the head starting at `buf[0]` ends (the index after its blank line), or -1 when more
 * bytes are needed. Throws HeadInvalid (431) once a head cannot end within MAX_HEAD_BYTES.
 */
export function headEnd(buf: Buffer): number {
  const at = buf.indexOf(CRLF2);
  if (at >= 0 && at + 4 <= MAX_HEAD_BYTES) return at + 4;
  if (at >= 0 || buf.length >= MAX_HEAD_BYTES) {
    throw new HeadInvalid(`request head larger than ${MAX_HEAD_BYTES} bytes`, 431);
  }
  return -1;
}

/** Empty lines a client may send before a request line (RFC 9112 §2.2: after a body, say). */
export function leadingBlankLines(buf: Buffer): number {
  let i = 0;
  while (i + 1 < buf.length && buf[i] === 13 && buf[i + 1] === 10) i += 2;
  return i;
}

/** Parses the request head `buf[0, end)` (end from headEnd). Throws HeadInvalid. */
export function parseRequestHead(buf: Buffer, end: number): RequestHead {
  const { first, lines } = headText(buf, end);
  const sp1 = first.indexOf(' ');
  const sp2 = first.indexOf(' ', sp1 + 1);
  if (sp1 <= 0 || sp2 < 0 || first.indexOf(' ', sp2 + 1) >= 0) {
    throw new HeadInvalid(`malformed request line ${JSON.stringify(first.slice(0, 100))}`);
  }
  const method = first.slice(0, sp1);
  const target = first.slice(sp1 + 1, sp2);
  const version = first.slice(sp2 + 1);
  if (!TOKEN.test(method)) throw new HeadInvalid('malformed method');
  if (!TARGET.test(target)) throw new HeadInvalid('malformed request target');
  const minor = version === 'HTTP/1.1' ? 1 : version === 'HTTP/1.0' ? 0 : -1;
  if (minor < 0) {
    throw new HeadInvalid(
      `unsupported version ${JSON.stringify(version.slice(0, 20))}`,
      version.startsWith('HTTP/') ? 505 : 400,
    );
  }
  const head = fields(lines, end, minor) as RequestHead;
  head.method = method;
  head.target = target;
  let hosts = 0;
  for (const k of head.keys) if (k === 'host') hosts++;
  if (hosts > 1) throw new HeadInvalid('more than one Host header');
  if (head.chunked && minor === 0) throw new HeadInvalid('Transfer-Encoding in an HTTP/1.0 request');
  return head;
}

/** Parses a response head `buf[0, end)` from an upstream. Throws HeadInvalid. */
export function parseResponseHead(buf: Buffer, end: number): ResponseHead {
  const { first, lines } = headText(buf, end);
  // `HTTP/1.1 200 OK`; the reason may be empty, and some servers leave out the space before it.
  const m = /^HTTP\/1\.([01]) (\d{3})(?: .*)?$/.exec(first);
  if (!m) throw new HeadInvalid(`malformed status line ${JSON.stringify(first.slice(0, 100))}`);
  const head = fields(lines, end, Number(m[1]), true) as ResponseHead;
  head.status = Number(m[2]);
  head.untilClose ??= false;
  return head;
}

// Every header line at once: a token, a colon, a value without controls (CR and LF included, so
// no bare CR or LF and no line folding either), CRLF. Linear: names hold no colon, values no CR.
// eslint-disable-next-line no-control-regex -- controls are exactly what this refuses
const HEADER_BLOCK = /^(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*$/;
// eslint-disable-next-line no-control-regex -- as above, for one value
const BAD_VALUE = /[\x00-\x08\x0a-\x1f\x7f]/;

/**
 * Lengths of the header names the proxy acts on: host (4), te (2), trailer/upgrade (7),
 * connection/keep-alive (10), content-length/e2b-sandbox-id (14), x-forwarded-for (15),
 * proxy-connection/e2b-sandbox-port (16), transfer-encoding (17), e2b-traffic-access-token (24).
 */
const KEY_LENGTHS = new Set([2, 4, 7, 10, 14, 15, 16, 17, 24]);

/** The first line (request or status line) and the header lines of the head `buf[0, end)`. */
function headText(buf: Buffer, end: number): { first: string; lines: string[] } {
  const text = buf.toString('latin1', 0, end - 2);
  const eol = text.indexOf('\r\n');
  const first = text.slice(0, eol);
  const block = text.slice(eol + 2);
  if (first.indexOf('\n') >= 0 || first.indexOf('\r') >= 0) throw new HeadInvalid('bare CR or LF in head');
  if (!HEADER_BLOCK.test(block)) explainInvalid(block);
  const lines = block.split('\r\n');
  lines.pop();
  return { first, lines };
}

/** Says what is wrong with a header block HEADER_BLOCK refused (the slow path of a bad request). */
function explainInvalid(block: string): never {
  for (const line of block.split('\r\n')) {
    if (line.indexOf('\n') >= 0 || line.indexOf('\r') >= 0) throw new HeadInvalid('bare CR or LF in head');
    const colon = line.indexOf(':');
    if (line.charCodeAt(0) === 32 || line.charCodeAt(0) === 9) throw new HeadInvalid('obsolete line folding');
    if (colon <= 0) throw new HeadInvalid('header line without a name');
    const name = line.slice(0, colon);
    if (!TOKEN.test(name)) throw new HeadInvalid(`malformed header name ${JSON.stringify(name.slice(0, 60))}`);
    if (BAD_VALUE.test(line.slice(colon + 1))) throw new HeadInvalid(`control character in header ${name}`);
  }
  throw new HeadInvalid('malformed header block');
}

function fields(lines: string[], end: number, minor: number, response = false): MessageHead {
  const n = lines.length;
  const keys = new Array<string>(n);
  let contentLength = -1;
  let te: string | undefined;
  const connection: string[] = [];
  for (let i = 0; i < n; i++) {
    const line = lines[i]!;
    const colon = line.indexOf(':');
    if (!KEY_LENGTHS.has(colon)) {
      keys[i] = '';
      continue;
    }
    const l = line.slice(0, colon).toLowerCase();
    keys[i] = l;
    if (l === 'content-length') {
      const v = decimal(line, colon + 1);
      if (v < 0) throw new HeadInvalid('malformed Content-Length');
      if (contentLength >= 0 && contentLength !== v) throw new HeadInvalid('conflicting Content-Length headers');
      contentLength = v;
    } else if (l === 'transfer-encoding') {
      const value = trimOws(line, colon + 1);
      te = te === undefined ? value : `${te}, ${value}`;
    } else if (l === 'connection') {
      for (const t of line.slice(colon + 1).split(',')) {
        const token = t.trim().toLowerCase();
        if (token) connection.push(token);
      }
    }
  }
  const head: MessageHead = { length: end, minor, lines, keys, contentLength, chunked: false, connection };
  if (te !== undefined) {
    if (contentLength >= 0) throw new HeadInvalid('both Content-Length and Transfer-Encoding');
    const codings = te
      .toLowerCase()
      .split(',')
      .map((s) => s.trim());
    const last = codings[codings.length - 1];
    if (!response) {
      // A request body's length must be knowable: chunked, alone (RFC 9112 §6.1; 501 otherwise).
      if (codings.length !== 1 || last !== 'chunked') {
        throw new HeadInvalid(`unsupported Transfer-Encoding ${JSON.stringify(te.slice(0, 60))}`, 501);
      }
      head.chunked = true;
    } else if (last === 'chunked') {
      if (codings.slice(0, -1).includes('chunked')) throw new HeadInvalid('chunked applied twice');
      head.chunked = true;
    } else {
      (head as ResponseHead).untilClose = true;
    }
  }
  return head;
}

/** The decimal value of a header line from `from` (OWS around it allowed), or -1 if it is not 1–15 digits. */
function decimal(line: string, from: number): number {
  let i = from;
  const n = line.length;
  while (i < n && (line.charCodeAt(i) === 32 || line.charCodeAt(i) === 9)) i++;
  let v = 0;
  let digits = 0;
  for (; i < n; i++) {
    const c = line.charCodeAt(i);
    if (c < 48 || c > 57) break;
    v = v * 10 + (c - 48);
    digits++;
  }
  while (i < n && (line.charCodeAt(i) === 32 || line.charCodeAt(i) === 9)) i++;
  return digits === 0 || digits > 15 || i !== n ? -1 : v;
}

/** The value of a header line from `from` (after the colon), without optional whitespace around it. */
export function trimOws(line: string, from: number): string {
  let a = from;
  let b = line.length;
  while (a < b && (line.charCodeAt(a) === 32 || line.charCodeAt(a) === 9)) a++;
  while (b > a && (line.charCodeAt(b - 1) === 32 || line.charCodeAt(b - 1) === 9)) b--;
  return line.slice(a, b);
}

/** The first value of a header the proxy acts on (lower-cased name, see KEY_LENGTHS), or undefined. */
export function headerValue(head: MessageHead, name: string): string | undefined {
  const i = head.keys.indexOf(name);
  if (i < 0) return undefined;
  const line = head.lines[i]!;
  return trimOws(line, line.indexOf(':') + 1);
}

/** Whether the connection stays open after this message (RFC 9112 §9.3). */
export function persistent(head: MessageHead): boolean {
  if (head.connection.includes('close')) return false;
  return head.minor === 1 || head.connection.includes('keep-alive');
}
