/**
 * The Host of an HTTP/1 request, read from the first bytes a client sends. Strict and bounded:
 * the head must end (blank line) within MAX_HTTP_HEAD bytes, the request line must be
 * `METHOD target HTTP/1.x`, there must be exactly one Host header, and an absolute-form target
 * must name the same host. Anything else is `invalid` (the connection is then refused).
 */
import type { HeadResult } from './tls-client-hello.js';
import { normalizeHostName } from './host-name.js';

export const MAX_HTTP_HEAD = 16 * 1024;
const METHOD = /^[A-Z]{3,16} /;
const REQUEST_LINE = /^([A-Z]{3,16}) (\S+) HTTP\/1\.[01]$/;
const HEADER = /^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*(.*?)[ \t]*$/;
/** host, or host:port; IPv6 literals in brackets. */
const AUTHORITY = /^(\[[0-9A-Fa-f:.]+\]|[^:@/?#[\]\s]+)(?::(\d{1,5}))?$/;

/** An HTTP/1 request starts with an upper-case method and a space (checked on the first bytes). */
export function looksLikeHttp(head: Uint8Array): boolean {
  const start = Buffer.from(head.subarray(0, 17)).toString('latin1');
  if (METHOD.test(start)) return true;
  // Still possibly a method whose space has not arrived yet.
  return start.length < 17 && /^[A-Z]+$/.test(start);
}

function hostOf(authority: string): { name?: string; literal: boolean } | undefined {
  const m = AUTHORITY.exec(authority);
  if (!m) return undefined;
  if (m[2] !== undefined && (Number(m[2]) < 1 || Number(m[2]) > 65535)) return undefined;
  const host = m[1]!;
  if (host.startsWith('[') || /^\d{1,3}(?:\.\d{1,3}){3}$/.test(host)) return { literal: true };
  const name = normalizeHostName(host);
  return name ? { name, literal: false } : undefined;
}

export function parseHttpHost(head: Uint8Array): HeadResult {
  const end = Buffer.from(head).indexOf('\r\n\r\n');
  if (end < 0) {
    return head.length >= MAX_HTTP_HEAD ? { kind: 'invalid', reason: 'request head too long' } : { kind: 'more' };
  }
  if (end + 4 > MAX_HTTP_HEAD) return { kind: 'invalid', reason: 'request head too long' };
  const text = Buffer.from(head.subarray(0, end)).toString('latin1');
  // Bare CR or LF, NUL, or other control bytes in a head are what request smuggling is made of.
  if (hasControlBytes(text.replace(/\r\n/g, ''))) {
    return { kind: 'invalid', reason: 'control characters in the request head' };
  }
  const [requestLine, ...headers] = text.split('\r\n');
  const line = REQUEST_LINE.exec(requestLine!);
  if (!line) return { kind: 'invalid', reason: 'not an HTTP/1 request line' };
  let host: string | undefined;
  for (const h of headers) {
    const m = HEADER.exec(h);
    if (!m) return { kind: 'invalid', reason: 'malformed header line' };
    if (m[1]!.toLowerCase() !== 'host') continue;
    if (host !== undefined) return { kind: 'invalid', reason: 'two Host headers' };
    host = m[2]!;
  }
  if (host === undefined) return { kind: 'none' }; // HTTP/1.0 without Host: judged by address
  const parsed = hostOf(host);
  if (!parsed) return { kind: 'invalid', reason: `Host ${JSON.stringify(host.slice(0, 80))} is not host[:port]` };
  const target = line[2]!;
  if (/^[A-Za-z][A-Za-z0-9+.-]*:\/\//.test(target)) {
    // Absolute form: a server would use this authority over Host, so both must agree.
    const authority = target.replace(/^[^:]+:\/\//, '').split(/[/?#]/)[0]!;
    const fromTarget = hostOf(authority);
    if (!fromTarget || fromTarget.name !== parsed.name || fromTarget.literal !== parsed.literal) {
      return { kind: 'invalid', reason: 'request target and Host name different hosts' };
    }
  }
  return parsed.literal || !parsed.name ? { kind: 'none' } : { kind: 'name', name: parsed.name };
}

/** Any byte below 0x20 but tab, or DEL. */
function hasControlBytes(text: string): boolean {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if ((c < 0x20 && c !== 0x09) || c === 0x7f) return true;
  }
  return false;
}
