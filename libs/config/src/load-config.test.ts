import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { ConfigInvalid, describeConfig, loadConfig } from '#config';

const schema = z.object({
  controlSocket: z.string().default('/run/sbx/test.sock'),
  metricsPort: z.coerce.number().int().min(0).max(65535).default(0),
  record: z.array(z.string()).default([]),
  apiToken: z.string().optional(),
});

describe('loadConfig', () => {
  it('takes flags over environment over defaults', () => {
    const cfg = loadConfig('test', schema, 'SBX_TEST_', {
      argv: ['--metrics-port', '9999'],
      env: { SBX_TEST_METRICS_PORT: '1', SBX_TEST_CONTROL_SOCKET: '/tmp/x.sock' },
    });
    expect(cfg).toEqual({ controlSocket: '/tmp/x.sock', metricsPort: 9999, record: [] });
  });

  it('collects repeated flags and comma-separated env into arrays', () => {
    expect(
      loadConfig('test', schema, 'SBX_TEST_', { argv: ['--record', 'a=1', '--record=b=2'], env: {} }).record,
    ).toEqual(['a=1', 'b=2']);
    expect(loadConfig('test', schema, 'SBX_TEST_', { argv: [], env: { SBX_TEST_RECORD: 'a=1, b=2' } }).record).toEqual([
      'a=1',
      'b=2',
    ]);
  });

  it('names the bad field, by flag and variable', () => {
    const bad = () => loadConfig('test', schema, 'SBX_TEST_', { argv: ['--metrics-port', '70000'], env: {} });
    expect(bad).toThrow(ConfigInvalid);
    expect(bad).toThrow(/--metrics-port \/ SBX_TEST_METRICS_PORT/);
  });

  it('rejects unknown flags with their name', () => {
    expect(() => loadConfig('test', schema, 'SBX_TEST_', { argv: ['--no-such'], env: {} })).toThrow(/no-such/);
  });

  it('masks secrets when describing the effective configuration', () => {
    expect(describeConfig({ apiToken: 'abc', controlSocket: '/x' })).toEqual({ apiToken: '***', controlSocket: '/x' });
  });
});
