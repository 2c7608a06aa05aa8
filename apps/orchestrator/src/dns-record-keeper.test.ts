import { describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { DnsRecordKeeper, type RegisteredName } from './dns-record-keeper.js';
import type { NameRegistry } from './node-services.js';

const logger = createLogger({ service: 'test', level: 'silent' });

/** A dns service in memory: set, remove-if-same-ip, list, as the real control API behaves. */
function memoryNames(): NameRegistry & { records: Map<string, string> } {
  const records = new Map<string, string>();
  return {
    records,
    set: async (name, ip) => void records.set(name, ip),
    remove: async (name, ip) => {
      if (records.get(name) === ip) records.delete(name);
    },
    list: async () => [...records].map(([name, ip]) => ({ name, ip })),
  };
}

describe('DnsRecordKeeper', () => {
  it('puts back the records a restarted dns lost, and fixes one pointing elsewhere', async () => {
    const names = memoryNames();
    names.records.set('a', '10.11.0.1');
    names.records.set('c', '10.11.0.99');
    const expected: RegisteredName[] = [
      { sandboxId: 'a', ip: '10.11.0.1' },
      { sandboxId: 'b', ip: '10.11.0.2' },
      { sandboxId: 'c', ip: '10.11.0.3' },
    ];
    const keeper = new DnsRecordKeeper({
      intervalMs: 0,
      names,
      expected: () => expected,
      stillExpected: () => true,
      logger,
    });
    expect((await keeper.check()).sort()).toEqual(['b', 'c']);
    expect(Object.fromEntries(names.records)).toEqual({ a: '10.11.0.1', b: '10.11.0.2', c: '10.11.0.3' });
    expect(await keeper.check()).toEqual([]);
  });

  it('takes a record back off when its sandbox started pausing while it was being put back', async () => {
    const names = memoryNames();
    let pausing = false;
    const realSet = names.set;
    names.set = async (name, ip) => {
      await realSet(name, ip);
      pausing = true; // the pause removed its name just before this set landed
    };
    const keeper = new DnsRecordKeeper({
      intervalMs: 0,
      names,
      expected: () => [{ sandboxId: 'p', ip: '10.11.0.5' }],
      stillExpected: () => !pausing,
      logger,
    });
    expect(await keeper.check()).toEqual([]);
    expect(names.records.has('p')).toBe(false);
  });

  it('leaves things as they are when dns cannot be listed', async () => {
    const names = memoryNames();
    names.list = async () => {
      throw new Error('14 UNAVAILABLE');
    };
    const keeper = new DnsRecordKeeper({
      intervalMs: 0,
      names,
      expected: () => [{ sandboxId: 'a', ip: '10.11.0.1' }],
      stillExpected: () => true,
      logger,
    });
    expect(await keeper.check()).toEqual([]);
    expect(names.records.size).toBe(0);
  });
});
