import { describe, expect, it } from 'vitest';
import { encodeQuery, parseQuery, type ParsedQuery } from './dns-codec.js';
import { RecordInvalid, RecordTable } from './record-table.js';

function resolve(table: RecordTable, name: string): string | undefined {
  const msg = encodeQuery({ id: 1, name, type: 1 });
  const query = parseQuery(msg) as ParsedQuery;
  expect(query.ok).toBe(true);
  return table.resolve(msg, query)?.ip;
}

describe('RecordTable', () => {
  it('resolves {id} and {id}-{anything} in any letter case, and nothing else', () => {
    const table = new RecordTable();
    table.set('i1abc', '10.11.0.2');
    expect(resolve(table, 'i1abc')).toBe('10.11.0.2');
    expect(resolve(table, 'I1ABC.')).toBe('10.11.0.2');
    expect(resolve(table, 'i1abc-49983')).toBe('10.11.0.2');
    expect(resolve(table, 'I1Abc-x-y')).toBe('10.11.0.2');
    expect(resolve(table, 'i1ab')).toBeUndefined();
    expect(resolve(table, 'i1abcd')).toBeUndefined();
    expect(resolve(table, 'x-i1abc')).toBeUndefined();
    expect(resolve(table, 'i1abc.other')).toBeUndefined();
    expect(resolve(table, '.')).toBeUndefined();
  });

  it('resolves under the configured zone, in any case, and not under another one', () => {
    const table = new RecordTable('Sbx.Internal.');
    table.set('abc', '10.11.0.3');
    expect(resolve(table, 'abc.sbx.internal')).toBe('10.11.0.3');
    expect(resolve(table, 'ABC-1.SBX.internal.')).toBe('10.11.0.3');
    expect(resolve(table, 'abc')).toBe('10.11.0.3');
    expect(resolve(table, 'abc.sbx')).toBeUndefined();
    expect(resolve(table, 'abc.sbx.internal.x')).toBeUndefined();
    expect(resolve(table, 'abc.sbx.internals')).toBeUndefined();
    expect(resolve(table, 'x.abc.sbx.internal')).toBeUndefined();
  });

  it('prefers the longest id when ids contain dashes', () => {
    const table = new RecordTable();
    table.set('ab', '10.0.0.1');
    table.set('ab-cd', '10.0.0.2');
    expect(resolve(table, 'ab-cd-80')).toBe('10.0.0.2');
    expect(resolve(table, 'ab-ce-80')).toBe('10.0.0.1');
    expect(resolve(table, 'ab-cd')).toBe('10.0.0.2');
  });

  it('removes only when the record still points at the given ip', () => {
    const table = new RecordTable();
    table.set('abc', '10.0.0.1');
    table.set('ABC', '10.0.0.2'); // re-set (a new sandbox took the name)
    expect(table.remove('abc', '10.0.0.1')).toBe(false);
    expect(resolve(table, 'abc')).toBe('10.0.0.2');
    expect(table.remove('Abc', '10.0.0.2')).toBe(true);
    expect(resolve(table, 'abc')).toBeUndefined();
    expect(table.remove('abc', '10.0.0.2')).toBe(false);
  });

  it('lists records sorted by name', () => {
    const table = new RecordTable();
    table.set('b', '10.0.0.2');
    table.set('a', '10.0.0.1');
    expect(table.list().map(({ name, ip }) => `${name}=${ip}`)).toEqual(['a=10.0.0.1', 'b=10.0.0.2']);
  });

  it('refuses names that are not one label and addresses that are not IPv4', () => {
    const table = new RecordTable();
    for (const [name, ip] of [
      ['', '10.0.0.1'],
      ['a.b', '10.0.0.1'],
      ['-a', '10.0.0.1'],
      ['a'.repeat(64), '10.0.0.1'],
      ['a b', '10.0.0.1'],
      ['abc', '10.0.0.256'],
      ['abc', '::1'],
      ['abc', ''],
    ] as const) {
      expect(() => table.set(name, ip)).toThrow(RecordInvalid);
    }
    expect(table.size).toBe(0);
    expect(() => table.set('a.b', '10.0.0.1')).toThrow(/one DNS label/);
  });

  it('refuses an invalid zone', () => {
    expect(() => new RecordTable('bad zone')).toThrow(/invalid zone/);
  });
});
