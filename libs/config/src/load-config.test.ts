import { describe, expect, it } from 'vitest';
import { z } from 'zod';
import { ConfigInvalid, describeConfig, describeFlags, loadConfig } from '#config';

const schema = z.object({
  controlSocket: z.string().default('/run/sbx/test.sock'),
  metricsPort: z.coerce.number().int().min(0).max(65535).default(0),
  record: z.array(z.string()).default([]),
  apiToken: z.string().optional(),
  bucket: z
    .string()
    .min(1)
    .default('/var/lib/sbx/bucket')
    .describe('where builds live')
    .meta({ aliases: ['SBX_BUCKET'] }),
  mode: z.enum(['sync', 'async']).default('sync').describe('how files are read'),
  fast: z.stringbool().default(true),
});

describe('loadConfig', () => {
  it('takes flags over environment over defaults', () => {
    const cfg = loadConfig('test', schema, 'SBX_TEST_', {
      argv: ['--metrics-port', '9999'],
      env: { SBX_TEST_METRICS_PORT: '1', SBX_TEST_CONTROL_SOCKET: '/tmp/x.sock' },
    });
    expect(cfg).toMatchObject({ controlSocket: '/tmp/x.sock', metricsPort: 9999, record: [] });
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

  it('reads a node-wide alias after the service variable, and treats an empty variable as unset', () => {
    const bucket = (env: NodeJS.ProcessEnv) => loadConfig('test', schema, 'SBX_TEST_', { argv: [], env }).bucket;
    expect(bucket({ SBX_BUCKET: '/shared' })).toBe('/shared');
    expect(bucket({ SBX_BUCKET: '/shared', SBX_TEST_BUCKET: '/own' })).toBe('/own');
    expect(bucket({ SBX_BUCKET: '/shared', SBX_TEST_BUCKET: '' })).toBe('/shared');
    expect(bucket({ SBX_BUCKET: '', SBX_TEST_BUCKET: '' })).toBe('/var/lib/sbx/bucket');
    expect(() =>
      loadConfig('test', schema, 'SBX_TEST_', { argv: ['--bucket', ''], env: { SBX_BUCKET: '/x' } }),
    ).toThrow(/--bucket/);
  });

  it('lists every flag for --help from the schema: values, description, default, aliases', () => {
    const help = describeFlags(schema, 'SBX_TEST_');
    expect(help).toContain('SBX_TEST_<FLAG>');
    expect(help).toMatch(/--bucket <value> +where builds live \(default \/var\/lib\/sbx\/bucket; also SBX_BUCKET\)/);
    expect(help).toMatch(/--metrics-port <n> +\(default 0\)/);
    expect(help).toMatch(/--record <value> \(repeatable\) +\(default none\)/);
    expect(help).toMatch(/--mode sync\|async +how files are read \(default sync\)/);
    expect(help).toMatch(/--fast true\|false +\(default true\)/);
    expect(help).toMatch(/--api-token <value>$/m);
  });
});
