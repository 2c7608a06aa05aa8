import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { RouteRequestInvalid } from './proxy-errors.js';
import { routeTarget } from './route-target.js';

describe('routeTarget', () => {
  it('reads {port}-{sandboxId}.{anything} from Host, with or without a listening port', () => {
    expect(routeTarget('8080-abc123.example.com')).toEqual({ sandboxId: 'abc123', port: 8080 });
    expect(routeTarget('49983-i2x7k-q_1.sbx.e2b.app:5007')).toEqual({ sandboxId: 'i2x7k-q_1', port: 49983 });
    expect(routeTarget('3000-Mixed')).toEqual({ sandboxId: 'Mixed', port: 3000 });
  });

  it('prefers the explicit header pair, which must come whole', () => {
    expect(routeTarget('whatever.example', 'sbx1', '5900')).toEqual({ sandboxId: 'sbx1', port: 5900 });
    expect(() => routeTarget('8080-a.example', 'sbx1', undefined)).toThrow(/go together/);
    expect(() => routeTarget(undefined, 'bad/id', '80')).toThrow(/not a sandbox id/);
    expect(() => routeTarget(undefined, 'ok', '0')).toThrow(/not 1–65535/);
  });

  it('refuses what names no sandbox port, saying what was expected', () => {
    for (const host of [
      undefined,
      '',
      'example.com',
      '8080.example.com',
      '-abc.example.com',
      '8080-.example.com',
      '0-abc.example.com',
      '65536-abc.example.com',
      '123456-abc.example.com',
      '[::1]:5007',
      '8080-a b.example',
      `8080-${'a'.repeat(64)}.example`,
    ]) {
      expect(() => routeTarget(host), String(host)).toThrow(RouteRequestInvalid);
    }
    expect(() => routeTarget('example.com')).toThrow(/\{port\}-\{sandboxId\}\.\{domain\}/);
  });

  it('never throws anything but RouteRequestInvalid, whatever the input', () => {
    fc.assert(
      fc.property(fc.option(fc.string()), fc.option(fc.string()), fc.option(fc.string()), (host, id, port) => {
        try {
          const t = routeTarget(host ?? undefined, id ?? undefined, port ?? undefined);
          expect(t.port).toBeGreaterThanOrEqual(1);
          expect(t.port).toBeLessThanOrEqual(65535);
          expect(t.sandboxId).toMatch(/^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/);
        } catch (err) {
          expect(err).toBeInstanceOf(RouteRequestInvalid);
        }
      }),
      { numRuns: 5000 },
    );
  });
});
