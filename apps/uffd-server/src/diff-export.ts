import { closeSync, openSync } from 'node:fs';
import { diffCopy, DiffPage, SourceEnded } from '#native';
import { createMappings, NIL_UUID, type BuildMapping } from '#storage';

/** Bytes of a paused guest's memory: the memfd Firecracker shared, or the memory file it wrote. */
export type MemoryBytes = { kind: 'fd'; fd: number } | { kind: 'path'; path: string };

/** The parent build's memory, mapped in this process at its own offsets (a SourceView). */
export interface ParentMemory {
  address: number;
  /** Makes [offset, offset + length) valid at `address + offset` (fetches what is not here yet). */
  ensure(offset: number, length: number): Promise<void>;
  /** True when every byte is valid already (nothing to fetch). */
  readonly allReady: boolean;
}

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
  parent?: ParentMemory;
}

export interface DiffExport {
  /** Pages stored in the diff → the new build; all-zero pages → the nil UUID. Sorted. */
  mappings: BuildMapping[];
  diffSize: number;
  storedPages: number;
  zeroPages: number;
  /** Pages equal to the parent's: left to it. */
  dedupedPages: number;
  /** CPU time of the copy (ms), apart from waiting on a loaded machine. */
  copyCpuMs: number;
}

/** Consecutive pages joined into byte ranges (the last one cut at the memory's end). */
export function pageRuns(
  pages: readonly number[],
  pageSize: number,
  memorySize: number,
): Array<{ offset: number; length: number }> {
  const runs: Array<{ offset: number; length: number }> = [];
  let previous = -1;
  for (const page of pages) {
    if (!Number.isSafeInteger(page) || page < 0) throw new RangeError(`page index invalid: ${page}`);
    if (page <= previous) throw new RangeError(`pages must ascend without repeats: ${page} after ${previous}`);
    const offset = page * pageSize;
    if (offset >= memorySize) throw new RangeError(`page ${page} lies past the memory size ${memorySize}`);
    const length = Math.min(pageSize, memorySize - offset);
    const last = runs[runs.length - 1];
    if (last && page === previous + 1) last.length += length;
    else runs.push({ offset, length });
    previous = page;
  }
  return runs;
}

/**
 * Writes the given pages to a diff file in ascending order and returns their mappings
 * (DESIGN.md §2-3): consecutive stored pages become one mapping to `buildId` at their place
 * in the diff; pages that are all zeros are not stored but mapped to the nil UUID; pages equal
 * to the parent's are neither. The bytes are read, compared and written by native code on a
 * worker thread (`diffCopy`: large sequential writes, nothing per clean page), then fsynced.
 */
export async function exportDiff(o: DiffExportOptions): Promise<DiffExport> {
  const runs = pageRuns(o.pages, o.pageSize, o.memorySize);
  // The parent's bytes are compared in place: what is not fetched yet is fetched first.
  if (o.parent && !o.parent.allReady) await Promise.all(runs.map((r) => o.parent!.ensure(r.offset, r.length)));
  const sourceFd = o.from.kind === 'path' ? openSync(o.from.path, 'r') : o.from.fd;
  let copied: Awaited<ReturnType<typeof diffCopy>>;
  try {
    const outFd = openSync(o.diffPath, 'w', 0o600);
    try {
      copied = await diffCopy({
        sourceFd,
        outFd,
        runs,
        pageSize: o.pageSize,
        parentAddress: o.parent?.address ?? 0,
        sync: true,
      });
    } finally {
      closeSync(outFd);
    }
  } catch (err) {
    if (err instanceof SourceEnded)
      throw new RangeError(`memory ends at ${err.endedAt}, before page ${Math.floor(err.endedAt / o.pageSize)}`, {
        cause: err,
      });
    throw err;
  } finally {
    if (o.from.kind === 'path') closeSync(sourceFd);
  }
  const stored: number[] = [];
  const zeros: number[] = [];
  const classes = copied.classes;
  for (let i = 0; i < o.pages.length; i++) {
    if (classes[i] === DiffPage.STORED) stored.push(o.pages[i]!);
    else if (classes[i] === DiffPage.ZERO) zeros.push(o.pages[i]!);
  }
  const mappings = [
    ...createMappings(stored, o.pageSize, o.buildId, o.memorySize),
    ...createMappings(zeros, o.pageSize, NIL_UUID, o.memorySize).map((m) => ({ ...m, buildStorageOffset: 0 })),
  ].sort((a, b) => a.offset - b.offset);
  return {
    mappings,
    diffSize: copied.bytesWritten,
    storedPages: copied.storedPages,
    zeroPages: copied.zeroPages,
    dedupedPages: copied.parentPages,
    copyCpuMs: copied.cpuMicros / 1000,
  };
}
