import { read as readCallback } from 'node:fs';
import { open } from 'node:fs/promises';
import { promisify } from 'node:util';
import { createMappings, NIL_UUID, type BuildMapping } from '#storage';

const readFd = promisify(readCallback);

/** Bytes of a paused guest's memory: the memfd Firecracker shared, or the memory file it wrote. */
export type MemoryBytes = { kind: 'fd'; fd: number } | { kind: 'path'; path: string };

export interface DiffExportOptions {
  /** Ascending indices of the pages to export (page = memory-file offset / pageSize). */
  pages: readonly number[];
  pageSize: number;
  memorySize: number;
  from: MemoryBytes;
  diffPath: string;
  buildId: string;
  /**
   * What the parent build holds (E2B's block/dedup.go): a page equal to it is neither stored nor
   * mapped, so the merged header keeps the parent's mapping for it. Only when the parent is the
   * build these bytes were served from.
   */
  parent?: (offset: number, into: Uint8Array) => Promise<void>;
}

export interface DiffExport {
  /** Pages stored in the diff → the new build; all-zero pages → the nil UUID. Sorted. */
  mappings: BuildMapping[];
  diffSize: number;
  storedPages: number;
  zeroPages: number;
  /** Pages equal to the parent's: left to it. */
  dedupedPages: number;
}

const RUN_BYTES = 16 * 1024 * 1024;

function isZero(bytes: Uint8Array): boolean {
  const words = new BigUint64Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 8);
  for (let i = 0; i < words.length; i++) if (words[i] !== 0n) return false;
  return true;
}

/**
 * Writes the given pages to a diff file in ascending order and returns their mappings
 * (DESIGN.md §2-3): consecutive stored pages become one mapping to `buildId` at their place
 * in the diff; pages that are all zeros are not stored but mapped to the nil UUID.
 */
export async function exportDiff(o: DiffExportOptions): Promise<DiffExport> {
  const source = o.from.kind === 'path' ? await open(o.from.path, 'r') : undefined;
  const out = await open(o.diffPath, 'w', 0o600);
  const stored: number[] = [];
  const zeros: number[] = [];
  let deduped = 0;
  let diffSize = 0;
  try {
    const buffer = Buffer.allocUnsafe(Math.max(RUN_BYTES, o.pageSize));
    const parentBytes = o.parent ? Buffer.allocUnsafe(buffer.length) : undefined;
    let i = 0;
    while (i < o.pages.length) {
      // A run of consecutive pages, read at once.
      const first = o.pages[i]!;
      let count = 1;
      while (
        i + count < o.pages.length &&
        o.pages[i + count] === first + count &&
        (count + 1) * o.pageSize <= buffer.length
      )
        count++;
      const offset = first * o.pageSize;
      const length = Math.min(count * o.pageSize, o.memorySize - offset);
      if (length <= 0) throw new RangeError(`page ${first} lies past the memory size ${o.memorySize}`);
      let done = 0;
      while (done < length) {
        const n = source
          ? (await source.read(buffer, done, length - done, offset + done)).bytesRead
          : (await readFd((o.from as { fd: number }).fd, buffer, done, length - done, offset + done)).bytesRead;
        if (n === 0)
          throw new RangeError(`memory ends at ${offset + done}, before page ${first + Math.floor(done / o.pageSize)}`);
        done += n;
      }
      if (o.parent && parentBytes) await o.parent(offset, parentBytes.subarray(0, length));
      // Stored pages of the run go out in one write.
      let pendingStart = -1;
      for (let k = 0; k <= count; k++) {
        const page = buffer.subarray(k * o.pageSize, Math.min((k + 1) * o.pageSize, length));
        const zero = k < count && isZero(page);
        const same =
          k < count &&
          !zero &&
          parentBytes !== undefined &&
          page.equals(parentBytes.subarray(k * o.pageSize, Math.min((k + 1) * o.pageSize, length)));
        if (same) deduped++;
        if (k < count && !zero && !same) {
          if (pendingStart < 0) pendingStart = k;
          stored.push(first + k);
          continue;
        }
        if (pendingStart >= 0) {
          const bytes = buffer.subarray(pendingStart * o.pageSize, Math.min(k * o.pageSize, length));
          await out.write(bytes, 0, bytes.length, diffSize);
          diffSize += bytes.length;
          pendingStart = -1;
        }
        if (zero) zeros.push(first + k);
      }
      i += count;
    }
    await out.sync();
  } finally {
    await out.close();
    await source?.close();
  }
  const mappings = [
    ...createMappings(stored, o.pageSize, o.buildId, o.memorySize),
    ...createMappings(zeros, o.pageSize, NIL_UUID, o.memorySize).map((m) => ({ ...m, buildStorageOffset: 0 })),
  ].sort((a, b) => a.offset - b.offset);
  return { mappings, diffSize, storedPages: stored.length, zeroPages: zeros.length, dedupedPages: deduped };
}
