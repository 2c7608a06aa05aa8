import type { Logger } from '#logging';
import type { ServeEngine } from '#native';
import { BuildStore, type PrefetchSet } from '#storage';

export interface RecordedPrefetchOptions {
  /** Record granularity: the memfile header's block size (the page size for a plain memory file). */
  blockSize: number;
  memorySize: number;
  /**
   * Recording ends this long after serving starts unless the orchestrator ends it sooner (when
   * envd answers). 0: nothing is recorded.
   */
  recordMs: number;
  /** The build's recorded set, checked against blockSize and memorySize by the caller: copied in first. */
  set: PrefetchSet | undefined;
  logger: Logger;
}

export interface RecordedPrefetchStats {
  recording: boolean;
  /** Blocks recorded so far (the set the next pause or checkpoint stores). */
  recordedBlocks: number;
  /** Blocks of the build's set the pass copies in. */
  setBlocks: number;
  /** Faults served while recording: the start's faults that went through the fault path. */
  startFaults: number;
  /** 4 KiB units the pass installed: the set's blocks, then the rest of their windows. */
  passPages4k: number;
  /** Set blocks already present when the pass came (a fault, or a fault's window, was first). */
  passAlreadyPresent: number;
  passDone: number;
}

/**
 * Recorded prefetch of one sandbox (issue 15; E2B records at checkpoint): the blocks a resumed
 * sandbox faults while it starts are recorded in first-fault order, and stored with the next
 * build this sandbox is paused or checkpointed into (`memfile.prefetch`); a sandbox resumed from a
 * build that has a set gets those blocks copied in by the engine's prefetch pass, in that order,
 * while its faults are served (faults always win).
 *
 * A sandbox resumed with a set records again, so the set follows the workload: the pages the pass
 * installs are recorded too (the guest's reads of them are invisible to userfaultfd, so a page
 * cannot be dropped for not being touched), set entries the pass had not reached when recording
 * ended are kept after them, and the new faults (what the set missed) are added where they came.
 * The set grows with the workload; it never shrinks (bounded by the recording window).
 */
export class RecordedPrefetch {
  private readonly o: RecordedPrefetchOptions;
  private engine: ServeEngine | undefined;
  private timer: NodeJS.Timeout | undefined;
  private recorded: Uint32Array | undefined;
  private recordingNow = false;
  private final: Pick<RecordedPrefetchStats, 'startFaults' | 'passPages4k' | 'passAlreadyPresent' | 'passDone'> = {
    startFaults: 0,
    passPages4k: 0,
    passAlreadyPresent: 0,
    passDone: 0,
  };

  constructor(options: RecordedPrefetchOptions) {
    this.o = options;
  }

  /** The build's recorded set being copied in (undefined: none). */
  get set(): RecordedPrefetchOptions['set'] {
    return this.o.set;
  }

  /** The engine's record block size, or undefined when nothing is recorded. */
  get recordBlockSize(): number | undefined {
    return this.o.recordMs > 0 ? this.o.blockSize : undefined;
  }

  /** Serving started (engine created with `recordBlockSize` and started): the pass and the bound begin. */
  attach(engine: ServeEngine): void {
    this.engine = engine;
    if (this.o.set && this.o.set.blocks.length > 0) {
      engine.startPrefetch(Uint32Array.from(this.o.set.blocks), this.o.set.blockSize);
      this.o.logger.info(
        { setBlocks: this.o.set.blocks.length, blockSize: this.o.set.blockSize },
        'recorded prefetch: copying the build’s set in',
      );
    }
    if (this.recordBlockSize !== undefined) {
      this.recordingNow = true;
      this.timer = setTimeout(() => this.stopRecording('bound reached'), this.o.recordMs);
      this.timer.unref();
    }
  }

  /** Ends recording (envd answered, the bound passed, or the VM paused); idempotent. */
  stopRecording(reason: string): RecordedPrefetchStats {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
    if (this.recordingNow && this.engine) {
      this.engine.stopRecording();
      this.recorded = this.engine.recorded();
      this.recordingNow = false;
      const s = this.stats();
      this.o.logger.info(
        { reason, recordedBlocks: s.recordedBlocks, startFaults: s.startFaults, passPages4k: s.passPages4k },
        'recorded prefetch: recording ended',
      );
    }
    return this.stats();
  }

  /** Serving ends (the engine goes): keep what was recorded and the counts. */
  detach(): void {
    if (this.recordingNow) this.stopRecording('serving ended');
    if (this.engine) this.final = this.engineCounts(this.engine);
    this.engine = undefined;
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /**
   * The set to store with the next build: recorded blocks in order, then the entries of the set
   * this sandbox was prefetched from that the pass had not reached. Undefined when nothing was
   * recorded and there was no set (recording off, or a sandbox taken back after a restart).
   */
  setToStore(): PrefetchSet | undefined {
    const recorded = this.recordingNow && this.engine ? this.engine.recorded() : this.recorded;
    if (recorded === undefined && !this.o.set) return undefined;
    const blocks = Array.from(recorded ?? []);
    const seen = new Set(blocks);
    for (const b of this.o.set?.blocks ?? []) if (!seen.has(b)) blocks.push(b);
    if (blocks.length === 0) return undefined;
    return { blockSize: this.o.blockSize, size: this.o.memorySize, blocks };
  }

  /** Writes `setToStore()` at `path` (a staged build's memfile.prefetch); returns the blocks written (0: none). */
  async writeTo(path: string): Promise<number> {
    const set = this.setToStore();
    if (!set) return 0;
    await BuildStore.writePrefetch(path, set);
    return set.blocks.length;
  }

  stats(): RecordedPrefetchStats {
    const counts = this.engine ? this.engineCounts(this.engine) : this.final;
    const recorded = this.recordingNow && this.engine ? this.engine.recordedCount() : (this.recorded?.length ?? 0);
    return {
      recording: this.recordingNow,
      recordedBlocks: recorded,
      setBlocks: this.o.set?.blocks.length ?? 0,
      ...counts,
    };
  }

  private engineCounts(engine: ServeEngine) {
    const s = engine.stats();
    return {
      startFaults: s.recordFaults,
      passPages4k: s.passPages4k,
      passAlreadyPresent: s.passAlreadyPresent,
      passDone: s.passDone,
    };
  }
}
