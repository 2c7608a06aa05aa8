import { randomBytes } from 'node:crypto';
import { appendFile, copyFile, mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { MemoryBlocks } from '#storage';
import { CowOverlay } from './cow-overlay.js';
import { decodeJournal, encodeJournalHeader, encodeJournalRecord, type BlockChange } from './overlay-journal.js';

const BS = 4096;
let dir: string;
beforeEach(async () => {
  dir = await mkdtemp(join(tmpdir(), 'overlay-journal-'));
});
afterEach(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function readAll(o: CowOverlay): Promise<Buffer> {
  const out = Buffer.alloc(o.size);
  await o.readAt(out, 0);
  return out;
}

describe('journal codec', () => {
  it('round-trips records and stops at a torn or corrupted one', () => {
    const a: BlockChange[] = [
      [1, 1],
      [7, 2],
    ];
    const b: BlockChange[] = [[3, 0]];
    const bytes = Buffer.concat([encodeJournalHeader(4), encodeJournalRecord(a), encodeJournalRecord(b)]);
    expect(decodeJournal(bytes, 10)).toEqual({ generation: 4, records: [a, b], validBytes: bytes.length });
    const torn = bytes.subarray(0, bytes.length - 2);
    expect(decodeJournal(torn, 10).records).toEqual([a]);
    const flipped = Buffer.from(bytes);
    flipped[25]! ^= 1;
    expect(decodeJournal(flipped, 10).records).toEqual([]);
    expect(decodeJournal(bytes, 5).records).toEqual([]); // block 7 past a 5-block device
    expect(decodeJournal(Buffer.alloc(30), 10).generation).toBeUndefined();
  });

  it('fuzz: random bytes never throw and never yield out-of-range changes', () => {
    fc.assert(
      fc.property(fc.uint8Array({ maxLength: 200 }), (raw) => {
        const bytes = Buffer.concat([encodeJournalHeader(1), Buffer.from(raw)]);
        for (const record of decodeJournal(bytes, 64).records) {
          for (const [block, state] of record) {
            expect(block).toBeLessThan(64);
            expect(state).toBeLessThanOrEqual(2);
          }
        }
      }),
    );
  });
});

describe('CowOverlay journal', () => {
  const SIZE = 64 * 1024 * 1024; // 16384 blocks: a flush of a few blocks goes to the journal

  it('a flush of a few blocks appends to the journal instead of rewriting the maps', async () => {
    const base = new MemoryBlocks(randomBytes(SIZE));
    const o = await CowOverlay.open({ base, dir: join(dir, 'o') });
    const snapshotBefore = await readFile(join(dir, 'o', 'overlay.state'));
    await o.writeAt(Buffer.alloc(BS, 1), 10 * BS);
    await o.zeroAt(20 * BS, BS);
    await o.flush();
    expect(await readFile(join(dir, 'o', 'overlay.state'))).toEqual(snapshotBefore);
    expect((await stat(join(dir, 'o', 'overlay.journal'))).size).toBeGreaterThan(20);
    const contents = await readAll(o);
    await o.close();
    const again = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect((await readAll(again)).equals(contents)).toBe(true);
    expect([...again.written]).toEqual([10]);
    expect([...again.zeroed]).toEqual([20]);
    await again.close();
  });

  it('a torn journal tail is dropped and later flushes append after the last good record', async () => {
    const base = new MemoryBlocks(randomBytes(SIZE));
    const o = await CowOverlay.open({ base, dir: join(dir, 'o') });
    await o.writeAt(Buffer.alloc(BS, 1), 0);
    await o.flush();
    await o.close();
    await appendFile(join(dir, 'o', 'overlay.journal'), Buffer.from([9, 0, 0, 0, 1, 2]));
    const again = await CowOverlay.open({ base, dir: join(dir, 'o') });
    await again.writeAt(Buffer.alloc(BS, 2), BS);
    await again.flush();
    const contents = await readAll(again);
    await again.close();
    const third = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect([...third.written]).toEqual([0, 1]);
    expect((await readAll(third)).equals(contents)).toBe(true);
    await third.close();
  });

  it('records older than the snapshot are never replayed over it', async () => {
    const base = new MemoryBlocks(randomBytes(SIZE));
    const o = await CowOverlay.open({ base, dir: join(dir, 'o') });
    await o.writeAt(Buffer.alloc(BS, 1), 5 * BS);
    await o.flush(); // journal (generation 0): block 5 written
    await copyFile(join(dir, 'o', 'overlay.journal'), join(dir, 'old-journal'));
    await o.zeroAt(0, SIZE); // every block changes: a new snapshot (generation 1)
    await o.flush();
    await o.close();
    // A crash between the snapshot's rename and the journal's reset leaves the old journal.
    await copyFile(join(dir, 'old-journal'), join(dir, 'o', 'overlay.journal'));
    const again = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect((await readAll(again)).equals(Buffer.alloc(SIZE))).toBe(true);
    await again.close();
  });

  it('the checkpoint and the blocks changed since it survive a reopen, through the snapshot and the journal', async () => {
    const base = new MemoryBlocks(2048 * BS); // big enough for a flush of a few blocks to be a journal record
    const o = await CowOverlay.open({ base, dir: join(dir, 'o') });
    await o.writeAt(Buffer.alloc(2 * BS, 1), 0); // 0, 1 before the checkpoint
    o.beginCheckpoint();
    await o.writeAt(Buffer.alloc(BS, 2), 5 * BS); // during the checkpoint's export: after it
    await o.commitCheckpoint('c1'); // durable: a new snapshot
    await o.writeAt(Buffer.alloc(BS, 3), 1 * BS); // a rewrite of a written block: no map changes
    await o.zeroAt(9 * BS, BS);
    await o.flush(); // a journal record, with the tracked bit
    expect((await stat(join(dir, 'o', 'overlay.journal'))).size).toBeGreaterThan(20);
    // A crash now: reopen from what is on disk.
    await copyFile(join(dir, 'o', 'overlay.state'), join(dir, 'copy-state'));
    await copyFile(join(dir, 'o', 'overlay.journal'), join(dir, 'copy-journal'));
    await o.writeAt(Buffer.alloc(BS, 4), 20 * BS); // after the copy
    await o.flush();
    await o.close();
    const again = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect([again.checkpoint, [...again.tracked]]).toEqual(['c1', [1, 5, 9, 20]]);
    await again.close();
    await copyFile(join(dir, 'copy-state'), join(dir, 'o', 'overlay.state'));
    await copyFile(join(dir, 'copy-journal'), join(dir, 'o', 'overlay.journal'));
    const crashed = await CowOverlay.open({ base, dir: join(dir, 'o') });
    expect([crashed.checkpoint, [...crashed.tracked], [...crashed.written]]).toEqual(['c1', [1, 5, 9], [0, 1, 5]]);
    // A checkpoint whose export failed leaves the set as it was, grown by what came meanwhile.
    crashed.beginCheckpoint();
    await crashed.writeAt(Buffer.alloc(BS, 5), 30 * BS);
    crashed.abandonCheckpoint();
    expect([crashed.checkpoint, [...crashed.tracked]]).toEqual(['c1', [1, 5, 9, 30]]);
    await crashed.close();
  });

  it('a journal record with the tracked bit round-trips; other high bits are refused', () => {
    const a: BlockChange[] = [
      [1, 1, true],
      [2, 0],
    ];
    const bytes = Buffer.concat([encodeJournalHeader(1), encodeJournalRecord(a)]);
    expect(decodeJournal(bytes, 10).records).toEqual([a]);
    const bad = Buffer.concat([encodeJournalHeader(1), encodeJournalRecord([[1, 9 as 1]])]);
    expect(decodeJournal(bad, 10).records).toEqual([]);
  });

  it('property: on a device big enough for journal and snapshot flushes, reopen reads like a flat copy', async () => {
    const size = 2048 * BS; // snapshot threshold ~25 changed blocks per flush
    let run = 0;
    await fc.assert(
      fc.asyncProperty(
        fc.array(
          fc.oneof(
            fc.record({
              kind: fc.constant('write' as const),
              block: fc.nat(2047),
              blocks: fc.integer({ min: 1, max: 40 }),
            }),
            fc.record({
              kind: fc.constant('zero' as const),
              block: fc.nat(2047),
              blocks: fc.integer({ min: 1, max: 40 }),
            }),
            fc.record({ kind: fc.constant('reopen' as const) }),
          ),
          { maxLength: 15 },
        ),
        async (ops) => {
          const original = randomBytes(size);
          const base = new MemoryBlocks(original);
          const model = Buffer.from(original);
          const where = join(dir, `p${run++}`);
          let o = await CowOverlay.open({ base, dir: where });
          try {
            for (const [i, op] of ops.entries()) {
              if (op.kind === 'reopen') {
                await o.flush();
                await o.close();
                o = await CowOverlay.open({ base, dir: where });
                continue;
              }
              const offset = op.block * BS;
              const length = Math.min(op.blocks * BS, size - offset);
              if (op.kind === 'write') {
                await o.writeAt(Buffer.alloc(length, i + 1), offset);
                model.fill(i + 1, offset, offset + length);
              } else {
                await o.zeroAt(offset, length);
                model.fill(0, offset, offset + length);
              }
            }
            await o.flush();
            await o.close();
            o = await CowOverlay.open({ base, dir: where });
            expect((await readAll(o)).equals(model)).toBe(true);
          } finally {
            await o.remove();
          }
        },
      ),
      { numRuns: 12 },
    );
  });
});
