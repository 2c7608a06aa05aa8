import { LayeredFile, type ReadableBlocks } from '#storage';

/**
 * What the new build's parent holds, for deduplicating an export (E2B's block/dedup.go): its
 * bytes, read through its own layers, and where its header maps the nil UUID, so a dirty
 * block over a nil range is told apart by its zero-ness alone instead of a read and compare.
 */
export interface ExportParent {
  /** The parent's build id ('' for a plain image). */
  readonly buildId: string;
  readAt(target: Uint8Array, offset: number): Promise<void>;
  /** True when the parent maps all of `[offset, offset + length)` to nil (zeros, nothing stored). */
  holdsNil(offset: number, length: number): boolean;
}

/** The parent as `blocks` reads it: a layered build file knows its nil ranges, a plain image has none. */
export function exportParent(buildId: string, blocks: ReadableBlocks): ExportParent {
  const layered = blocks instanceof LayeredFile ? blocks : undefined;
  return {
    buildId,
    readAt: (target, offset) => blocks.readAt(target, offset),
    holdsNil: (offset, length) => layered !== undefined && layered.readSpans(offset, length).every((span) => span.zero),
  };
}
