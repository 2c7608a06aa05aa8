import { open } from 'node:fs/promises';
import { createMappings, NIL_UUID, normalizeMappings, type BuildMapping } from '#storage';
import type { CowOverlay } from './cow-overlay.js';

export interface ExportDiffOptions {
  /** The device: its block maps say what changed, its reads give the bytes. */
  source: Pick<CowOverlay, 'size' | 'blockSize' | 'written' | 'zeroed' | 'readAt'>;
  buildId: string;
  diffPath: string;
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
}

/** Largest run of consecutive blocks read and written in one go. */
const RUN_BYTES = 4 * 1024 * 1024;

/**
 * Writes the changed blocks to a diff file in ascending block order (DESIGN.md §2) and
 * returns their mappings to `buildId`. Blocks that are all zeros, written or trimmed, become
 * nil mappings instead of stored bytes. The file is fsynced before this returns.
 */
export async function exportDiff(options: ExportDiffOptions): Promise<ExportedDiff> {
  const { source, buildId } = options;
  const { size, blockSize: bs } = source;
  const dirty = [...source.written];
  const zero = new Set(source.zeroed);
  const stored: number[] = [];
  const file = await open(options.diffPath, 'w', 0o600);
  let diffSize = 0;
  try {
    const buffer = Buffer.alloc(RUN_BYTES);
    const zeroBlock = Buffer.alloc(bs);
    for (let i = 0; i < dirty.length;) {
      // A run: consecutive blocks, up to RUN_BYTES.
      let j = i + 1;
      while (j < dirty.length && dirty[j] === dirty[j - 1]! + 1 && (j - i + 1) * bs <= RUN_BYTES) j++;
      const start = dirty[i]! * bs;
      const length = Math.min((j - i) * bs, size - start);
      const run = buffer.subarray(0, (j - i) * bs);
      run.fill(0, length);
      await source.readAt(run.subarray(0, length), start);
      // Keep only non-zero blocks, packed, so the diff holds no zero pages.
      let packed = 0;
      for (let k = 0; k < j - i; k++) {
        const block = run.subarray(k * bs, (k + 1) * bs);
        if (block.equals(zeroBlock)) {
          zero.add(dirty[i + k]!);
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
  const storedSet = new Set(stored);
  const zeroBlocks = [...zero].filter((b) => !storedSet.has(b)).sort((a, b) => a - b);
  const data = createMappings(stored, bs, buildId, size);
  const nil = createMappings(zeroBlocks, bs, NIL_UUID, size).map((m) => ({ ...m, buildStorageOffset: 0 }));
  const mappings = normalizeMappings([...data, ...nil].sort((a, b) => a.offset - b.offset));
  return { mappings, diffSize, storedBlocks: stored.length, zeroBlocks: zeroBlocks.length };
}
