import { closeSync, fstatSync, openSync } from 'node:fs';
import type { ReadableBlocks } from '#storage';
import {
  MAP_FIXED,
  MAP_PRIVATE,
  MAP_NORESERVE,
  mapAnonymous,
  memoryView,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from '#native';
import { SourceInvalid } from './uffd-server-errors.js';

/** Where one piece of the memory file's bytes comes from. */
export type SourceSegment =
  | { kind: 'zero'; offset: number; length: number }
  /** A local file, complete: mapped into the view, ready at once. */
  | { kind: 'file'; offset: number; length: number; path: string; fileOffset: number }
  /** A local file filled lazily (a chunk cache): mapped, ready once `ensure` resolved. */
  | {
      kind: 'cached';
      offset: number;
      length: number;
      path: string;
      fileOffset: number;
      ensure: (offset: number, length: number) => Promise<void>;
    }
  /** Anything else readable: copied into the view on first use. */
  | { kind: 'blocks'; offset: number; length: number; source: ReadableBlocks; sourceOffset: number };

const PAGE = 4096;

/**
 * The memory file laid out at its own offsets in our address space, so the fault engine can
 * UFFDIO_COPY straight from it: local layer files are mmapped in place (no copy through JS),
 * nil ranges stay anonymous zeros, other sources are fetched into the view on demand.
 */
export class SourceView {
  readonly address: number;
  readonly size: number;
  private readonly mappedLength: number;
  private readonly segments: SourceSegment[];
  private closed = false;

  private constructor(address: number, size: number, mappedLength: number, segments: SourceSegment[]) {
    this.address = address;
    this.size = size;
    this.mappedLength = mappedLength;
    this.segments = segments;
  }

  /** Maps the segments (which must tile [0, size) in order, 4 KiB-aligned). Throws SourceInvalid. */
  static open(size: number, segments: SourceSegment[]): SourceView {
    if (!Number.isSafeInteger(size) || size <= 0) throw new SourceInvalid('memory file', `size ${size}`);
    let cursor = 0;
    for (const s of segments) {
      if (s.offset !== cursor || s.length <= 0)
        throw new SourceInvalid('memory layers', `segment at ${s.offset} does not follow ${cursor}`);
      if (s.offset % PAGE) throw new SourceInvalid('memory layers', `segment at ${s.offset} is not 4 KiB-aligned`);
      if ((s.kind === 'file' || s.kind === 'cached') && s.fileOffset % PAGE)
        throw new SourceInvalid(s.path, `storage offset ${s.fileOffset} is not 4 KiB-aligned`);
      cursor += s.length;
    }
    if (cursor !== size) throw new SourceInvalid('memory layers', `segments cover ${cursor} of ${size} bytes`);
    const mappedLength = Math.ceil(size / PAGE) * PAGE;
    const address = mapAnonymous(mappedLength, PROT_READ | PROT_WRITE, MAP_NORESERVE);
    try {
      for (const s of segments) {
        if (s.kind !== 'file' && s.kind !== 'cached') continue;
        const fd = openSync(s.path, 'r');
        try {
          const fileSize = fstatSync(fd).size;
          if (fileSize < s.fileOffset + s.length)
            throw new SourceInvalid(
              s.path,
              `${fileSize} bytes, but bytes [${s.fileOffset}, ${s.fileOffset + s.length}) are mapped from it`,
            );
          mmap(
            address + s.offset,
            Math.ceil(s.length / PAGE) * PAGE,
            PROT_READ,
            MAP_PRIVATE | MAP_FIXED,
            fd,
            s.fileOffset,
          );
        } finally {
          closeSync(fd);
        }
      }
    } catch (err) {
      munmap(address, mappedLength);
      throw err;
    }
    return new SourceView(address, size, mappedLength, segments);
  }

  /** A whole local file. */
  static ofFile(path: string): SourceView {
    const fd = openSync(path, 'r');
    let size: number;
    try {
      size = fstatSync(fd).size;
    } finally {
      closeSync(fd);
    }
    if (size === 0 || size % PAGE) throw new SourceInvalid(path, `size ${size} is not a positive multiple of 4096`);
    return SourceView.open(size, [{ kind: 'file', offset: 0, length: size, path, fileOffset: 0 }]);
  }

  /** True when every byte is valid now (no fetches needed). */
  get allReady(): boolean {
    return this.segments.every((s) => s.kind === 'zero' || s.kind === 'file');
  }

  /** Ranges that are valid from the start (zero and local-file segments). */
  readyRanges(): Array<{ offset: number; length: number }> {
    return this.segments
      .filter((s) => s.kind === 'zero' || s.kind === 'file')
      .map((s) => ({ offset: s.offset, length: Math.ceil(s.length / PAGE) * PAGE }));
  }

  /** Makes [offset, offset+length) valid in the view (fetching through the layers' sources). */
  async ensure(offset: number, length: number): Promise<void> {
    const end = Math.min(this.size, offset + length);
    const work: Promise<void>[] = [];
    for (const s of this.segments) {
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.length);
      if (from >= to) continue;
      if (s.kind === 'cached') work.push(s.ensure(s.fileOffset + (from - s.offset), to - from));
      else if (s.kind === 'blocks') {
        if (this.closed) throw new SourceInvalid('source view', 'closed');
        work.push(s.source.readAt(memoryView(this.address + from, to - from), s.sourceOffset + (from - s.offset)));
      }
    }
    await Promise.all(work);
  }

  /** Unmaps the view (the engine must be stopped first). Idempotent. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    munmap(this.address, this.mappedLength);
  }
}
