import { describe, expect, it } from 'vitest';
import { BodyFraming, Framing } from './body-framing.js';
import {
  headEnd,
  headerValue,
  HeadInvalid,
  MAX_HEAD_BYTES,
  parseRequestHead,
  parseResponseHead,
  persistent,
} from './http1-head.js';

const bytes = (text: string) => Buffer.from(text, 'latin1');
const request = (text: string) => {
  const buf = bytes(text);
  const end = headEnd(buf);
  if (end < 0) throw new Error('incomplete');
  return parseRequestHead(buf, end);
};
const refusal = (text: string): number | string => {
  try {
    request(text);
    return 'parsed';
  } catch (err) {
    return err instanceof HeadInvalid ? err.status : `threw ${String(err)}`;
  }
};

/** A deterministic generator, so that a failing fuzz case can be replayed. */
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

describe('parseRequestHead', () => {
  it('reads the request line and the headers as sent, in order, case kept', () => {
    const text =
      'POST /a/b?c=d HTTP/1.1\r\nHost: 8080-sbx.example.com\r\nX-Two: 1\r\nx-two:  2 \r\nContent-Length: 5\r\n\r\nhello';
    const head = request(text);
    expect(head.method).toBe('POST');
    expect(head.target).toBe('/a/b?c=d');
    expect(head.minor).toBe(1);
    expect(head.lines).toEqual(['Host: 8080-sbx.example.com', 'X-Two: 1', 'x-two:  2 ', 'Content-Length: 5']);
    expect(head.contentLength).toBe(5);
    // The head ends where the body starts.
    expect(head.length).toBe(text.length - 'hello'.length);
    expect(headerValue(head, 'host')).toBe('8080-sbx.example.com');
    expect(persistent(head)).toBe(true);
  });

  it('needs more bytes until the blank line, and refuses a head that cannot end within the bound (431)', () => {
    expect(headEnd(bytes('GET / HTTP/1.1\r\nHost: a\r\n'))).toBe(-1);
    expect(() => headEnd(Buffer.alloc(MAX_HEAD_BYTES, 'a'))).toThrow(HeadInvalid);
    expect(refusal(`GET / HTTP/1.1\r\nX: ${'a'.repeat(MAX_HEAD_BYTES)}\r\n\r\n`)).toBe(431);
  });

  it('refuses what two parsers could read two ways', () => {
    const cases: [string, number][] = [
      ['GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n', 501],
      ['GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n', 501],
      ['GET / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost : a\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n', 400],
      ['GET  / HTTP/1.1\r\nHost: a\r\n\r\n', 400],
      ['GET / extra HTTP/1.1\r\nHost: a\r\n\r\n', 400],
      ['G(T / HTTP/1.1\r\nHost: a\r\n\r\n', 400],
      ['GET /\x7f HTTP/1.1\r\nHost: a\r\n\r\n', 400],
      ['GET / HTTP/2.0\r\nHost: a\r\n\r\n', 505],
      ['GET / FTP/1.1\r\nHost: a\r\n\r\n', 400],
      ['GET / HTTP/1.1\r\n: empty\r\n\r\n', 400],
    ];
    for (const [text, status] of cases)
      expect([JSON.stringify(text), refusal(text)]).toEqual([JSON.stringify(text), status]);
  });

  it('knows when the client keeps the connection', () => {
    expect(persistent(request('GET / HTTP/1.1\r\nConnection: close\r\n\r\n'))).toBe(false);
    expect(persistent(request('GET / HTTP/1.0\r\n\r\n'))).toBe(false);
    expect(persistent(request('GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n'))).toBe(true);
  });

  it('fuzz: any mutation of a valid head parses or is refused with HeadInvalid, never anything else', () => {
    const valid =
      'POST /upload?id=1 HTTP/1.1\r\nHost: 8080-sbx.example.com:5007\r\ne2b-traffic-access-token: t0k\r\n' +
      'Transfer-Encoding: chunked\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nContent-Type: text/plain\r\n\r\n';
    const alphabet = [
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
      'chunked',
      'Content-Length: 1\r\n',
    ];
    const next = rng(16);
    let parsed = 0;
    for (let run = 0; run < 20_000; run++) {
      let text = valid;
      const edits = 1 + Math.floor(next() * 4);
      for (let e = 0; e < edits; e++) {
        const at = Math.floor(next() * text.length);
        const kind = next();
        if (kind < 0.4) text = text.slice(0, at) + alphabet[Math.floor(next() * alphabet.length)] + text.slice(at);
        else if (kind < 0.7) text = text.slice(0, at) + text.slice(at + 1 + Math.floor(next() * 8));
        else text = text.slice(0, at) + String.fromCharCode(Math.floor(next() * 256)) + text.slice(at + 1);
      }
      const buf = bytes(text);
      try {
        const end = headEnd(buf);
        if (end < 0) continue;
        const head = parseRequestHead(buf, end);
        parsed++;
        // What parses is unambiguous: one framing, names are tokens, no CR/LF left inside.
        expect(head.chunked && head.contentLength >= 0).toBe(false);
        for (const line of head.lines) expect(line).toMatch(/^[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\0]*$/);
        expect(head.target).not.toMatch(/[\s]/);
      } catch (err) {
        if (!(err instanceof HeadInvalid)) throw new Error(`${JSON.stringify(text)}: ${String(err)}`, { cause: err });
      }
    }
    // The fuzz must exercise both sides.
    expect(parsed).toBeGreaterThan(100);
  });
});

describe('parseResponseHead', () => {
  it('reads status, framing and persistence', () => {
    const buf = bytes('HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n');
    const head = parseResponseHead(buf, headEnd(buf));
    expect(head.status).toBe(200);
    expect(head.chunked).toBe(true);
    expect(persistent(head)).toBe(false);
    const bare = bytes('HTTP/1.1 204\r\n\r\n');
    expect(parseResponseHead(bare, headEnd(bare)).status).toBe(204);
    const gz = bytes('HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n');
    expect(parseResponseHead(gz, headEnd(gz)).untilClose).toBe(true);
    const bad = bytes('HTTP/1.1 2000 OK\r\n\r\n');
    expect(() => parseResponseHead(bad, headEnd(bad))).toThrow(HeadInvalid);
  });
});

/** `body` chunked in pieces of the given sizes, with extensions and trailers now and then. */
function chunked(body: Buffer, sizes: number[], trailers: boolean): Buffer {
  const parts: Buffer[] = [];
  let at = 0;
  for (const size of sizes) {
    const n = Math.min(size, body.length - at);
    if (n <= 0) break;
    parts.push(bytes(`${n.toString(16)}${n % 3 ? '' : ';ext=1'}\r\n`), body.subarray(at, at + n), bytes('\r\n'));
    at += n;
  }
  if (at < body.length) parts.push(bytes(`${(body.length - at).toString(16)}\r\n`), body.subarray(at), bytes('\r\n'));
  parts.push(bytes(trailers ? '0\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n' : '0\r\n\r\n'));
  return Buffer.concat(parts);
}

describe('BodyFraming', () => {
  it('counts a length down across pieces and leaves what follows', () => {
    const f = new BodyFraming();
    f.start(Framing.Length, 5);
    expect(f.advance(bytes('abc'), 0)).toBe(3);
    expect(f.done).toBe(false);
    expect(f.advance(bytes('deGET'), 0)).toBe(2);
    expect(f.done).toBe(true);
  });

  it('fuzz: finds the end of chunked bodies however they are split, and nothing past it', () => {
    const next = rng(7);
    for (let run = 0; run < 500; run++) {
      const body = Buffer.alloc(Math.floor(next() * 3000), run & 0xff);
      const sizes = Array.from({ length: 6 }, () => 1 + Math.floor(next() * 900));
      const wire = chunked(body, sizes, next() < 0.5);
      const after = bytes('GET /next HTTP/1.1\r\n\r\n');
      const stream = Buffer.concat([wire, after]);
      const f = new BodyFraming();
      f.start(Framing.Chunked);
      let at = 0;
      let end = -1;
      while (at < stream.length) {
        const piece = stream.subarray(at, Math.min(stream.length, at + 1 + Math.floor(next() * 700)));
        const e = f.advance(piece, 0);
        if (f.done) {
          end = at + e;
          break;
        }
        expect(e).toBe(piece.length);
        at += piece.length;
      }
      expect(end).toBe(wire.length);
    }
  });

  it('refuses broken chunked framing', () => {
    for (const wire of [
      'x\r\n',
      '5\r\nhello!\r\n',
      '5\nhello\r\n',
      '1\r\na\n',
      '0\r\nX: a\nb\r\n\r\n',
      '1234567890abc\r\n',
    ]) {
      const f = new BodyFraming();
      f.start(Framing.Chunked);
      expect(() => f.advance(bytes(wire), 0), JSON.stringify(wire)).toThrow(HeadInvalid);
    }
  });
});
