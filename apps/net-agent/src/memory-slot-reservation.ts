import { SlotAlreadyReleased, SlotsExhausted, type ReservedSlot, type SlotReservation } from './slot-reservation.js';

/**
 * Single-node reservation. Indexes are handed out round-robin rather than lowest-first, so an
 * index just released (whose namespace the kernel may still be tearing down) is the last to
 * come back.
 */
export class MemorySlotReservation implements SlotReservation {
  readonly kind = 'memory';
  private readonly taken = new Set<number>();
  private cursor: number;

  constructor(
    private readonly first: number,
    private readonly count: number,
  ) {
    this.cursor = first;
  }

  async reserve(): Promise<ReservedSlot> {
    if (this.taken.size >= this.count) throw new SlotsExhausted('memory', this.count);
    for (let i = 0; i < this.count; i++) {
      const idx = this.cursor;
      this.cursor = idx + 1 > this.first + this.count - 1 ? this.first : idx + 1;
      if (!this.taken.has(idx)) {
        this.taken.add(idx);
        return { idx, key: this.keyOf(idx) };
      }
    }
    throw new SlotsExhausted('memory', this.count);
  }

  async release(slot: ReservedSlot): Promise<void> {
    if (!this.taken.delete(slot.idx)) throw new SlotAlreadyReleased(slot.idx, slot.key);
  }

  async claim(idx: number): Promise<boolean> {
    if (this.taken.has(idx)) return false;
    this.taken.add(idx);
    return true;
  }

  keyOf(idx: number): string {
    return String(idx);
  }

  async held(): Promise<ReservedSlot[]> {
    return [...this.taken].sort((a, b) => a - b).map((idx) => ({ idx, key: String(idx) }));
  }

  close(): void {}
}
