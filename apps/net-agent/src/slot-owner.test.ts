import { describe, expect, it } from 'vitest';
import { ownerAlias, parseOwnerAlias, poolSlotAbandoned } from './slot-owner.js';

describe('slot owner mark', () => {
  it("tells a sandbox's slot from a pooled VMM's, and reads back what it wrote", () => {
    expect(ownerAlias({ sandboxId: 'sbx-1' })).toBe('sbx-sandbox:sbx-1');
    expect(ownerAlias({ sandboxId: 'vmm-pool-1', pooledAt: 1700000000123 })).toBe('sbx-pool:1700000000123:vmm-pool-1');
    expect(ownerAlias({ sandboxId: '', pooledAt: 5 })).toBe('');
    for (const owner of [{ sandboxId: 'sbx-1' }, { sandboxId: 'a:b', pooledAt: 42 }])
      expect(parseOwnerAlias(ownerAlias(owner))).toEqual(owner);
    // Someone else's alias, or a damaged one, marks nothing.
    for (const alias of [undefined, '', 'uplink', 'sbx-pool:', 'sbx-pool:x:id', 'sbx-pool:12:'])
      expect(parseOwnerAlias(alias), String(alias)).toBeUndefined();
  });

  it('a pooled slot is abandoned only without a process, and once its VMM ended or the grace passed', () => {
    const pooled = { sandboxId: 'vmm-pool-1', pooledAt: 1000 };
    const at = (now: number, busy = false, seenBusy = false) => ({ busy, seenBusy, now, graceMs: 5000 });
    expect(poolSlotAbandoned(pooled, at(2000))).toBe(false);
    expect(poolSlotAbandoned(pooled, at(6000))).toBe(true);
    expect(poolSlotAbandoned(pooled, at(2000, false, true))).toBe(true);
    expect(poolSlotAbandoned(pooled, at(60_000, true, true))).toBe(false);
    expect(poolSlotAbandoned({ sandboxId: 'sbx-1' }, at(60_000))).toBe(false);
    expect(poolSlotAbandoned(undefined, at(60_000))).toBe(false);
  });
});
