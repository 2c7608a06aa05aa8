import { describe, expect, it } from 'vitest';
import { baseHeader } from '#storage';
import { BuildMemoryInfo, type LoadedFacts } from './build-memory-info.js';

const facts = (id: string, keep = true): LoadedFacts => ({
  header: baseHeader(id, 1 << 20, 4096),
  prefetchSet: undefined,
  keep,
});

describe('BuildMemoryInfo', () => {
  const ids = Array.from({ length: 4 }, (_, i) => `0000000${i}-0000-4000-8000-000000000000`);

  it('reads a build once, keeps the most recently used builds, and reads again what it let go', async () => {
    const info = new BuildMemoryInfo(2);
    const loads: string[] = [];
    const get = (id: string) =>
      info.get(id, async () => {
        loads.push(id);
        return facts(id);
      });
    expect((await get(ids[0]!)).header.metadata.buildId).toBe(ids[0]);
    await get(ids[0]!);
    await get(ids[1]!);
    await get(ids[0]!); // ids[0] is now the most recent
    await get(ids[2]!); // ids[1] goes
    expect(info.size).toBe(2);
    await get(ids[0]!);
    await get(ids[1]!);
    expect(loads).toEqual([ids[0], ids[1], ids[2], ids[1]]);
  });

  it('does not keep an answer that may change (a read that failed for now), nor a failed load', async () => {
    const info = new BuildMemoryInfo();
    let loads = 0;
    await info.get(ids[0]!, async () => (loads++, facts(ids[0]!, false)));
    await info.get(ids[0]!, async () => (loads++, facts(ids[0]!, false)));
    expect(loads).toBe(2);
    await expect(
      info.get(ids[1]!, async () => {
        throw new Error('bucket unreachable');
      }),
    ).rejects.toThrow('bucket unreachable');
    expect(info.size).toBe(0);
  });
});
