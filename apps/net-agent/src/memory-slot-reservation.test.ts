import { describe, expect, it } from 'vitest';
import { MemorySlotReservation } from './memory-slot-reservation.js';
import { SlotAlreadyReleased, SlotsExhausted } from './slot-reservation.js';

describe('MemorySlotReservation', () => {
  it('hands out each index once, round robin, and fails when all are taken', async () => {
    const r = new MemorySlotReservation(1, 3);
    const got = [await r.reserve(), await r.reserve(), await r.reserve()].map((s) => s.idx);
    expect(got).toEqual([1, 2, 3]);
    await expect(r.reserve()).rejects.toBeInstanceOf(SlotsExhausted);
    await r.release({ idx: 2, key: '2' });
    expect((await r.reserve()).idx).toBe(2);
  });

  it('an index just released comes back last', async () => {
    const r = new MemorySlotReservation(1, 4);
    const a = await r.reserve();
    await r.release(a);
    expect((await r.reserve()).idx).toBe(2);
    await expect(r.release(a)).rejects.toBeInstanceOf(SlotAlreadyReleased);
  });

  it('claims specific indexes for adopted slots', async () => {
    const r = new MemorySlotReservation(1, 4);
    expect(await r.claim(3)).toBe(true);
    expect(await r.claim(3)).toBe(false);
    expect((await r.held()).map((s) => s.idx)).toEqual([3]);
  });
});
