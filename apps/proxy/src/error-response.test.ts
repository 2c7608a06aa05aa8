import { describe, expect, it } from 'vitest';
import { tokenMatches } from './access-token.js';
import { errorResponse, rawErrorResponse } from './error-response.js';
import {
  AccessDenied,
  PortClosed,
  ResumeFailed,
  RouteRequestInvalid,
  SandboxNotRunning,
  SandboxUnknown,
  UpstreamTimeout,
} from './proxy-errors.js';

describe('errorResponse', () => {
  it('gives each cause its own status and a JSON body naming sandbox and port', () => {
    const cases = [
      [new RouteRequestInvalid('bad host'), 400],
      [new AccessDenied('s1', 80, true), 403],
      [new SandboxUnknown('s1', 80), 404],
      [new SandboxNotRunning('s1', 80, 'paused'), 409],
      [new PortClosed('s1', 80, 'ECONNREFUSED'), 502],
      [new ResumeFailed('s1', 80, 'boom'), 503],
      [new UpstreamTimeout('s1', 80, 'no answer'), 504],
    ] as const;
    for (const [err, status] of cases) {
      const r = errorResponse(err);
      expect(r.status).toBe(status);
      const body = JSON.parse(r.body) as Record<string, unknown>;
      expect(body['code']).toBe(err.code);
      if (status !== 400) expect(body).toMatchObject({ sandboxId: 's1', port: 80 });
    }
    expect(new Set(cases.map(([, s]) => s)).size).toBe(cases.length);
    expect(errorResponse(new Error('x')).status).toBe(500);
  });

  it('writes a whole HTTP/1.1 answer for raw sockets', () => {
    const raw = rawErrorResponse(new SandboxUnknown('s1', 80));
    expect(raw).toMatch(/^HTTP\/1\.1 404 Not Found\r\n/);
    const [head, body] = raw.split('\r\n\r\n');
    expect(head).toContain(`content-length: ${Buffer.byteLength(body!)}`);
  });
});

describe('tokenMatches', () => {
  it('matches only the same token, whatever the lengths', () => {
    expect(tokenMatches('s3cret', 's3cret')).toBe(true);
    expect(tokenMatches('s3cret', 's3cre')).toBe(false);
    expect(tokenMatches('s3cret', 's3cretx')).toBe(false);
    expect(tokenMatches('s3cret', '')).toBe(false);
  });
});
