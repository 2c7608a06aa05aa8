import { describe, expect, it } from 'vitest';
import { httpRelayAvailable, relayForwardHead, relayParseHead, relayParseResponse } from '#native';
import { TOKEN_HEADER } from './access-token.js';
import { forwardRequestHead } from './forward-headers.js';
import {
  headEnd,
  headerValue,
  HeadInvalid,
  leadingBlankLines,
  parseRequestHead,
  parseResponseHead,
  persistent,
} from './http1-head.js';
import { routeTarget, SANDBOX_ID_HEADER, SANDBOX_PORT_HEADER } from './route-target.js';

/** A deterministic generator, so that a failing case can be replayed from its seed. */
function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const pick = <T>(next: () => number, xs: readonly T[]): T => xs[Math.floor(next() * xs.length)]!;

// Header lines the relay reads or drops, in spellings that differ in case and whitespace.
const LINES = [
  'Host: 8080-sbx.example.com',
  'host:8080-Sbx_1.e2b.dev:5007',
  'HOST: \t 443-a.b.c \t',
  'Host: 1-x',
  'Host: 65535-abc-def.x:',
  'Host: 65536-abc.x',
  'Host: 0-abc.x',
  'Host: 080-abc.x:12:34',
  'Host: [::1]:80',
  'Content-Length: 5',
  'content-length:  0 ',
  'Content-Length: 05',
  'Content-Length: 1234567890123456',
  'Content-Length: +5',
  'Content-Length: 5, 5',
  'Transfer-Encoding: chunked',
  'transfer-encoding: Chunked ',
  'Transfer-Encoding: gzip, chunked',
  'Connection: keep-alive',
  'Connection: close',
  'connection: Keep-Alive, close',
  'Connection: ,close,',
  'Connection: upgrade',
  'Connection: x-named',
  'Connection: X-Custom',
  'Connection: keep-alive, Cookie',
  'Upgrade: websocket',
  'Keep-Alive: timeout=5',
  'Proxy-Connection: keep-alive',
  'TE: trailers',
  'Trailer: X-Sum',
  'X-Forwarded-For: 10.0.0.1',
  'x-forwarded-for:',
  'X-Forwarded-For:  1.1.1.1 , 2.2.2.2 ',
  `${TOKEN_HEADER}: t0k`,
  `E2B-Traffic-Access-Token:\tt0k `,
  `${SANDBOX_ID_HEADER}: sbx`,
  `${SANDBOX_PORT_HEADER}: 80`,
  'Expect: 100-continue',
  'X-Custom:  spaced value  ',
  'Accept: */*',
  'User-Agent: fuzz/1.0 (\xe9t\xe9)',
  'X-Empty:',
  'Cookie: a=b; c=d',
  'X-Forwarded-Host: spoofed',
];
const REQUEST_LINES = [
  'GET / HTTP/1.1',
  'POST /upload?id=1 HTTP/1.1',
  'HEAD /x HTTP/1.1',
  'OPTIONS * HTTP/1.1',
  'CONNECT a:443 HTTP/1.1',
  'GET http://a/ HTTP/1.1',
  'GET / HTTP/1.0',
  'PRI * HTTP/2.0',
  'DELETE /a%20b HTTP/1.1',
];
const ALPHABET = [
  '\r',
  '\n',
  ' ',
  '\t',
  ':',
  ',',
  '\0',
  '\x7f',
  '\xff',
  'a',
  '0',
  '-',
  '.',
  'chunked',
  'close',
  '\r\n',
];

function generate(next: () => number): string {
  let text = next() < 0.1 ? '\r\n' : '';
  text += pick(next, REQUEST_LINES) + '\r\n';
  if (next() < 0.85) text += pick(next, LINES.slice(0, 5)) + '\r\n';
  const n = Math.floor(next() * 6);
  for (let i = 0; i < n; i++) text += pick(next, LINES) + '\r\n';
  text += '\r\n';
  const edits = next() < 0.35 ? 0 : 1 + Math.floor(next() * 3);
  for (let e = 0; e < edits; e++) {
    const at = Math.floor(next() * text.length);
    const kind = next();
    if (kind < 0.4) text = text.slice(0, at) + pick(next, ALPHABET) + text.slice(at);
    else if (kind < 0.7) text = text.slice(0, at) + text.slice(at + 1 + Math.floor(next() * 8));
    else text = text.slice(0, at) + String.fromCharCode(Math.floor(next() * 256)) + text.slice(at + 1);
  }
  return text;
}

const STATUS_LINES = [
  'HTTP/1.1 200 OK',
  'HTTP/1.1 204 No Content',
  'HTTP/1.1 304 Not Modified',
  'HTTP/1.1 100 Continue',
  'HTTP/1.1 101 Switching Protocols',
  'HTTP/1.0 200 OK',
  'HTTP/1.1 404',
  'HTTP/1.1 200 \xe9t\xe9',
  'HTTP/1.1 099 odd',
  'HTTP/2 200',
];
const RESPONSE_LINES = [
  'Content-Length: 5',
  'content-length: 0',
  'Content-Length: 5',
  'Content-Length: 6',
  'Transfer-Encoding: chunked',
  'Transfer-Encoding: gzip',
  'transfer-encoding: gzip, chunked',
  'Transfer-Encoding: chunked, gzip',
  'Transfer-Encoding: chunked, chunked',
  'Transfer-Encoding: ,chunked',
  'Connection: close',
  'Connection: keep-alive',
  'connection: Keep-Alive, x',
  'Content-Type: text/plain',
  'Set-Cookie: a=b',
  'X-Empty:',
];

/** The framing http1-connection.ts chooses for a final response to `method`. */
function tsFraming(method: string, status: number, head: ReturnType<typeof parseResponseHead>): string {
  if (method === 'HEAD' || status === 204 || status === 304) return 'none';
  if (head.chunked) return 'chunked';
  if (head.untilClose || head.contentLength < 0) return 'until-close';
  return head.contentLength > 0 ? 'length' : 'none';
}

/**
 * The native relay (native/c/lib/sbx_http_relay.c) must be stricter than this path: whatever its
 * parser accepts, http1-head.ts must accept the same way (same head end, framing, route target,
 * persistence), and the head it forwards must be byte for byte what forward-headers.ts builds.
 */
describe.skipIf(!httpRelayAvailable())('native relay head parser against http1-head.ts', () => {
  it('accepts only what the TS path accepts, reads it the same way and forwards the same head (40,000 heads)', () => {
    const next = rng(4242);
    let accepted = 0;
    let handedOff = 0;
    for (let run = 0; run < 40_000; run++) {
      const text = generate(next);
      const buf = Buffer.from(text, 'latin1');
      const c = relayParseHead(buf);
      if (c.kind !== 'accepted') {
        if (c.kind === 'handoff') handedOff++;
        continue;
      }
      accepted++;
      const where = JSON.stringify(text);
      const skip = leadingBlankLines(buf);
      const rest = buf.subarray(skip);
      const end = headEnd(rest);
      expect([where, end >= 0]).toEqual([where, true]);
      let head;
      try {
        head = parseRequestHead(rest, end);
      } catch (err) {
        throw new Error(`relay accepted what http1-head.ts refuses: ${where}: ${String(err)}`, { cause: err });
      }
      const target = routeTarget(
        headerValue(head, 'host'),
        headerValue(head, SANDBOX_ID_HEADER),
        headerValue(head, SANDBOX_PORT_HEADER),
      );
      expect([where, c.start, c.end]).toEqual([where, skip, skip + head.length]);
      expect([where, c.sandboxId, c.port]).toEqual([where, target.sandboxId, target.port]);
      const framing = head.chunked ? 'chunked' : head.contentLength > 0 ? 'length' : 'none';
      expect([where, c.body, c.body === 'length' ? c.contentLength : 0]).toEqual([
        where,
        framing,
        framing === 'length' ? head.contentLength : 0,
      ]);
      expect([where, c.keepAlive, head.minor, head.method]).toEqual([where, persistent(head), 1, head.method]);
      expect(head.method).not.toBe('CONNECT');
      expect(head.connection.includes('upgrade') && head.keys.includes('upgrade')).toBe(false);
      const mask = next() < 0.5 ? 'inside.local' : '';
      const client = next() < 0.8 ? '192.168.7.9' : undefined;
      const ours = relayForwardHead(rest, mask, client);
      const theirs = forwardRequestHead(head, {
        maskHost: mask || undefined,
        clientAddress: client,
        upgrade: false,
        close: !persistent(head),
      });
      expect([where, ours]).toEqual([where, theirs]);
    }
    // Both sides of the fuzz are exercised.
    expect(accepted).toBeGreaterThan(2_000);
    expect(handedOff).toBeGreaterThan(2_000);
  });
  it('reads response heads as http1-head.ts does wherever it accepts them (20,000 heads)', () => {
    const next = rng(777);
    let accepted = 0;
    let refused = 0;
    for (let run = 0; run < 20_000; run++) {
      let text = pick(next, STATUS_LINES) + '\r\n';
      const n = Math.floor(next() * 5);
      for (let i = 0; i < n; i++) text += pick(next, RESPONSE_LINES) + '\r\n';
      text += '\r\n';
      const edits = next() < 0.4 ? 0 : 1 + Math.floor(next() * 3);
      for (let e = 0; e < edits; e++) {
        const at = Math.floor(next() * text.length);
        const kind = next();
        if (kind < 0.4) text = text.slice(0, at) + pick(next, ALPHABET) + text.slice(at);
        else if (kind < 0.7) text = text.slice(0, at) + text.slice(at + 1 + Math.floor(next() * 8));
        else text = text.slice(0, at) + String.fromCharCode(Math.floor(next() * 256)) + text.slice(at + 1);
      }
      const method = next() < 0.2 ? 'HEAD' : 'GET';
      const buf = Buffer.from(text, 'latin1');
      const c = relayParseResponse(buf, method === 'HEAD');
      if (c.kind === 'refused') refused++;
      if (c.kind !== 'accepted') continue;
      accepted++;
      const where = JSON.stringify(text);
      let head;
      try {
        head = parseResponseHead(buf, headEnd(buf));
      } catch (err) {
        if (err instanceof HeadInvalid)
          throw new Error(`relay accepted what http1-head.ts refuses: ${where}`, { cause: err });
        throw err;
      }
      expect([where, c.length, c.status, c.persistent]).toEqual([where, headEnd(buf), head.status, persistent(head)]);
      if (c.status >= 100 && c.status < 200) continue; // interim: passed on, no framing
      expect([where, c.framing]).toEqual([where, tsFraming(method, head.status, head)]);
      if (c.framing === 'length') expect(c.contentLength).toBe(head.contentLength);
    }
    expect(accepted).toBeGreaterThan(2_000);
    expect(refused).toBeGreaterThan(2_000);
  });
});
