import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { parseConnectionHead } from './connection-head.js';
import { MAX_HTTP_HEAD, parseHttpHost } from './http-host.js';

const req = (lines: string[]) => Buffer.from(lines.join('\r\n') + '\r\n\r\n', 'latin1');

describe('HTTP/1 Host', () => {
  it('reads the Host of a request, without port or case, and asks for more until the head ends', () => {
    const head = req(['GET /x?y HTTP/1.1', 'User-Agent: curl', 'Host: API.Example.com:8080', 'Accept: */*']);
    expect(parseHttpHost(head)).toEqual({ kind: 'name', name: 'api.example.com' });
    for (let n = 0; n < head.length; n++) expect(parseConnectionHead(head.subarray(0, n)).kind).toBe('more');
    // Body bytes after the head are not its business.
    expect(parseHttpHost(Buffer.concat([req(['POST / HTTP/1.1', 'Host: a.com']), Buffer.from('body')]))).toEqual({
      kind: 'name',
      name: 'a.com',
    });
  });

  it('has no name for an address Host, IPv6 literal, or an HTTP/1.0 request without Host', () => {
    expect(parseHttpHost(req(['GET / HTTP/1.1', 'Host: 1.2.3.4:80']))).toEqual({ kind: 'none' });
    expect(parseHttpHost(req(['GET / HTTP/1.1', 'Host: [::1]:80']))).toEqual({ kind: 'none' });
    expect(parseHttpHost(req(['GET / HTTP/1.0']))).toEqual({ kind: 'none' });
    // Not HTTP at all (SSH banner, binary): no name, judged by address.
    expect(parseConnectionHead(Buffer.from('SSH-2.0-OpenSSH_9.6\r\n'))).toEqual({ kind: 'none' });
    expect(parseConnectionHead(Buffer.from([0, 1, 2]))).toEqual({ kind: 'none' });
  });

  it.each([
    ['two Host headers', ['GET / HTTP/1.1', 'Host: a.com', 'Host: b.com']],
    ['an absolute target naming another host', ['GET http://b.com/ HTTP/1.1', 'Host: a.com']],
    ['a bad request line', ['GET / HTTP/2.0', 'Host: a.com']],
    ['a header without a colon', ['GET / HTTP/1.1', 'Host a.com']],
    ['an obs-fold continuation', ['GET / HTTP/1.1', 'Host: a.com', ' folded']],
    ['a Host that is not host[:port]', ['GET / HTTP/1.1', 'Host: a.com:99999']],
    ['a Host with a user part', ['GET / HTTP/1.1', 'Host: u@a.com']],
    ['a bare LF', ['GET / HTTP/1.1\nHost: b.com', 'Host: a.com']],
    ['a NUL', ['GET / HTTP/1.1', 'Host: a.com\0']],
  ])('refuses %s', (_what, lines) => {
    expect(parseHttpHost(req(lines)).kind).toBe('invalid');
  });

  it('accepts an absolute target naming the same host', () => {
    expect(parseHttpHost(req(['GET http://A.com:80/x HTTP/1.1', 'Host: a.com']))).toEqual({
      kind: 'name',
      name: 'a.com',
    });
  });

  it('is bounded: a head that does not end within the bound is refused', () => {
    const long = Buffer.from('GET / HTTP/1.1\r\nX: ' + 'a'.repeat(MAX_HTTP_HEAD));
    expect(parseHttpHost(long)).toEqual({ kind: 'invalid', reason: 'request head too long' });
  });

  it('never throws on random or mangled heads', () => {
    const valid = req(['GET / HTTP/1.1', 'Host: a.com', 'Accept: */*']);
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 300 }), (bytes) => {
        const r = parseConnectionHead(Buffer.concat([Buffer.from('GET '), Buffer.from(bytes)]));
        expect(['more', 'name', 'none', 'invalid']).toContain(r.kind);
      }),
      { numRuns: 3000 },
    );
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(valid.length - 1), fc.integer({ min: 0, max: 255 })), { minLength: 1, maxLength: 4 }),
        (changes) => {
          const b = Buffer.from(valid);
          for (const [at, v] of changes) b[at] = v;
          const r = parseConnectionHead(b);
          if (r.kind === 'name') expect(r.name).toMatch(/^[a-z0-9_.-]+$/);
        },
      ),
      { numRuns: 3000 },
    );
  });
});
