import { constants } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { crc32 } from 'node:zlib';
import type { DirtyBitmap } from '#storage';
import { readIfPresent, writeAtomically, writeDurably } from './durable-file.js';

/** A block's state in the overlay: 0 from the base, 1 written (bytes in the overlay file), 2 zeroed. */
export type BlockState = 0 | 1 | 2;
/**
 * One block's new state; `tracked` when it changed since the overlay's last checkpoint (stored
 * as bit 2 of the state byte, which journals from before checkpoints never set).
 */
export type BlockChange = readonly [block: number, state: BlockState, tracked?: true];

const TRACKED_BIT = 4;

const MAGIC = Buffer.from('SBXJRNL1', 'ascii');
const HEADER_BYTES = 20;

/**
 * The journal next to an overlay's snapshot: each flush that changed a few block states
 * appends one record (block, new state)… with a CRC and fdatasyncs it, instead of rewriting
 * both bitmaps of the whole device (640 KiB for 10 GiB). The header names the snapshot
 * generation it applies to, so records older than a newer snapshot are never replayed over it.
 * A torn last record (crash mid-append, never acknowledged) fails its CRC and ends the replay.
 */
export function encodeJournalHeader(generation: number): Buffer {
  const out = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(out, 0);
  out.writeBigUInt64LE(BigInt(generation), 8);
  out.writeUInt32LE(crc32(out.subarray(0, 16)), 16);
  return out;
}

export function encodeJournalRecord(changes: readonly BlockChange[]): Buffer {
  const out = Buffer.alloc(4 + changes.length * 5 + 4);
  out.writeUInt32LE(changes.length, 0);
  changes.forEach(([block, state, tracked], i) => {
    out.writeUInt32LE(block, 4 + i * 5);
    out.writeUInt8(state | (tracked ? TRACKED_BIT : 0), 8 + i * 5);
  });
  out.writeUInt32LE(crc32(out.subarray(0, out.length - 4)), out.length - 4);
  return out;
}

/**
 * Parses a journal: its generation (undefined when the header is unusable) and every intact
 * record in order, plus how many bytes they span (appends continue there).
 */
export function decodeJournal(
  bytes: Buffer,
  blockCount: number,
): { generation: number | undefined; records: BlockChange[][]; validBytes: number } {
  if (
    bytes.length < HEADER_BYTES ||
    !bytes.subarray(0, 8).equals(MAGIC) ||
    crc32(bytes.subarray(0, 16)) !== bytes.readUInt32LE(16)
  ) {
    return { generation: undefined, records: [], validBytes: 0 };
  }
  const generation = Number(bytes.readBigUInt64LE(8));
  const records: BlockChange[][] = [];
  let at = HEADER_BYTES;
  while (at + 8 <= bytes.length) {
    const count = bytes.readUInt32LE(at);
    const end = at + 4 + count * 5 + 4;
    if (count === 0 || end > bytes.length) break;
    if (crc32(bytes.subarray(at, end - 4)) !== bytes.readUInt32LE(end - 4)) break;
    const changes: BlockChange[] = [];
    let sane = true;
    for (let i = 0; i < count; i++) {
      const block = bytes.readUInt32LE(at + 4 + i * 5);
      const raw = bytes.readUInt8(at + 8 + i * 5);
      const state = (raw & ~TRACKED_BIT) as BlockState;
      if (block >= blockCount || state > 2) sane = false;
      changes.push((raw & TRACKED_BIT) !== 0 ? [block, state, true] : [block, state]);
    }
    if (!sane) break;
    records.push(changes);
    at = end;
  }
  return { generation, records, validBytes: at };
}

export class OverlayJournal {
  private constructor(
    private readonly path: string,
    private file: FileHandle,
    private length: number,
  ) {}

  /**
   * Opens the journal for a snapshot of `maps.generation` and replays its records over the
   * maps, in order (each holds the states one flush made durable); a torn tail is cut off so
   * appends follow the last good record. A journal of another generation (or none) is replaced
   * by an empty one.
   */
  static async open(
    path: string,
    maps: { generation: number; written: DirtyBitmap; zeroed: DirtyBitmap; tracked: DirtyBitmap },
  ): Promise<OverlayJournal> {
    // Read on the event loop like the state file (cow-overlay.ts): absent for a new overlay.
    const bytes = readIfPresent(path) ?? Buffer.alloc(0);
    const parsed = decodeJournal(bytes, maps.written.blockCount);
    const current = parsed.generation === maps.generation;
    // A new overlay's empty journal holds nothing a flush promised yet (see writeAtomically).
    if (!current && bytes.length === 0) writeAtomically(path, encodeJournalHeader(maps.generation));
    else if (!current) await writeDurably(path, encodeJournalHeader(maps.generation));
    const file = await open(path, constants.O_RDWR);
    try {
      if (current && bytes.length > parsed.validBytes) await file.truncate(parsed.validBytes);
    } catch (err) {
      await file.close();
      throw err;
    }
    for (const record of current ? parsed.records : []) {
      for (const [block, state, tracked] of record) {
        // Within one generation a block only ever joins the tracked set: a checkpoint starts a new one.
        if (tracked) maps.tracked.set(block);
        if (state === 1) maps.written.set(block);
        else maps.written.clear(block);
        if (state === 2) maps.zeroed.set(block);
        else maps.zeroed.clear(block);
      }
    }
    return new OverlayJournal(path, file, current ? parsed.validBytes : HEADER_BYTES);
  }

  get bytes(): number {
    return this.length;
  }

  /** Appends one record and makes it durable. */
  async append(changes: readonly BlockChange[]): Promise<void> {
    const record = encodeJournalRecord(changes);
    for (let done = 0; done < record.length;) {
      done += (await this.file.write(record, done, record.length - done, this.length + done)).bytesWritten;
    }
    await this.file.datasync();
    this.length += record.length;
  }

  /** Starts over for a new snapshot generation (after the snapshot is durable). */
  async reset(generation: number): Promise<void> {
    await this.file.close();
    await writeDurably(this.path, encodeJournalHeader(generation));
    this.file = await open(this.path, constants.O_RDWR);
    this.length = HEADER_BYTES;
  }

  async close(): Promise<void> {
    await this.file.close();
  }
}
