import { describe, expect, it } from 'vitest';
import { forwardRequestHead } from './forward-headers.js';
import { headEnd, parseRequestHead } from './http1-head.js';

const parse = (text: string) => {
  const buf = Buffer.from(text, 'latin1');
  return parseRequestHead(buf, headEnd(buf));
};

const request =
  'POST /up?x=1 HTTP/1.1\r\n' +
  'Host: 8080-sbx.example.com\r\n' +
  'Connection: keep-alive, X-Private\r\n' +
  'X-Private: hop\r\n' +
  'Keep-Alive: timeout=5\r\n' +
  'e2b-traffic-access-token: secret\r\n' +
  'E2B-Sandbox-Id: sbx\r\n' +
  'e2b-sandbox-port: 8080\r\n' +
  'Accept: text/html\r\n' +
  'Set-Cookie-Like: a\r\n' +
  'Set-Cookie-Like: b\r\n' +
  'X-Forwarded-For: 203.0.113.9\r\n' +
  'Transfer-Encoding: chunked\r\n' +
  'Upgrade: websocket\r\n\r\n';

describe('forwardRequestHead', () => {
  it('drops hop-by-hop and proxy headers, keeps the rest and the body framing in order, adds X-Forwarded-*', () => {
    const out = forwardRequestHead(parse(request), {
      maskHost: undefined,
      clientAddress: '10.0.0.7',
      upgrade: false,
      close: false,
    });
    expect(out).toBe(
      'POST /up?x=1 HTTP/1.1\r\n' +
        'Host: 8080-sbx.example.com\r\n' +
        'Accept: text/html\r\n' +
        'Set-Cookie-Like: a\r\n' +
        'Set-Cookie-Like: b\r\n' +
        'Transfer-Encoding: chunked\r\n' +
        'X-Forwarded-For: 203.0.113.9, 10.0.0.7\r\n' +
        'X-Forwarded-Host: 8080-sbx.example.com\r\n' +
        'X-Forwarded-Proto: http\r\n\r\n',
    );
  });

  it('masks the Host and keeps Connection/Upgrade (and what Connection names) for an upgrade', () => {
    const out = forwardRequestHead(parse(request), {
      maskHost: 'localhost:3000',
      clientAddress: undefined,
      upgrade: true,
      close: false,
    });
    expect(out).toMatch(/^POST \/up\?x=1 HTTP\/1\.1\r\nHost: localhost:3000\r\n/);
    expect(out).toContain('Upgrade: websocket\r\n');
    expect(out).toContain('Connection: keep-alive, X-Private\r\n');
    expect(out).toContain('X-Private: hop\r\n');
    expect(out).not.toContain('secret');
    expect(out).not.toMatch(/e2b-sandbox/i);
  });

  it('tells the sandbox to close when the client will, and keeps an HTTP/1.0 client alive only when asked', () => {
    const closing = forwardRequestHead(parse('GET / HTTP/1.1\r\nHost: 1-a.b\r\nConnection: close\r\n\r\n'), {
      maskHost: undefined,
      clientAddress: undefined,
      upgrade: false,
      close: true,
    });
    expect(closing).toContain('Connection: close\r\n');
    const old = forwardRequestHead(parse('GET / HTTP/1.0\r\nHost: 1-a.b\r\nConnection: keep-alive\r\n\r\n'), {
      maskHost: undefined,
      clientAddress: undefined,
      upgrade: false,
      close: false,
    });
    expect(old).toMatch(/^GET \/ HTTP\/1\.0\r\n/);
    expect(old).toContain('Connection: keep-alive\r\n');
  });
});
