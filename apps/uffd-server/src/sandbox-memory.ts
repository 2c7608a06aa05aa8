import { openSync, closeSync } from 'node:fs';
import type { Logger } from '#logging';
import {
  close,
  dataExtents,
  PageCategory,
  pagemapScan,
  pidfdOpen,
  PM_SCAN_CHECK_WPASYNC,
  SERVE_UNIT,
  ServeEngine,
  type ServeEngineStats,
  watchReadable,
} from '#native';
import { type GuestRegion, HandshakeInvalid } from '#uffd';
import type { BuildMapping } from '#storage';
import { exportDiff } from './diff-export.js';
import { HandshakeListener, type ReceivedHandshake } from './handshake-listener.js';
import type { SourceView } from './source-view.js';
import type { RecordedPrefetch, RecordedPrefetchStats } from './recorded-prefetch.js';
import { probeTracking, type TrackingMode } from './tracking-mode.js';
import { InvalidState } from './uffd-server-errors.js';

export type SandboxState = 'listening' | 'serving' | 'sourcing-stopped' | 'peer-gone' | 'failed' | 'stopped';

export interface SandboxMemoryOptions {
  sandboxId: string;
  socketPath: string;
  source: SourceView;
  /** Page size the handshake must use; undefined accepts 4 KiB or 2 MiB. */
  pageSize: number | undefined;
  /** The memory file's header block size: the page size must be a multiple (diff mappings stay block-aligned). */
  blockSize?: number;
  prefetchBytes: number;
  readaheadWindows: number;
  prefetchWithoutTracking: boolean;
  threads: number;
  /** > 0: served by one worker of the process's shared pool of this many threads instead of `threads` own ones. */
  poolThreads?: number;
  handshakeTimeoutMs: number | undefined;
  logger: Logger;
  /** Told when serving ends on its own (peer gone, failure): metrics, serve-file's exit. */
  onEnded?: (sandbox: SandboxMemory) => void;
  /** Told once faults are served after a handshake (what a restarted server needs is recorded then). */
  onServing?: (sandbox: SandboxMemory, hs: ReceivedHandshake, tracking: TrackingMode) => void;
  /** A handshake taken by an earlier uffd-server process (fds taken back from the VMM): serve at once. */
  adopted?: ReceivedHandshake;
  /** Recorded prefetch: the build's set copied in, the start's faults recorded (not for adopted sandboxes). */
  recordedPrefetch?: RecordedPrefetch;
}

/** One ExportDiff: where the diff goes, where the pages come from, and how it is taken. */
export interface DiffExportRequest {
  buildId: string;
  diffPath: string;
  /** The memory file the VMM wrote (none when a memfd is shared). */
  memfilePath?: string | undefined;
  /** memfilePath is the VMM's Diff snapshot taken with dirty tracking: its pages are the written ones. */
  vmmDirtyLog?: boolean;
  /** A checkpoint's export: the sandbox is served on, no StopSourcing before it. */
  keepServing?: boolean;
  /** Leave pages equal to the served build's to it. */
  dedup?: boolean;
  /** Write the recorded prefetch set here (the staged build's memfile.prefetch). */
  prefetchPath?: string | undefined;
}

export interface ExportResult {
  mappings: BuildMapping[];
  diffSize: number;
  dirtyPages: number;
  zeroPages: number;
  /** Written pages equal to what the build served holds: left to it, not stored. */
  dedupedPages: number;
  pageSize: number;
  memorySize: number;
  /** `vmm-dirty-log`: the pages came from Firecracker's Diff snapshot, not from this server's tracking. */
  tracking: TrackingMode | 'vmm-dirty-log';
  /** Blocks written to prefetchPath (0: no set, no file). */
  prefetchBlocks: number;
}

export interface SandboxStats extends Partial<ServeEngineStats> {
  sandboxId: string;
  state: SandboxState;
  tracking: TrackingMode | '';
  error: string;
  prefetchHits: number;
  fetchRetries: number;
  pageSize: number;
  hasMemfd: boolean;
  peerPid: number;
  recordedPrefetch: RecordedPrefetchStats | undefined;
}

const MAP_PRESENT = 0;
const MAP_DIRTY = 1;

/**
 * One sandbox's guest memory: waits for Firecracker's handshake on the sandbox's socket, then
 * serves its faults on native threads (ServeEngine) from the source view, fetches source ranges
 * the engine asks for (retrying transient failures while the fault waits), tracks written pages,
 * stops sourcing at pause, exports the diff, and gives back every fd and mapping on stop.
 */
export class SandboxMemory {
  readonly sandboxId: string;
  readonly socketPath: string;
  private readonly o: SandboxMemoryOptions;
  private readonly log: Logger;
  private listener: HandshakeListener | undefined;
  private hs: ReceivedHandshake | undefined;
  private engine: ServeEngine | undefined;
  private engineWatch: { close(): void } | undefined;
  private pidfd = -1;
  private pagemapFd = -1;
  private stateValue: SandboxState = 'listening';
  private errorText = '';
  private trackingMode: TrackingMode | '' = '';
  private dirtyPages: number[] | undefined;
  /** Pages the peer gave back (UFFD_EVENT_REMOVE) before the pause: zeros now, in no dirty log. */
  private droppedPages: number[] = [];
  private prefetchHits = 0;
  private fetchRetries = 0;
  private lastStats: ServeEngineStats | undefined;
  private readonly inflight = new Map<number, Promise<void>>();
  private readonly served: Promise<void>;

  constructor(options: SandboxMemoryOptions) {
    this.o = options;
    this.sandboxId = options.sandboxId;
    this.socketPath = options.socketPath;
    this.log = options.logger;
    if (options.adopted) {
      this.served = Promise.resolve();
      this.startServing(options.adopted);
      return;
    }
    this.listener = new HandshakeListener(options.socketPath, {
      memorySize: options.source.size,
      ...(options.pageSize ? { pageSize: options.pageSize } : {}),
      ...(options.blockSize ? { blockSize: options.blockSize } : {}),
      ...(options.handshakeTimeoutMs ? { timeoutMs: options.handshakeTimeoutMs } : {}),
    });
    this.served = this.listener.received.then(
      (hs) => this.startServing(hs),
      (err: unknown) => {
        if (this.stateValue === 'stopped') return;
        const reason = err instanceof HandshakeInvalid ? err.message : `handshake failed: ${(err as Error).message}`;
        this.failWith(reason, { socketPath: this.socketPath });
      },
    );
  }

  get state(): SandboxState {
    return this.stateValue;
  }

  get error(): string {
    return this.errorText;
  }

  get tracking(): TrackingMode | '' {
    return this.trackingMode;
  }

  /** Resolves once the handshake was taken (or refused). */
  handshakeDone(): Promise<void> {
    return this.served;
  }

  private startServing(hs: ReceivedHandshake): void {
    this.listener = undefined;
    this.hs = hs;
    if (this.stateValue === 'stopped') {
      this.closeHandshakeFds();
      return;
    }
    try {
      const probe = probeTracking(hs.uffd, hs.peerPid, hs.regions);
      let mode = probe.mode;
      if (mode === 'wp-async') {
        try {
          this.pagemapFd = openSync(`/proc/${hs.peerPid}/pagemap`, 'r');
        } catch (err) {
          mode = 'wp-sync';
          probe.reason = `cannot open /proc/${hs.peerPid}/pagemap for PAGEMAP_SCAN: ${(err as Error).message}`;
        }
      }
      this.trackingMode = mode;
      // Pages the earlier process installed are in the VMM's page tables, not in this engine's map.
      if (this.o.adopted) this.adoptedPresent = this.pagesInstalledBefore(hs);
      try {
        if (hs.peerPid) this.pidfd = pidfdOpen(hs.peerPid);
      } catch {
        this.pidfd = -1;
      }
      const pageSize = hs.regions[0]!.pageSize;
      const prefetch = mode === 'present' && !this.o.prefetchWithoutTracking ? 0 : this.o.prefetchBytes;
      const engine = new ServeEngine({
        uffd: hs.uffd,
        peerFd: this.pidfd >= 0 ? this.pidfd : hs.connection,
        peerKind: this.pidfd >= 0 ? 'pidfd' : 'socket',
        sourceAddress: this.o.source.address,
        sourceSize: this.o.source.size,
        allReady: this.o.source.allReady,
        prefetchBytes: prefetch,
        readaheadWindows: this.o.readaheadWindows,
        installWriteProtected: mode !== 'present',
        syncWriteProtect: mode === 'wp-sync',
        regions: hs.regions,
        ...(this.o.recordedPrefetch?.recordBlockSize !== undefined
          ? { recordBlockSize: this.o.recordedPrefetch.recordBlockSize }
          : {}),
      });
      this.engine = engine;
      if (!this.o.source.allReady) for (const r of this.o.source.readyRanges()) engine.markReady(r.offset, r.length);
      if (!this.o.source.allReady) this.markSetReadyAsFetched(engine, Math.max(prefetch, pageSize));
      this.engineWatch = watchReadable(engine.notifyFd, () => this.drainEvents());
      if (this.o.poolThreads) engine.startPooled(this.o.poolThreads);
      else engine.start(this.o.threads);
      this.o.recordedPrefetch?.attach(engine);
      this.stateValue = 'serving';
      this.log.info(
        {
          regions: hs.regions.length,
          memorySize: this.o.source.size,
          pageSize,
          memfd: hs.memfd !== undefined,
          peerPid: hs.peerPid,
          tracking: mode,
          ...(probe.reason ? { trackingNote: probe.reason } : {}),
          prefetchBytes: prefetch,
          ...(this.adoptedPresent ? { installedBefore: this.adoptedPresent.reduce((n, v) => n + v, 0) } : {}),
        },
        this.o.adopted
          ? 'uffd taken back from the VMM, serving faults again'
          : 'uffd handshake accepted, serving faults',
      );
      if (!this.o.adopted) this.o.onServing?.(this, hs, mode);
    } catch (err) {
      this.failWith(`cannot serve: ${(err as Error).message}`, {});
    }
  }

  /**
   * Serve units present in the VMM's page tables (PAGEMAP_SCAN): under MISSING registration only
   * this server puts pages there, so these are the ones an earlier process installed.
   */
  private pagesInstalledBefore(hs: ReceivedHandshake): Uint8Array {
    const units = new Uint8Array(this.unitCount());
    const fd = openSync(`/proc/${hs.peerPid}/pagemap`, 'r');
    try {
      for (const r of hs.regions) {
        const ranges = pagemapScan(fd, r.base, r.base + r.size, {
          flags: 0,
          categoryMask: PageCategory.PRESENT,
          returnMask: PageCategory.PRESENT,
        });
        for (const range of ranges) {
          const from = r.offset + (range.start - r.base);
          const to = r.offset + (range.end - r.base);
          for (let u = from / SERVE_UNIT; u < Math.ceil(to / SERVE_UNIT); u++) units[u] = 1;
        }
      }
    } finally {
      closeSync(fd);
    }
    return units;
  }

  /** The engine's present map, with what an earlier process installed (adopted sandboxes). */
  private presentMapNow(): Uint8Array {
    const present = this.engine!.copyMap(MAP_PRESENT, 0, this.unitCount());
    const before = this.adoptedPresent;
    if (before) for (let u = 0; u < present.length; u++) if (before[u] && present[u] !== 2) present[u] = 1;
    return present;
  }

  private adoptedPresent: Uint8Array | undefined;

  private drainEvents(): void {
    const engine = this.engine;
    if (!engine) return;
    for (let e = engine.nextEvent(); e; e = engine.nextEvent()) {
      if (e.type === 'fetch') this.fetch(e.offset, e.length);
      else if (e.type === 'failed') {
        const r =
          e.code === 'FAULT_OUTSIDE_REGIONS'
            ? `fault at 0x${e.address.toString(16)} outside every region`
            : `${e.code} at 0x${e.address.toString(16)} (errno ${e.errno})`;
        this.failWith(r, { address: e.address, errno: e.errno, code: e.code });
        return;
      } else if (e.type === 'peer-gone') {
        this.peerGone();
        return;
      }
    }
  }

  /**
   * Over a layer still fetched from the bucket, each window of the recorded set is marked ready
   * as soon as its chunks are here (they are fetched since Prepare): at once if they came before
   * the VMM connected, else when they arrive. So the pass and the guest's faults copy them
   * straight away instead of each first sending a fetch event through this thread and waiting for
   * it (bench/cold-resume-node: 423 of a start's 444 faults did, ~2.6 ms each on a loaded machine).
   */
  private markSetReadyAsFetched(engine: ServeEngine, window: number): void {
    const set = this.o.recordedPrefetch?.set;
    if (!set) return;
    const seen = new Set<number>();
    for (const b of set.blocks) {
      const start = b * set.blockSize;
      const end = Math.min(this.o.source.size, start + set.blockSize);
      for (let w = Math.floor(start / window); w * window < end; w++) {
        if (seen.has(w)) continue;
        seen.add(w);
        const offset = w * window;
        const length = Math.min(window, this.o.source.size - offset);
        if (this.o.source.isReady(offset, length)) {
          engine.markReady(offset, length);
          continue;
        }
        void this.o.source.whenPrefetched(offset, length).then((fetched) => {
          if (fetched && this.engine === engine && this.stateValue !== 'stopped') engine.markReady(offset, length);
        });
      }
    }
  }

  /** Single flight per window; the chunk cache below retries transient failures while the fault waits. */
  private fetch(offset: number, length: number): void {
    if (this.inflight.has(offset)) return;
    const work = this.o.source
      .ensure(offset, length, ({ attempt, error }) => {
        this.fetchRetries++;
        this.log.warn(
          { offset, length, attempt, err: (error as Error).message },
          'source fetch failed, retrying while the fault waits',
        );
      })
      .then(
        () => {
          if (this.engine && this.stateValue !== 'stopped') this.engine.markReady(offset, length);
        },
        (err: unknown) => {
          this.engine?.fail(offset, 5);
          this.failWith(`source fetch of [${offset}, ${offset + length}) failed: ${(err as Error).message}`, {
            offset,
            length,
          });
        },
      );
    const tracked = work.finally(() => this.inflight.delete(offset));
    this.inflight.set(offset, tracked);
  }

  private failWith(reason: string, detail: Record<string, unknown>): void {
    if (this.stateValue === 'failed' || this.stateValue === 'stopped') return;
    this.stateValue = 'failed';
    this.errorText = reason;
    this.log.error({ ...detail, socketPath: this.socketPath }, `memory serving failed: ${reason}`);
    this.releaseServing();
    this.o.onEnded?.(this);
  }

  private peerGone(): void {
    if (this.stateValue === 'stopped' || this.stateValue === 'failed') return;
    const wasPaused = this.stateValue === 'sourcing-stopped';
    this.stateValue = 'peer-gone';
    this.log.info({ afterPause: wasPaused }, 'peer went away; serving ended');
    this.releaseServing();
    this.o.onEnded?.(this);
  }

  /** Joins the engine's threads and closes what only serving needs; keeps what export needs. */
  private releaseServing(): void {
    this.listener?.cancel(new Error('serving ended'));
    this.listener = undefined;
    if (this.engine) {
      this.engine.stop();
      this.o.recordedPrefetch?.detach();
      this.lastStats = this.engine.stats();
      if (!this.dirtyPages) this.snapshotPresentOnly();
      this.engineWatch?.close();
      this.engineWatch = undefined;
      this.engine.destroy();
      this.engine = undefined;
    }
    if (this.hs) {
      if (this.hs.uffd >= 0) close(this.hs.uffd);
      this.hs.uffd = -1;
      if (this.hs.connection >= 0) close(this.hs.connection);
      this.hs.connection = -1;
    }
    // Without a stop-sourcing no diff can be exported, so the guest's memfd is not needed either.
    if (this.hs && !this.dirtyPages && this.hs.memfd !== undefined && this.hs.memfd >= 0) {
      close(this.hs.memfd);
      this.hs.memfd = -1;
    }
    if (this.pidfd >= 0) close(this.pidfd);
    this.pidfd = -1;
    if (this.pagemapFd >= 0) closeSync(this.pagemapFd);
    this.pagemapFd = -1;
  }

  /** Remembers what was present, for a sandbox whose serving ends before a stop-sourcing. */
  private snapshotPresentOnly(): void {
    if (this.engine) this.presentMap = this.presentMapNow();
  }

  private presentMap: Uint8Array | undefined;

  private unitCount(): number {
    return Math.ceil(this.o.source.size / SERVE_UNIT);
  }

  private requireHandshake(what: string): ReceivedHandshake {
    if (!this.hs)
      throw new InvalidState(this.sandboxId, this.stateValue, `${what} needs Firecracker's handshake first`);
    return this.hs;
  }

  /**
   * Pause: from now on faults get zero pages (recorded as not present before the pause), and
   * the set of dirty pages is fixed now, while the VM is paused. Returns pages present.
   */
  stopSourcing(): number {
    const hs = this.requireHandshake('stop-sourcing');
    if (this.stateValue === 'sourcing-stopped') return this.presentCount();
    if (this.stateValue !== 'serving')
      throw new InvalidState(
        this.sandboxId,
        this.stateValue,
        `cannot stop sourcing${this.errorText ? `: ${this.errorText}` : ''}`,
      );
    const engine = this.engine!;
    engine.stopSourcing();
    this.o.recordedPrefetch?.stopRecording('paused');
    const units = this.unitCount();
    const present = this.presentMapNow();
    this.presentMap = present;
    const pageSize = hs.regions[0]!.pageSize;
    const perPage = pageSize / SERVE_UNIT;
    const dirtyUnits = new Uint8Array(units);
    let mode = this.trackingMode as TrackingMode;
    if (mode === 'wp-async') {
      try {
        this.markWritten(hs.regions, dirtyUnits, present);
      } catch (err) {
        this.log.warn({ err: (err as Error).message }, 'PAGEMAP_SCAN failed; counting every present page as dirty');
        mode = 'present';
      }
    }
    // Bit 0: written (sync write-protect faults); bit 1: dropped by the peer (reads as zeros now).
    const engineDirty = engine.copyMap(MAP_DIRTY, 0, units);
    for (let u = 0; u < units; u++) {
      const d = engineDirty[u]!;
      if (d & 2 || (mode === 'wp-sync' && d & 1) || (mode === 'present' && (present[u] === 1 || present[u] === 2)))
        dirtyUnits[u] = 1;
    }
    this.trackingMode = mode;
    const pages: number[] = [];
    const dropped: number[] = [];
    let hits = 0;
    for (let p = 0; p * perPage < units; p++) {
      let dirty = false;
      let prefetched = false;
      let gone = false;
      for (let u = p * perPage; u < Math.min(units, (p + 1) * perPage); u++) {
        if (dirtyUnits[u]) dirty = true;
        if (present[u] === 2) prefetched = true;
        if (engineDirty[u]! & 2) gone = true;
      }
      if (gone) dropped.push(p);
      if (dirty) {
        pages.push(p);
        if (prefetched && mode !== 'present') hits++;
      }
    }
    this.dirtyPages = pages;
    this.droppedPages = dropped;
    this.prefetchHits = hits;
    this.stateValue = 'sourcing-stopped';
    this.log.info({ dirtyPages: pages.length, tracking: mode }, 'sourcing stopped');
    return this.presentCount();
  }

  /**
   * Written pages of the guest, by PAGEMAP_SCAN over the peer's address space. The kernel also
   * reports ranges without page tables as written (nothing there carries a write-protect bit),
   * so only pages we installed before the pause count: under MISSING registration the guest
   * cannot write a page without faulting it in through us first.
   */
  private markWritten(regions: readonly GuestRegion[], dirtyUnits: Uint8Array, present: Uint8Array): void {
    for (const r of regions) {
      const ranges = pagemapScan(this.pagemapFd, r.base, r.base + r.size, {
        flags: PM_SCAN_CHECK_WPASYNC,
        categoryMask: PageCategory.WRITTEN,
        returnMask: PageCategory.WRITTEN,
      });
      for (const range of ranges) {
        const from = r.offset + (range.start - r.base);
        const to = r.offset + (range.end - r.base);
        for (let u = from / SERVE_UNIT; u < Math.ceil(to / SERVE_UNIT); u++)
          if (present[u] === 1 || present[u] === 2) dirtyUnits[u] = 1;
      }
    }
  }

  private presentCount(): number {
    const m = this.presentMap;
    if (!m) return 0;
    let n = 0;
    for (let i = 0; i < m.length; i++) if (m[i] === 1 || m[i] === 2) n++;
    return n;
  }

  /**
   * Writes the dirty pages to `diffPath` (from the memfd when Firecracker shared one, else from
   * the memory file it wrote) and returns their mappings. With `vmmDirtyLog` the memory file is
   * Firecracker's Diff snapshot taken with dirty tracking: the pages it holds are the pages
   * written since load (KVM's dirty log), and they replace what this server tracked (which,
   * without write-protect, is every page present). Pages the peer gave back are added either way.
   */
  async exportDiff({
    buildId,
    diffPath,
    memfilePath,
    vmmDirtyLog = false,
    keepServing = false,
    dedup = false,
    prefetchPath,
  }: DiffExportRequest): Promise<ExportResult> {
    const hs = this.requireHandshake('export');
    if (keepServing && this.stateValue !== 'serving')
      throw new InvalidState(this.sandboxId, this.stateValue, 'a checkpoint export needs a sandbox being served');
    if (!keepServing && !this.dirtyPages)
      throw new InvalidState(this.sandboxId, this.stateValue, 'stop sourcing before exporting the diff');
    const memfd = hs.memfd !== undefined && hs.memfd >= 0 ? hs.memfd : undefined;
    const from =
      memfd !== undefined
        ? ({ kind: 'fd', fd: memfd } as const)
        : memfilePath
          ? ({ kind: 'path', path: memfilePath } as const)
          : undefined;
    if (!from)
      throw new InvalidState(this.sandboxId, this.stateValue, 'no memfd was shared and no memory file path given');
    const pageSize = hs.regions[0]!.pageSize;
    let pages = this.dirtyPages ?? [];
    let tracking: ExportResult['tracking'] = this.trackingMode as TrackingMode;
    // A checkpoint leaves the server as it is (serving, its tracking untouched): the written
    // pages come from the VMM's Diff (KVM's dirty log, which that snapshot reset), or else
    // every page present now, and the pages given back so far (they read as zeros).
    if (keepServing) this.droppedPages = this.pagesGivenBack();
    if (keepServing && !vmmDirtyLog) {
      pages = this.pagesPresentNow(pageSize);
      tracking = 'present';
    }
    if (vmmDirtyLog) {
      if (!memfilePath)
        throw new InvalidState(this.sandboxId, this.stateValue, "the VMM's dirty log needs the Diff snapshot's path");
      pages = this.pagesOfVmmDiff(memfilePath, pageSize, memfd !== undefined);
      tracking = 'vmm-dirty-log';
    }
    const result = await exportDiff({
      pages,
      pageSize,
      memorySize: this.o.source.size,
      from,
      diffPath,
      buildId,
      ...(dedup ? { parent: this.o.source } : {}),
    });
    // The set this sandbox recorded while it started goes with the new build (E2B: at checkpoint).
    const prefetchBlocks = prefetchPath ? ((await this.o.recordedPrefetch?.writeTo(prefetchPath)) ?? 0) : 0;
    this.log.info(
      {
        buildId,
        storedPages: result.storedPages,
        zeroPages: result.zeroPages,
        dedupedPages: result.dedupedPages,
        diffSize: result.diffSize,
        copyCpuMs: Math.round(result.copyCpuMs * 10) / 10,
        from: from.kind,
        tracking,
        ...(vmmDirtyLog && this.dirtyPages ? { serverTrackedPages: this.dirtyPages.length } : {}),
        prefetchBlocks,
      },
      'memory diff exported',
    );
    return {
      mappings: result.mappings,
      diffSize: result.diffSize,
      dirtyPages: result.storedPages,
      zeroPages: result.zeroPages,
      dedupedPages: result.dedupedPages,
      pageSize,
      memorySize: this.o.source.size,
      tracking,
      prefetchBlocks,
    };
  }

  /** The sandbox is up (envd answered): the start's faults are recorded; later ones are not. */
  stopRecording(): RecordedPrefetchStats | undefined {
    return this.o.recordedPrefetch?.stopRecording('sandbox started');
  }

  private pagesGivenBack(): number[] {
    const pageSize = this.hs!.regions[0]!.pageSize;
    const perPage = pageSize / SERVE_UNIT;
    const dirty = this.engine!.copyMap(MAP_DIRTY, 0, this.unitCount());
    const pages = new Set<number>();
    for (let u = 0; u < dirty.length; u++) if (dirty[u]! & 2) pages.add(Math.floor(u / perPage));
    return [...pages].sort((a, b) => a - b);
  }

  private pagesPresentNow(pageSize: number): number[] {
    const perPage = pageSize / SERVE_UNIT;
    const present = this.presentMapNow();
    const pages = new Set(this.droppedPages);
    for (let u = 0; u < present.length; u++)
      if (present[u] === 1 || present[u] === 2) pages.add(Math.floor(u / perPage));
    return [...pages].sort((a, b) => a - b);
  }

  /**
   * The pages Firecracker's Diff snapshot holds (its data extents), plus the pages given back
   * before the pause. Firecracker writes its dirty log in 4 KiB pages: a 2 MiB page only partly
   * in the file can be exported only from the memfd (the rest of it is not in the file).
   */
  private pagesOfVmmDiff(path: string, pageSize: number, haveMemfd: boolean): number[] {
    const fd = openSync(path, 'r');
    let extents: { start: number; end: number }[];
    try {
      extents = dataExtents(fd);
    } finally {
      closeSync(fd);
    }
    const pages = new Set(this.droppedPages);
    for (const e of extents) {
      const end = Math.min(e.end, this.o.source.size);
      if (e.start >= end) continue;
      if (!haveMemfd && (e.start % pageSize !== 0 || (end % pageSize !== 0 && end !== this.o.source.size))) {
        throw new InvalidState(
          this.sandboxId,
          this.stateValue,
          `the Diff snapshot holds [${e.start}, ${end}), part of a ${pageSize}-byte page, and no memfd was shared to read the rest`,
        );
      }
      for (let p = Math.floor(e.start / pageSize); p * pageSize < end; p++) pages.add(p);
    }
    return [...pages].sort((a, b) => a - b);
  }

  stats(): SandboxStats {
    const s = this.engine?.stats() ?? this.lastStats;
    return {
      ...(s ?? {}),
      sandboxId: this.sandboxId,
      state: this.stateValue,
      tracking: this.trackingMode,
      error: this.errorText,
      prefetchHits: this.prefetchHits,
      fetchRetries: this.fetchRetries,
      pageSize: this.hs?.regions[0]?.pageSize ?? this.o.pageSize ?? 0,
      hasMemfd: this.hs?.memfd !== undefined,
      peerPid: this.hs?.peerPid ?? 0,
      recordedPrefetch: this.o.recordedPrefetch?.stats(),
    };
  }

  private closeHandshakeFds(): void {
    const hs = this.hs;
    if (!hs) return;
    for (const fd of [hs.uffd, hs.memfd, hs.connection]) if (fd !== undefined && fd >= 0) close(fd);
    hs.uffd = -1;
    hs.memfd = undefined;
    hs.connection = -1;
  }

  /** Releases everything: threads, fds (uffd, memfd, pidfd, socket), the socket file, the source view. */
  async stop(): Promise<void> {
    if (this.stateValue === 'stopped') return;
    const previous = this.stateValue;
    this.stateValue = 'stopped';
    this.listener?.cancel(new Error('stopped before the handshake'));
    this.listener = undefined;
    this.releaseServing();
    this.closeHandshakeFds();
    await Promise.allSettled([...this.inflight.values()]);
    this.o.source.close();
    this.log.info({ previous }, 'memory serving stopped');
  }
}
