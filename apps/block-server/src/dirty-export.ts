import { open } from 'node:fs/promises';
import { createMappings, NIL_UUID, normalizeMappings, type BuildMapping, type DirtyBitmap } from '#storage';
import type { CowOverlay } from './cow-overlay.js';
import type { ExportParent } from './export-parent.js';

export interface ExportDiffOptions {
  /** The device: its block maps say what changed, its reads give the bytes. */
  source: Pick<CowOverlay, 'size' | 'blockSize' | 'written' | 'zeroed' | 'readAt'>;
  buildId: string;
  diffPath: string;
  /**
   * Export only these blocks (those changed since a checkpoint whose build is the parent);
   * absent: every block the overlay holds written or zeroed.
   */
  only?: DirtyBitmap;
  /**
   * Deduplicate against the parent (E2B's block/dedup.go): a written block equal to what the
   * parent holds there is neither stored nor mapped, so the merged header keeps the parent's
   * mapping for it. Must be the build the returned mappings are merged over.
   */
  parent?: ExportParent;
}

export interface ExportedDiff {
  /** Mappings of the changed blocks only; merge them over the parent's. */
  mappings: BuildMapping[];
  /** Bytes written to the diff file. */
  diffSize: number;
  /** Blocks stored in the diff file. */
  storedBlocks: number;
  /** Blocks exported as nil (zero) mappings. */
  zeroBlocks: number;
  /** Written blocks equal to the parent's: left to it. */
  dedupedBlocks: number;
}

/** Largest run of consecutive blocks read, compared and written in one go. */
const RUN_BYTES = 4 * 1024 * 1024;

/**
 * Writes the changed blocks to a diff file in ascending block order (DESIGN.md §2) and
 * returns their mappings to `buildId`. Blocks that are all zeros, written or trimmed, become
 * nil mappings instead of stored bytes; with a parent, blocks equal to it are left out. The
 * file is fsynced before this returns.
 */
export async function exportDiff(options: ExportDiffOptions): Promise<ExportedDiff> {
  const { source, buildId, only, parent } = options;
  const { size, blockSize: bs } = source;
  const inScope = (b: number): boolean => only === undefined || only.has(b);
  const dirty: number[] = [];
  const zero: number[] = [];
  // Iterating the (usually much smaller) checkpoint set when there is one.
  for (const b of only ?? source.written) if (source.written.has(b)) dirty.push(b);
  for (const b of only ?? source.zeroed) if (source.zeroed.has(b) && inScope(b)) zero.push(b);
  const stored: number[] = [];
  let deduped = 0;
  const file = await open(options.diffPath, 'w', 0o600);
  let diffSize = 0;
  try {
    const buffer = Buffer.alloc(RUN_BYTES);
    const parentBytes = parent ? Buffer.alloc(RUN_BYTES) : undefined;
    const zeroBlock = Buffer.alloc(bs);
    for (let i = 0; i < dirty.length;) {
      // A run: consecutive blocks, up to RUN_BYTES.
      let j = i + 1;
      while (j < dirty.length && dirty[j] === dirty[j - 1]! + 1 && (j - i + 1) * bs <= RUN_BYTES) j++;
      const count = j - i;
      const start = dirty[i]! * bs;
      const length = Math.min(count * bs, size - start);
      const run = buffer.subarray(0, count * bs);
      run.fill(0, length);
      // Blocks to compare with the parent: those over a range it does not map to nil (there it
      // reads zeros, which only a zero block equals, and zero blocks go nil anyway).
      const compare = new Array<boolean>(count).fill(false);
      let firstCompare = -1;
      let lastCompare = -1;
      if (parent !== undefined && !parent.holdsNil(start, length)) {
        for (let k = 0; k < count; k++) {
          const blockStart = start + k * bs;
          if (parent.holdsNil(blockStart, Math.min(bs, size - blockStart))) continue;
          compare[k] = true;
          if (firstCompare < 0) firstCompare = k;
          lastCompare = k;
        }
      }
      const reads = [source.readAt(run.subarray(0, length), start)];
      if (parent && parentBytes && firstCompare >= 0) {
        // One read of the parent for every block of the run that needs it, alongside the device's.
        const from = start + firstCompare * bs;
        const to = Math.min(start + (lastCompare + 1) * bs, size);
        parentBytes.fill(0, to - start, (lastCompare + 1) * bs);
        reads.push(parent.readAt(parentBytes.subarray(from - start, to - start), from));
      }
      await Promise.all(reads);
      const isZero = new Array<boolean>(count);
      for (let k = 0; k < count; k++) isZero[k] = run.subarray(k * bs, (k + 1) * bs).equals(zeroBlock);
      // Keep only blocks that are neither zero nor the parent's, packed, so the diff holds no others.
      let packed = 0;
      for (let k = 0; k < count; k++) {
        const block = run.subarray(k * bs, (k + 1) * bs);
        if (isZero[k]) {
          zero.push(dirty[i + k]!);
          continue;
        }
        if (compare[k] && block.equals(parentBytes!.subarray(k * bs, (k + 1) * bs))) {
          deduped++;
          continue;
        }
        if (packed !== k) block.copy(run, packed * bs);
        packed++;
        stored.push(dirty[i + k]!);
      }
      if (packed > 0) {
        await file.write(run, 0, packed * bs, diffSize);
        diffSize += packed * bs;
      }
      i = j;
    }
    await file.sync();
  } finally {
    await file.close();
  }
  // A block is written or zeroed, never both: the two lists do not overlap.
  const zeroBlocks = zero.sort((a, b) => a - b);
  const data = createMappings(stored, bs, buildId, size);
  const nil = createMappings(zeroBlocks, bs, NIL_UUID, size).map((m) => ({ ...m, buildStorageOffset: 0 }));
  const mappings = normalizeMappings([...data, ...nil].sort((a, b) => a.offset - b.offset));
  return { mappings, diffSize, storedBlocks: stored.length, zeroBlocks: zeroBlocks.length, dedupedBlocks: deduped };
}
