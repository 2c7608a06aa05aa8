import type { ReadableBlocks } from './block-source.js';
import { NIL_UUID } from './build-id.js';
import type { CachedFile } from './cached-file.js';
import type { Header } from './header-codec.js';
import { type BuildMapping, mappingIndexAt, validateMappings } from './mappings.js';
import { StorageClosed } from './storage-errors.js';

/**
 * Returns the data file of one build (usually through the build cache, which refreshes the
 * entry's TTL on every call, so it is asked per read rather than remembered here).
 */
export type BuildResolver = (buildId: string) => ReadableBlocks | Promise<ReadableBlocks>;

/** One piece of a virtual range: `length` bytes at virtual `offset` come from `buildId` at `storageOffset`. */
export interface ReadSpan {
  offset: number;
  length: number;
  buildId: string;
  storageOffset: number;
  /** True for the nil UUID: the bytes are zeros and nothing is stored. */
  zero: boolean;
}

/** A span with the file it is read from, for a consumer that maps the layers' files. */
export interface MappedSpan extends ReadSpan {
  /** The layer's data file (undefined for zeros). Kept: ensure on it, not on a newer one. */
  file: CachedFile | undefined;
}

export interface LayeredFileOptions {
  header: Header;
  resolve: BuildResolver;
}

/**
 * A build's virtual file (memfile or rootfs) read through its header's mappings: each piece
 * of a read goes to the build that holds it, the nil UUID reads as zeros.
 */
export class LayeredFile implements ReadableBlocks {
  readonly header: Header;
  readonly size: number;
  readonly blockSize: number;
  private readonly mappings: readonly BuildMapping[];
  private readonly resolve: BuildResolver;
  private closed = false;

  constructor(options: LayeredFileOptions) {
    const { metadata, mappings } = options.header;
    validateMappings(mappings, metadata.size, metadata.blockSize);
    this.header = options.header;
    this.size = metadata.size;
    this.blockSize = metadata.blockSize;
    this.mappings = mappings;
    this.resolve = options.resolve;
  }

  /** Which (build, storage offset, length) pieces `[offset, offset + length)` maps to, in order. */
  readSpans(offset: number, length: number): ReadSpan[] {
    checkRange(offset, length, this.size);
    const spans: ReadSpan[] = [];
    if (length === 0) return spans;
    let i = mappingIndexAt(this.mappings, offset);
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const m = this.mappings[i++]!;
      const take = Math.min(end, m.offset + m.length) - pos;
      const zero = m.buildId === NIL_UUID;
      spans.push({
        offset: pos,
        length: take,
        buildId: m.buildId,
        storageOffset: zero ? 0 : m.buildStorageOffset + (pos - m.offset),
        zero,
      });
      pos += take;
    }
    return spans;
  }

  /**
   * Every span of the file with its layer's mappable file, for a consumer that maps the files
   * at their offsets and copies from the mapping (the uffd engine). Needs a resolver that
   * returns CachedFiles (BuildStore's does). The consumer ensures ranges on these very files:
   * one the build cache closed meanwhile fails (StorageClosed) instead of filling a new file
   * the mapping does not see.
   */
  async mappedSpans(): Promise<MappedSpan[]> {
    if (this.closed) throw new StorageClosed('layered file');
    const spans = this.readSpans(0, this.size);
    const files = new Map<string, Promise<CachedFile>>();
    const out: MappedSpan[] = [];
    for (const span of spans) {
      if (span.zero) {
        out.push({ ...span, file: undefined });
        continue;
      }
      let file = files.get(span.buildId);
      if (file === undefined) {
        file = Promise.resolve(this.resolve(span.buildId)).then((f) => {
          if (!('ensure' in f)) throw new TypeError(`build ${span.buildId}: its data file cannot be mapped`);
          return f as CachedFile;
        });
        files.set(span.buildId, file);
      }
      out.push({ ...span, file: await file });
    }
    return out;
  }

  /**
   * Fetches virtual ranges ahead of their readers (the build's recorded prefetch set, in the
   * order given): each piece goes to the layer that holds it, zeros and complete layers cost
   * nothing. Resolves when every piece arrived or failed; failures are counted, never thrown
   * (a reader that needs the bytes fetches them again and fails on its own).
   */
  async prefetch(
    ranges: ReadonlyArray<{ offset: number; length: number }>,
  ): Promise<{ chunks: number; failed: number }> {
    if (this.closed) throw new StorageClosed('layered file');
    const byBuild = new Map<string, Array<{ offset: number; length: number }>>();
    for (const r of ranges) {
      for (const span of this.readSpans(r.offset, r.length)) {
        if (span.zero) continue;
        let list = byBuild.get(span.buildId);
        if (list === undefined) byBuild.set(span.buildId, (list = []));
        list.push({ offset: span.storageOffset, length: span.length });
      }
    }
    const results = await Promise.all(
      [...byBuild].map(async ([buildId, list]) => {
        const file = await this.resolve(buildId);
        const prefetch = (file as Partial<CachedFile>).prefetch;
        return prefetch === undefined ? { chunks: 0, failed: 0 } : prefetch.call(file, list);
      }),
    );
    return results.reduce((a, b) => ({ chunks: a.chunks + b.chunks, failed: a.failed + b.failed }), {
      chunks: 0,
      failed: 0,
    });
  }

  async readAt(target: Uint8Array, offset: number): Promise<void> {
    if (this.closed) throw new StorageClosed('layered file');
    checkRange(offset, target.length, this.size);
    if (target.length === 0) return;
    // Most reads (a page fault, a 4 KiB NBD request) fall inside one mapping: no span list.
    const m = this.mappings[mappingIndexAt(this.mappings, offset)]!;
    if (offset + target.length <= m.offset + m.length) {
      if (m.buildId === NIL_UUID) target.fill(0);
      else await this.readFrom(m.buildId, target, m.buildStorageOffset + (offset - m.offset));
      return;
    }
    const spans = this.readSpans(offset, target.length);
    await Promise.all(
      spans.map(async (span) => {
        const piece = target.subarray(span.offset - offset, span.offset - offset + span.length);
        if (span.zero) piece.fill(0);
        else await this.readFrom(span.buildId, piece, span.storageOffset);
      }),
    );
  }

  private async readFrom(buildId: string, piece: Uint8Array, storageOffset: number): Promise<void> {
    const source = await this.resolve(buildId);
    try {
      await source.readAt(piece, storageOffset);
    } catch (err) {
      // The build cache may have evicted and closed that source between resolve and read;
      // resolving again opens it anew.
      if (!(err instanceof StorageClosed) || this.closed) throw err;
      const again = await this.resolve(buildId);
      await again.readAt(piece, storageOffset);
    }
  }

  /** The build sources belong to whoever resolves them (the build cache); nothing to release here. */
  async close(): Promise<void> {
    this.closed = true;
  }
}

function checkRange(offset: number, length: number, size: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeError(`invalid range: offset ${offset}, length ${length}`);
  }
  if (offset + length > size) throw new RangeError(`range [${offset}, ${offset + length}) passes the size ${size}`);
}
