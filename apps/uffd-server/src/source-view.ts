import { closeSync, fstatSync, openSync } from 'node:fs';
import type { CachedFile, LayeredFile, RetryObserver } from '#storage';
import {
  copyFromAddress,
  MAP_FIXED,
  MAP_PRIVATE,
  MAP_NORESERVE,
  mapAnonymous,
  mmap,
  munmap,
  PROT_READ,
  PROT_WRITE,
} from '#native';
import { SourceInvalid } from './uffd-server-errors.js';

/** What the view maps: a layer's file, or zeros (no file). */
type MappedFile = Pick<CachedFile, 'path' | 'complete' | 'ensure' | 'fetchUnit' | 'prefetch' | 'isPresent'>;

/** One piece of the memory file: `length` bytes at `offset` come from `file` at `fileOffset`. */
export interface SourceSegment {
  offset: number;
  length: number;
  file: MappedFile | undefined;
  fileOffset: number;
}

const PAGE = 4096;

/**
 * The memory file laid out at its own offsets in our address space, so the fault engine can
 * UFFDIO_COPY straight from it: each layer's file (LayeredFile.mappedSpans: a local build, or a
 * chunk cache's sparse file) is mmapped in place, nil ranges stay anonymous zeros. A range of a
 * file that is not complete is valid once `ensure` filled it (the layer below retries).
 */
export class SourceView {
  readonly address: number;
  readonly size: number;
  private readonly mappedLength: number;
  private readonly segments: SourceSegment[];
  private closed = false;
  /** Holders of the view (sandboxes of one build share it): unmapped when the last one closes it. */
  private holders = 1;
  private readonly unmapped: Array<() => void> = [];

  private constructor(address: number, size: number, mappedLength: number, segments: SourceSegment[]) {
    this.address = address;
    this.size = size;
    this.mappedLength = mappedLength;
    this.segments = segments;
  }

  /** The view of a build's memory file. */
  static async ofLayers(file: LayeredFile): Promise<SourceView> {
    const spans = await file.mappedSpans();
    return SourceView.open(
      file.size,
      spans.map((s) => ({ offset: s.offset, length: s.length, file: s.file, fileOffset: s.storageOffset })),
    );
  }

  /** A whole local file, complete. */
  static ofFile(path: string): SourceView {
    const fd = openSync(path, 'r');
    let size: number;
    try {
      size = fstatSync(fd).size;
    } finally {
      closeSync(fd);
    }
    if (size === 0 || size % PAGE) throw new SourceInvalid(path, `size ${size} is not a positive multiple of 4096`);
    const file: MappedFile = { path, complete: true, ensure: async () => undefined };
    return SourceView.open(size, [{ offset: 0, length: size, file, fileOffset: 0 }]);
  }

  /** Maps the segments (which must tile [0, size) in order, 4 KiB-aligned). Throws SourceInvalid. */
  static open(size: number, segments: SourceSegment[]): SourceView {
    if (!Number.isSafeInteger(size) || size <= 0) throw new SourceInvalid('memory file', `size ${size}`);
    let cursor = 0;
    for (const s of segments) {
      if (s.offset !== cursor || s.length <= 0)
        throw new SourceInvalid('memory layers', `segment at ${s.offset} does not follow ${cursor}`);
      if (s.offset % PAGE) throw new SourceInvalid('memory layers', `segment at ${s.offset} is not 4 KiB-aligned`);
      if (s.file && s.fileOffset % PAGE)
        throw new SourceInvalid(s.file.path, `storage offset ${s.fileOffset} is not 4 KiB-aligned`);
      cursor += s.length;
    }
    if (cursor !== size) throw new SourceInvalid('memory layers', `segments cover ${cursor} of ${size} bytes`);
    const mappedLength = Math.ceil(size / PAGE) * PAGE;
    const address = mapAnonymous(mappedLength, PROT_READ | PROT_WRITE, MAP_NORESERVE);
    try {
      for (const s of segments) {
        if (!s.file) continue;
        const fd = openSync(s.file.path, 'r');
        try {
          const fileSize = fstatSync(fd).size;
          if (fileSize < s.fileOffset + s.length)
            throw new SourceInvalid(
              s.file.path,
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

  /** The smallest unit a layer still fetches from the bucket (undefined: nothing is fetched). */
  get fetchUnit(): number | undefined {
    let unit: number | undefined;
    for (const s of this.segments)
      if (s.file && !s.file.complete && s.file.fetchUnit !== undefined)
        unit = Math.min(unit ?? Infinity, s.file.fetchUnit);
    return unit;
  }

  /** True when every byte is valid now (no fetches needed). */
  get allReady(): boolean {
    return this.segments.every((s) => !s.file || s.file.complete);
  }

  /** Ranges that are valid from the start (zeros and complete files). */
  readyRanges(): Array<{ offset: number; length: number }> {
    return this.segments
      .filter((s) => !s.file || s.file.complete)
      .map((s) => ({ offset: s.offset, length: Math.ceil(s.length / PAGE) * PAGE }));
  }

  /**
   * Makes [offset, offset+length) valid in the view, on the very files that are mapped: a
   * file the build cache closed meanwhile fails (StorageClosed), never fills a new file the
   * mapping does not see.
   */
  async ensure(offset: number, length: number, onRetry?: RetryObserver): Promise<void> {
    if (this.closed) throw new SourceInvalid('source view', 'closed');
    const end = Math.min(this.size, offset + length);
    const work: Promise<void>[] = [];
    for (const s of this.segments) {
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.length);
      if (from < to && s.file && !s.file.complete)
        work.push(s.file.ensure(s.fileOffset + (from - s.offset), to - from, onRetry));
    }
    await Promise.all(work);
  }

  /** True when [offset, offset+length) is valid now (zeros, complete files, chunks already fetched). */
  isReady(offset: number, length: number): boolean {
    if (this.closed) return false;
    const end = Math.min(this.size, offset + length);
    for (const s of this.segments) {
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.length);
      if (from >= to || !s.file || s.file.complete) continue;
      if (!s.file.isPresent?.(s.fileOffset + (from - s.offset), to - from)) return false;
    }
    return true;
  }

  /**
   * Resolves true once [offset, offset+length) is valid, fetched at the prefetch set's priority
   * (behind what faults wait for) where a layer can; false when a fetch failed (left to the
   * faults, which fetch again). Never throws.
   */
  async whenPrefetched(offset: number, length: number): Promise<boolean> {
    if (this.closed) return false;
    const end = Math.min(this.size, offset + length);
    const work: Promise<boolean>[] = [];
    for (const s of this.segments) {
      const from = Math.max(offset, s.offset);
      const to = Math.min(end, s.offset + s.length);
      if (from >= to || !s.file || s.file.complete) continue;
      const range = { offset: s.fileOffset + (from - s.offset), length: to - from };
      work.push(
        s.file.prefetch
          ? s.file.prefetch([range]).then((r) => r.failed === 0)
          : s.file.ensure(range.offset, range.length).then(() => true),
      );
    }
    const done = await Promise.allSettled(work);
    return done.every((d) => d.status === 'fulfilled' && d.value);
  }

  /** What the build holds at `offset` (fetched first when not here yet), into `into`. */
  async read(offset: number, into: Uint8Array): Promise<void> {
    if (offset < 0 || offset + into.length > this.size) {
      throw new RangeError(`[${offset}, ${offset + into.length}) is outside the memory file (${this.size} bytes)`);
    }
    await this.ensure(offset, into.length);
    copyFromAddress(into, this.address + offset, into.length);
  }

  /** True once unmapped (the last holder closed it). */
  get isClosed(): boolean {
    return this.closed;
  }

  /** One more holder of the view; each holder closes it once. Throws when it is unmapped already. */
  retain(): this {
    if (this.closed) throw new SourceInvalid('source view', 'closed');
    this.holders++;
    return this;
  }

  /** Called once the view is unmapped. */
  onUnmapped(listener: () => void): void {
    this.unmapped.push(listener);
  }

  /**
   * Gives up one holder's share (its engine must be stopped first); the last one unmaps the
   * view. Once unmapped, idempotent.
   */
  close(): void {
    if (this.closed) return;
    if (--this.holders > 0) return;
    this.closed = true;
    munmap(this.address, this.mappedLength);
    for (const listener of this.unmapped) listener();
  }
}
