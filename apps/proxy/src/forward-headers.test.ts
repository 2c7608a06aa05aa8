import { describe, expect, it } from 'vitest';
import { forwardRequestHeaders, forwardResponseHeaders } from './forward-headers.js';

const pairs = (raw: string[]) => Array.from({ length: raw.length / 2 }, (_, i) => [raw[2 * i], raw[2 * i + 1]]);

describe('forwardRequestHeaders', () => {
  const raw = [
    'Host', '8080-sbx.example.com',
    'Connection', 'keep-alive, X-Private',
    'X-Private', 'hop',
    'Keep-Alive', 'timeout=5',
    'e2b-traffic-access-token', 'secret',
    'E2B-Sandbox-Id', 'sbx',
    'e2b-sandbox-port', '8080',
    'Accept', 'text/html',
    'Set-Cookie-Like', 'a',
    'Set-Cookie-Like', 'b',
    'X-Forwarded-For', '203.0.113.9',
    'Upgrade', 'websocket',
  ]; // prettier-ignore

  it('drops hop-by-hop and proxy headers, keeps the rest in order with duplicates, adds X-Forwarded-*', () => {
    const out = pairs(
      forwardRequestHeaders(raw, { maskHost: undefined, clientAddress: '::ffff:10.0.0.7', upgrade: false }),
    );
    expect(out).toEqual([
      ['Host', '8080-sbx.example.com'],
      ['Accept', 'text/html'],
      ['Set-Cookie-Like', 'a'],
      ['Set-Cookie-Like', 'b'],
      ['X-Forwarded-For', '203.0.113.9, 10.0.0.7'],
      ['X-Forwarded-Host', '8080-sbx.example.com'],
      ['X-Forwarded-Proto', 'http'],
    ]);
  });

  it('masks the Host and keeps Connection/Upgrade for an upgrade', () => {
    const out = pairs(
      forwardRequestHeaders(raw, { maskHost: 'localhost:3000', clientAddress: undefined, upgrade: true }),
    );
    expect(out[0]).toEqual(['Host', 'localhost:3000']);
    expect(out).toContainEqual(['Upgrade', 'websocket']);
    expect(out).toContainEqual(['Connection', 'keep-alive, X-Private']);
    expect(out.flat()).not.toContain('secret');
  });
});

describe('forwardResponseHeaders', () => {
  it('drops framing and connection headers (Node frames the body again)', () => {
    const out = forwardResponseHeaders([
      'Content-Type', 'text/plain',
      'Transfer-Encoding', 'chunked',
      'Connection', 'close',
      'Set-Cookie', 'a=1',
      'Set-Cookie', 'b=2',
    ]); // prettier-ignore
    expect(pairs(out)).toEqual([
      ['Content-Type', 'text/plain'],
      ['Set-Cookie', 'a=1'],
      ['Set-Cookie', 'b=2'],
    ]);
  });
});
