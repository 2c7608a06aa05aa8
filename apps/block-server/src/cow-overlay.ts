import { constants, fstatSync, ftruncateSync, mkdirSync, write } from 'node:fs';
import { open, rm, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { DirtyBitmap, type ReadableBlocks, type WritableBlocks } from '#storage';
import { OverlayStateInvalid } from './block-errors.js';
import { readIfPresent, writeAtomically, writeDurably } from './durable-file.js';
import { readFully, readFullySync } from './image-file.js';
import type { BlockCapabilities } from './nbd-export.js';
import { OverlayJournal, type BlockChange, type BlockState } from './overlay-journal.js';
import { decodeOverlayState, encodeOverlayState, type OverlayState } from './overlay-state.js';

export interface CowOverlayOptions {
  /** What untouched blocks read from. Never written to. */
  base: ReadableBlocks;
  /** Directory holding `overlay.img` (sparse) and `overlay.state` (block maps). */
  dir: string;
  blockSize?: number;
  /**
   * What the overlay sits on (e.g. the build id). Stored in the state file; reopening over a
   * different base is refused instead of serving one base's blocks over another.
   */
  identity?: string;
  /** Read the overlay file synchronously (see ImageFile.open). */
  syncReads?: boolean;
}

const STATE_FILE = 'overlay.state';
const JOURNAL_FILE = 'overlay.journal';
/** Past this the journal is folded into a new snapshot. */
const JOURNAL_MAX_BYTES = 4 * 1024 * 1024;
const DATA_FILE = 'overlay.img';

/**
 * Copy-on-write overlay: written blocks live in a sparse local file the size of the device,
 * untouched blocks read from the base, and TRIM / WRITE_ZEROES only flip a block to "zero"
 * (nothing stored). Which blocks are written or zero is kept in two bitmaps, written to
 * `overlay.state` atomically on flush after the data file is synced, so after a crash the
 * overlay reopens exactly as of the last completed flush (plus possibly later writes).
 *
 * Writes that cover only part of a block the overlay does not hold yet are read-modify-write
 * of the whole block; those are serialised per block so two sector writes into one fresh
 * block cannot undo each other.
 *
 * The two maps are the device's only record of what changed since it was opened over its
 * build: the dirty-block export reads them. Callers pass ranges inside the device (the NBD
 * edge checks them).
 */
export class CowOverlay implements WritableBlocks {
  readonly size: number;
  readonly blockSize: number;
  readonly dir: string;
  /** Blocks whose bytes are in the overlay file. */
  readonly written: DirtyBitmap;
  /** Blocks that read as zeros (trimmed or zero-written) without stored data. */
  readonly zeroed: DirtyBitmap;
  /** Blocks written or zeroed during a checkpoint's export: its tracked set if it commits. */
  private pending: DirtyBitmap | undefined;
  /** The next flush writes a snapshot (the checkpoint changed), not a journal record. */
  private snapshotDue = false;
  private readonly base: ReadableBlocks;
  private readonly syncReads: boolean;
  /** The data file's fd: reads and writes use the callback API on it (FileHandle costs more per call). */
  private readonly fd: number;
  private readonly blockLocks = new Map<number, Promise<void>>();
  /** Blocks whose state changed since the last flush made the maps durable. */
  private changed = new Set<number>();
  private queuedFlush: Promise<void> | undefined;
  private runningFlush: Promise<void> | undefined;
  private closed = false;

  private constructor(
    options: Required<CowOverlayOptions>,
    private readonly file: FileHandle,
    /** What `overlay.state` holds; its maps are `written` and `zeroed`. */
    private readonly state: OverlayState,
    private readonly journal: OverlayJournal,
  ) {
    ({ base: this.base, dir: this.dir, syncReads: this.syncReads } = options);
    ({ size: this.size, blockSize: this.blockSize, written: this.written, zeroed: this.zeroed } = state);
    this.fd = file.fd;
  }

  /** The build of the last committed checkpoint ('' = none): durable, survives a restart. */
  get checkpoint(): string {
    return this.state.checkpoint;
  }

  /** Blocks written or zeroed since that checkpoint (durable as of the last flush). */
  get tracked(): DirtyBitmap {
    return this.state.tracked;
  }

  /** Creates the overlay, or reopens the one a previous run left in `dir`. */
  static async open(options: CowOverlayOptions): Promise<CowOverlay> {
    const full: Required<CowOverlayOptions> = { blockSize: 4096, identity: '', syncReads: false, ...options };
    if (!Number.isSafeInteger(full.blockSize) || full.blockSize <= 0 || full.blockSize % 512 !== 0) {
      throw new RangeError(`block size ${full.blockSize} must be a positive multiple of 512`);
    }
    // The directory and the small state files are made and read on the event loop (see
    // writeAtomically): a new device's open is on every create's path, and each step through
    // the libuv pool costs a turn of the loop. Only the two files kept open go through it.
    mkdirSync(full.dir, { recursive: true, mode: 0o700 });
    const blocks = Math.ceil(full.base.size / full.blockSize);
    const statePath = join(full.dir, STATE_FILE);
    const saved = readIfPresent(statePath);
    const expected = { blockSize: full.blockSize, size: full.base.size, identity: full.identity };
    const state: OverlayState = saved
      ? decodeOverlayState(saved, statePath, expected)
      : {
          ...expected,
          written: new DirtyBitmap(blocks),
          zeroed: new DirtyBitmap(blocks),
          generation: 0,
          checkpoint: '',
          tracked: new DirtyBitmap(blocks),
        };
    // A new overlay gets its snapshot at once, so size and base identity are checked on every
    // reopen; nothing in it is a flush's promise yet, so a process-crash-safe write is enough.
    if (!saved) writeAtomically(statePath, encodeOverlayState(state));

    // The data file and the journal are opened at once (one turn of the pool, not two).
    const [opened, journaled] = await Promise.allSettled([
      open(join(full.dir, DATA_FILE), constants.O_RDWR | constants.O_CREAT, 0o600),
      OverlayJournal.open(join(full.dir, JOURNAL_FILE), state),
    ]);
    if (opened.status === 'rejected' || journaled.status === 'rejected') {
      if (opened.status === 'fulfilled') await opened.value.close();
      if (journaled.status === 'fulfilled') await journaled.value.close();
      throw opened.status === 'rejected' ? opened.reason : (journaled as PromiseRejectedResult).reason;
    }
    const file = opened.value;
    try {
      const current = fstatSync(file.fd).size;
      if (saved && current !== full.base.size) {
        throw new OverlayStateInvalid(statePath, `data file is ${current} bytes, state says ${full.base.size}`);
      }
      // Truncating to the device size makes the file sparse: only written blocks take disk.
      if (current !== full.base.size) ftruncateSync(file.fd, full.base.size);
      return new CowOverlay(full, file, state, journaled.value);
    } catch (err) {
      await Promise.all([file.close(), journaled.value.close()]);
      throw err;
    }
  }

  /**
   * Like nbdkit's cow filter, whatever the base can do: writes, trim, flush, FUA (a flush after
   * the write) and multi-conn, because every connection shares this one overlay, so a flush on
   * any of them makes every acknowledged write durable. Zero too (nbdkit's filter emulates it
   * with writes; here whole blocks flip to zero without storing anything).
   */
  capabilities(): BlockCapabilities {
    return { write: true, flush: true, trim: true, zero: true, fua: true, multiConn: true };
  }

  readAt(target: Uint8Array, offset: number): Promise<void> {
    // Not async: on the hot path a read served from one run returns that run's promise as is.
    if (this.closed) return Promise.reject(this.closedError());
    if (target.length === 0) return Promise.resolve();
    const bs = this.blockSize;
    const end = offset + target.length;
    const reads: Promise<void>[] = [];
    // Consecutive blocks with the same source become one read.
    let runStart = offset;
    let runKind = this.kindOf(Math.floor(offset / bs));
    for (let block = Math.floor(offset / bs) + 1; block * bs < end; block++) {
      const kind = this.kindOf(block);
      if (kind === runKind) continue;
      reads.push(this.readRun(runKind, target.subarray(runStart - offset, block * bs - offset), runStart));
      runStart = block * bs;
      runKind = kind;
    }
    const last = this.readRun(runKind, target.subarray(runStart - offset), runStart);
    if (reads.length === 0) return last;
    reads.push(last);
    return Promise.all(reads).then(() => undefined);
  }

  async writeAt(source: Uint8Array, offset: number): Promise<void> {
    if (this.closed) throw this.closedError();
    if (source.length === 0) return;
    const bs = this.blockSize;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + source.length - 1) / bs);
    const edges = [first, last].filter((b, i, all) => all.indexOf(b) === i && this.needsFill(b, offset, source.length));
    if (edges.length === 0) {
      await this.pwrite(source, offset);
      this.markWritten(first, last);
      return;
    }
    await this.withBlockLocks(edges, async () => {
      const alignedStart = first * bs;
      const alignedEnd = Math.min((last + 1) * bs, this.size);
      const merged = Buffer.allocUnsafe(alignedEnd - alignedStart);
      // Under the lock: another writer may have filled the block while we waited.
      await Promise.all(
        edges
          .filter((b) => !this.written.has(b))
          .map((b) => {
            const blockStart = b * bs;
            const piece = merged.subarray(
              blockStart - alignedStart,
              Math.min(blockStart + bs, this.size) - alignedStart,
            );
            return this.zeroed.has(b) ? piece.fill(0) : this.base.readAt(piece, blockStart);
          }),
      );
      merged.set(source, offset - alignedStart);
      // Edge blocks the overlay already holds keep their bytes outside the written range.
      const writeFrom = this.written.has(first) ? offset : alignedStart;
      const writeTo = this.written.has(last) ? offset + source.length : alignedEnd;
      await this.pwrite(merged.subarray(writeFrom - alignedStart, writeTo - alignedStart), writeFrom);
      this.markWritten(first, last);
    });
  }

  async zeroAt(offset: number, length: number): Promise<void> {
    if (this.closed) throw this.closedError();
    if (length === 0) return;
    const bs = this.blockSize;
    const end = offset + length;
    const firstFull = Math.ceil(offset / bs);
    // A last block cut short by the device end counts as whole when the range reaches the end.
    const endFull = end === this.size ? Math.ceil(end / bs) : Math.floor(end / bs);
    const partial: Array<[number, number]> = [];
    if (firstFull >= endFull) {
      partial.push([offset, end]);
    } else {
      if (offset < firstFull * bs) partial.push([offset, firstFull * bs]);
      if (endFull * bs < end) partial.push([endFull * bs, end]);
      for (let b = firstFull; b < endFull; b++) {
        this.track(b);
        this.zeroed.set(b);
        this.written.clear(b);
        this.changed.add(b);
      }
    }
    await Promise.all(partial.map(([from, to]) => this.writeAt(Buffer.alloc(to - from), from)));
  }

  /**
   * A checkpoint's export starts: blocks changed from now on are collected apart, to become the
   * tracked set if it commits. Until then the durable set stays what it was (a superset).
   */
  beginCheckpoint(): void {
    this.pending = new DirtyBitmap(this.written.blockCount);
  }

  /**
   * The checkpoint's export into `buildId` is written: from now on `tracked` holds only blocks
   * changed since it, and both are durable (a new snapshot) before this returns. A crash before
   * that reopens with the previous checkpoint and its larger set, which is still correct.
   */
  async commitCheckpoint(buildId: string): Promise<void> {
    if (!this.pending) throw new Error(`overlay ${this.dir}: no checkpoint begun`);
    if (!buildId) throw new RangeError('a checkpoint needs a build id');
    this.state.tracked = this.pending;
    this.state.checkpoint = buildId;
    this.pending = undefined;
    this.snapshotDue = true;
    await this.flush();
  }

  /** The checkpoint's export failed: the tracked set (which kept growing meanwhile) stands. */
  abandonCheckpoint(): void {
    this.pending = undefined;
  }

  /**
   * Makes every write completed before this call durable: fdatasync of the data file, then
   * the block maps to `overlay.state` (write, fsync, rename, fsync dir). Calls arriving while
   * one runs share the next run.
   */
  flush(): Promise<void> {
    if (this.closed) return Promise.reject(this.closedError());
    if (this.queuedFlush) return this.queuedFlush;
    const previous = this.runningFlush ?? Promise.resolve();
    const run: Promise<void> = previous
      .catch(() => undefined)
      .then(() => {
        this.queuedFlush = undefined;
        this.runningFlush = run;
        return this.syncOnce();
      })
      .finally(() => {
        if (this.runningFlush === run) this.runningFlush = undefined;
      });
    this.queuedFlush = run;
    return run;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    await (this.runningFlush ?? Promise.resolve()).catch(() => undefined);
    await (this.queuedFlush ?? Promise.resolve()).catch(() => undefined);
    this.closed = true;
    await this.journal.close();
    await this.file.close();
  }

  /** Closes and deletes the overlay's files (after export, or when the device is dropped). */
  async remove(): Promise<void> {
    await this.close();
    await rm(this.dir, { recursive: true, force: true });
  }

  /**
   * Data first (fdatasync), then the block states it depends on: appended to the journal when
   * few changed, else a new snapshot (write, fsync, rename) after which the journal restarts.
   */
  private async syncOnce(): Promise<void> {
    const blocks = [...this.changed];
    this.changed = new Set();
    const tracking = this.state.checkpoint !== '';
    const changes: BlockChange[] = blocks.map((b) =>
      tracking && this.state.tracked.has(b)
        ? [b, this.kindOf(b) as BlockState, true]
        : [b, this.kindOf(b) as BlockState],
    );
    const snapshotBytes = (this.written.blockCount / 8) * (tracking ? 3 : 2);
    const snapshotDue = this.snapshotDue;
    this.snapshotDue = false;
    const snapshot =
      snapshotDue || changes.length * 5 > snapshotBytes / 4 || this.journal.bytes > JOURNAL_MAX_BYTES
        ? encodeOverlayState({ ...this.state, generation: this.state.generation + 1 })
        : undefined;
    try {
      await this.file.datasync();
      if (snapshot) {
        await writeDurably(join(this.dir, STATE_FILE), snapshot);
        await this.journal.reset(++this.state.generation);
      } else if (changes.length > 0) {
        await this.journal.append(changes);
      }
    } catch (err) {
      // Not durable: the next flush must write these blocks' states again.
      for (const b of blocks) this.changed.add(b);
      if (snapshotDue) this.snapshotDue = true;
      throw err;
    }
  }

  private kindOf(block: number): 0 | 1 | 2 {
    if (this.written.has(block)) return 1;
    if (this.zeroed.has(block)) return 2;
    return 0;
  }

  private readRun(kind: 0 | 1 | 2, target: Uint8Array, offset: number): Promise<void> {
    if (kind === 1) return this.syncReads ? readFullySync(this.fd, target, offset) : readFully(this.fd, target, offset);
    if (kind === 2) {
      target.fill(0);
      return Promise.resolve();
    }
    return this.base.readAt(target, offset);
  }

  /** A block the write covers only in part, whose other bytes are not in the overlay yet. */
  private needsFill(block: number, offset: number, length: number): boolean {
    if (this.written.has(block)) return false;
    const blockStart = block * this.blockSize;
    const blockEnd = Math.min(blockStart + this.blockSize, this.size);
    return offset > blockStart || offset + length < blockEnd;
  }

  /** A block changed: into the set since the last checkpoint (journaled once), and a running checkpoint's. */
  private track(block: number): void {
    this.pending?.set(block);
    if (this.state.checkpoint === '' || this.state.tracked.has(block)) return;
    this.state.tracked.set(block);
    this.changed.add(block);
  }

  private markWritten(first: number, last: number): void {
    for (let b = first; b <= last; b++) {
      // A rewrite of a block already written changes no map but does change its bytes.
      this.track(b);
      if (!this.written.has(b)) {
        this.written.set(b);
        this.changed.add(b);
      }
      if (this.zeroed.has(b)) {
        this.zeroed.clear(b);
        this.changed.add(b);
      }
    }
  }

  private async withBlockLocks(blocks: number[], body: () => Promise<void>): Promise<void> {
    const sorted = [...blocks].sort((a, b) => a - b);
    const releases: Array<() => void> = [];
    try {
      for (const block of sorted) {
        while (this.blockLocks.has(block)) await this.blockLocks.get(block);
        let release!: () => void;
        this.blockLocks.set(block, new Promise<void>((resolve) => (release = resolve)));
        releases.push(() => {
          this.blockLocks.delete(block);
          release();
        });
      }
      await body();
    } finally {
      for (const release of releases) release();
    }
  }

  private pwrite(source: Uint8Array, offset: number): Promise<void> {
    return new Promise((resolve, reject) => {
      let done = 0;
      const step = (): void => {
        write(this.fd, source, done, source.length - done, offset + done, (err, n) => {
          if (err) return reject(err);
          done += n;
          if (done >= source.length) resolve();
          else step();
        });
      };
      step();
    });
  }

  private closedError(): Error {
    return new Error(`overlay ${this.dir} closed`);
  }
}
