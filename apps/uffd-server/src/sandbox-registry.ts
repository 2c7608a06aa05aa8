import { isAbsolute } from 'node:path';
import { sandboxLogger, type Logger } from '#logging';
import { fdNumberIn, pidfdGetfd, pidfdOpen, close, startServePool } from '#native';
import { PAGE_2M, PAGE_4K } from '#uffd';
import { LayeredFile, normalizeBuildId, PrefetchInvalid, type BuildStore, type PrefetchSet } from '#storage';
import { SandboxMemory, type DiffExportRequest, type ExportResult, type SandboxStats } from './sandbox-memory.js';
import { RecordedPrefetch } from './recorded-prefetch.js';
import { SourceView } from './source-view.js';
import { SharedSources, type SharedSource } from './shared-sources.js';
import { BuildMemoryInfo, type BuildMemoryFacts } from './build-memory-info.js';
import type { ReceivedHandshake } from './handshake-listener.js';
import { processStartTime, type SandboxRecord, type SandboxRecords } from './sandbox-record.js';
import { RequestInvalid, SandboxExists, SandboxNotFound, SourceInvalid } from './uffd-server-errors.js';

export interface PrepareRequest {
  sandboxId: string;
  socketPath: string;
  /** Serve the layers of this build... */
  buildId?: string;
  /** ...or this local memory file as it is. */
  memfilePath?: string;
  /** 0 or undefined: from the header's block size. */
  pageSize?: number;
  /** 0 or undefined: the server default. */
  prefetchBytes?: number;
}

export interface RegistrySettings {
  prefetchBytes: number;
  readaheadWindows: number;
  prefetchWithoutTracking: boolean;
  threadsPerSandbox: number;
  /** > 0: every sandbox is served by a shared pool of this many threads (threadsPerSandbox is then unused). */
  servePoolThreads?: number;
  handshakeTimeoutMs: number;
  maxSandboxes: number;
  /** Copy a build's recorded prefetch set in at resume, and record the start's faults. */
  recordedPrefetch: boolean;
  /** Longest recording after the handshake (the orchestrator ends it when envd answers). */
  prefetchRecordMs: number;
}

const SANDBOX_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH = 107;

/** The sandboxes one uffd-server process serves; each fails or stops alone. */
export class SandboxRegistry {
  private readonly sandboxes = new Map<string, SandboxMemory>();
  /** Ids being prepared (resolving layers), so a duplicate is refused before it maps anything. */
  private readonly preparing = new Set<string>();
  /** One mapping per memory file served, shared by its sandboxes. */
  private readonly sources = new SharedSources();
  /** Headers and prefetch sets of the builds served lately (builds are immutable). */
  private readonly buildInfo = new BuildMemoryInfo();

  private readonly settings: RegistrySettings;
  private readonly builds: BuildStore;
  private readonly logger: Logger;
  private readonly onEnded?: (s: SandboxMemory) => void;
  private readonly onStopped?: (final: SandboxStats) => void;
  private readonly records?: SandboxRecords;

  constructor(options: {
    settings: RegistrySettings;
    /** Builds' memory layers (local builds first, then the bucket). */
    builds: BuildStore;
    logger: Logger;
    onEnded?: (s: SandboxMemory) => void;
    /** Called with a stopped sandbox's final counts, after which it is gone from here. */
    onStopped?: (final: SandboxStats) => void;
    /** Where each served sandbox is recorded, so a restarted process serves it on (see adopt). */
    records?: SandboxRecords;
  }) {
    this.records = options.records;
    ({ settings: this.settings, builds: this.builds, logger: this.logger } = options);
    this.onEnded = options.onEnded;
    this.onStopped = options.onStopped;
    // The pool's threads wait from the start, not from the first sandbox (and live as long as the process).
    if (this.settings.servePoolThreads) startServePool(this.settings.servePoolThreads);
  }

  async prepare(req: PrepareRequest): Promise<{ socketPath: string; memorySize: number; pageSize: number }> {
    if (!SANDBOX_ID.test(req.sandboxId)) throw new RequestInvalid('sandbox_id', `"${req.sandboxId}" is not a safe id`);
    if (!isAbsolute(req.socketPath) || Buffer.byteLength(req.socketPath) > MAX_SOCKET_PATH)
      throw new RequestInvalid('socket_path', `must be absolute and at most ${MAX_SOCKET_PATH} bytes`);
    if (req.pageSize && req.pageSize !== PAGE_4K && req.pageSize !== PAGE_2M)
      throw new RequestInvalid('page_size', `${req.pageSize} (want 4096 or 2097152)`);
    if (!req.buildId === !req.memfilePath)
      throw new RequestInvalid('build_id', 'give exactly one of build_id and memfile_path');
    if (req.memfilePath && !isAbsolute(req.memfilePath)) throw new RequestInvalid('memfile_path', 'must be absolute');
    if (this.sandboxes.has(req.sandboxId) || this.preparing.has(req.sandboxId)) throw new SandboxExists(req.sandboxId);
    if (this.sandboxes.size + this.preparing.size >= this.settings.maxSandboxes)
      throw new RequestInvalid('sandbox_id', `this server already serves ${this.settings.maxSandboxes} sandboxes`);
    for (const s of this.sandboxes.values())
      if (s.socketPath === req.socketPath && s.state === 'listening')
        throw new RequestInvalid('socket_path', `sandbox ${s.sandboxId} listens there`);
    const started = performance.now();
    this.preparing.add(req.sandboxId);
    let source: SourceView | undefined;
    try {
      const pageSize = req.pageSize || undefined;
      let blockSize: number | undefined;
      let prefetchSet: PrefetchSet | undefined;
      const log = sandboxLogger(this.logger, req.sandboxId);
      if (req.buildId) {
        const buildId = req.buildId;
        const acquired = await this.sources.acquire(SharedSources.buildKey(buildId), () =>
          this.openBuild(buildId, log),
        );
        source = acquired.source.view;
        ({ blockSize, prefetchSet } = acquired.source);
        // The bucket side of the set starts now, before the VMM connects: a remote build's chunk
        // caches fetch its blocks in parallel, coalesced (libs/storage README, "Fetching"); the
        // engine's pass and the faults then find them there or in flight. Local layers: nothing.
        // Once per mapping: the sandboxes of the build share its chunk caches.
        if (acquired.opened && prefetchSet) this.prefetchFromBucket(acquired.source, log);
        // Diff mappings must stay aligned to the header's blocks: the page size is a multiple of them.
        if (pageSize !== undefined && blockSize !== undefined && pageSize % blockSize !== 0)
          throw new SourceInvalid(
            `build ${buildId}`,
            `page size ${pageSize} is not a multiple of the header block size ${blockSize}`,
          );
      } else {
        source = (await this.acquireFile(req.memfilePath!)).view;
      }
      // A fault's window is fetched whole before it is installed: over a layer still fetched from
      // the bucket, a window larger than its chunk fetches bytes nobody touched (2 MiB windows
      // over 256 KiB chunks: ~2x the bytes a cold resume touched, and a round trip per window;
      // bench/cold-resume). Such a window is cut to the chunk (a power of two, so still aligned).
      const asked = req.prefetchBytes || this.settings.prefetchBytes;
      const unit = source.fetchUnit;
      const prefetchBytes =
        unit !== undefined && asked > unit && isPowerOfTwo(unit) ? Math.max(unit, pageSize ?? 4096) : asked;
      const recordBlock = blockSize ?? pageSize ?? 4096;
      const sandbox = new SandboxMemory({
        sandboxId: req.sandboxId,
        socketPath: req.socketPath,
        source,
        pageSize,
        ...(blockSize ? { blockSize } : {}),
        prefetchBytes,
        readaheadWindows: this.settings.readaheadWindows,
        prefetchWithoutTracking: this.settings.prefetchWithoutTracking,
        threads: this.settings.threadsPerSandbox,
        poolThreads: this.settings.servePoolThreads ?? 0,
        handshakeTimeoutMs: this.settings.handshakeTimeoutMs,
        logger: log,
        recordedPrefetch: new RecordedPrefetch({
          blockSize: recordBlock,
          memorySize: source.size,
          recordMs: this.settings.recordedPrefetch ? this.settings.prefetchRecordMs : 0,
          set: prefetchSet,
          logger: log,
        }),
        onEnded: (s) => this.ended(s),
        onServing: (s, hs, tracking) =>
          this.record(s, hs, tracking, {
            ...(req.buildId ? { buildId: req.buildId } : { memfilePath: req.memfilePath! }),
            ...(pageSize ? { pageSize } : {}),
            ...(blockSize ? { blockSize } : {}),
            prefetchBytes,
          }),
      });
      this.sandboxes.set(req.sandboxId, sandbox);
      log.info(
        {
          socketPath: req.socketPath,
          memorySize: source.size,
          pageSize,
          buildId: req.buildId,
          prepareMs: Math.round((performance.now() - started) * 100) / 100,
        },
        'listening for the uffd handshake',
      );
      return { socketPath: req.socketPath, memorySize: source.size, pageSize: pageSize ?? 0 };
    } catch (err) {
      source?.close();
      throw err;
    } finally {
      this.preparing.delete(req.sandboxId);
    }
  }

  /**
   * The build's recorded prefetch set; a corrupt one is warned about and left out, never fails
   * the resume. `keep` is false when the read failed for now (not a corrupt set): ask again next time.
   */
  private async readPrefetch(buildId: string, log: Logger): Promise<{ set: PrefetchSet | undefined; keep: boolean }> {
    try {
      return { set: await this.builds.readPrefetch(buildId), keep: true };
    } catch (err) {
      const invalid = err instanceof PrefetchInvalid;
      const problem = invalid ? err.message : `cannot read it: ${(err as Error).message}`;
      log.warn({ buildId, problem }, 'recorded prefetch set unusable; resuming without it');
      return { set: undefined, keep: invalid };
    }
  }

  /** The build's memfile header and usable prefetch set, read once while the build is served lately. */
  private buildFacts(buildId: string, log: Logger): Promise<BuildMemoryFacts> {
    return this.buildInfo.get(normalizeBuildId(buildId), async () => {
      const [header, read] = await Promise.all([
        this.builds.readHeader(buildId, 'memfile'),
        this.settings.recordedPrefetch ? this.readPrefetch(buildId, log) : { set: undefined, keep: true },
      ]);
      const { set } = read;
      const { blockSize, size } = header.metadata;
      if (set && (set.blockSize !== blockSize || set.size !== size)) {
        log.warn(
          { buildId, setBlockSize: set.blockSize, setSize: set.size, blockSize, size },
          'recorded prefetch set does not match the memfile header; resuming without it',
        );
        return { header, prefetchSet: undefined, keep: read.keep };
      }
      return { header, prefetchSet: set, keep: read.keep };
    });
  }

  /** Lays a build's memory file out, with what its sandboxes need from the build. */
  private async openBuild(buildId: string, log: Logger): Promise<SharedSource> {
    const { header, prefetchSet } = await this.buildFacts(buildId, log);
    // Its layers through the store on every opening (the store reopens a layer the cache evicted).
    const file = new LayeredFile({ header, resolve: (id) => this.builds.dataFile(id, 'memfile') });
    const view = await SourceView.ofLayers(file);
    return { view, blockSize: header.metadata.blockSize, ...(prefetchSet ? { prefetchSet } : {}), file };
  }

  private prefetchFromBucket(source: SharedSource, log: Logger): void {
    const { prefetchSet, file } = source;
    if (!prefetchSet || !file) return;
    const { blocks, blockSize: bs, size } = prefetchSet;
    void file.prefetch(blocks.map((b) => ({ offset: b * bs, length: Math.min(bs, size - b * bs) }))).then(
      (r) => r.chunks > 0 && log.info(r, 'recorded prefetch: fetched from the bucket'),
      (err: unknown) => log.warn({ err: (err as Error).message }, 'recorded prefetch: bucket fetch stopped'),
    );
  }

  /** A plain memory file's view, shared by the sandboxes of the same file on disk. */
  private async acquireFile(path: string): Promise<SharedSource> {
    const { source } = await this.sources.acquire(SharedSources.fileKey(path), async () => ({
      view: SourceView.ofFile(path),
    }));
    return source;
  }

  /** Memory files mapped now (one per build or plain file served, however many sandboxes use it). */
  get mappedSources(): number {
    return this.sources.size;
  }

  private ended(s: SandboxMemory): void {
    this.records?.remove(s.sandboxId);
    this.onEnded?.(s);
  }

  /** Records a sandbox now served, with the VMM's fd numbers of its uffd and memfd (kcmp). */
  private record(
    s: SandboxMemory,
    hs: ReceivedHandshake,
    tracking: SandboxRecord['tracking'],
    source: Pick<SandboxRecord, 'buildId' | 'memfilePath' | 'pageSize' | 'blockSize' | 'prefetchBytes'>,
  ): void {
    if (!this.records) return;
    const log = sandboxLogger(this.logger, s.sandboxId);
    const startTime = hs.peerPid ? processStartTime(hs.peerPid) : undefined;
    const uffdFd = hs.peerPid ? fdNumberIn(hs.peerPid, hs.uffd) : undefined;
    const memfdFd = hs.peerPid && hs.memfd !== undefined ? fdNumberIn(hs.peerPid, hs.memfd) : undefined;
    if (
      !hs.peerPid ||
      startTime === undefined ||
      uffdFd === undefined ||
      (hs.memfd !== undefined && memfdFd === undefined)
    ) {
      log.warn(
        { peerPid: hs.peerPid },
        'the VMM does not hold its uffd (or memfd) open: a restart of this server will fail the sandbox',
      );
      return;
    }
    try {
      this.records.write({
        version: 1,
        sandboxId: s.sandboxId,
        socketPath: s.socketPath,
        ...source,
        peerPid: hs.peerPid,
        peerStartTime: startTime,
        uffdFd,
        ...(memfdFd !== undefined ? { memfdFd } : {}),
        regions: hs.regions,
        tracking,
      });
    } catch (err) {
      log.warn({ err: (err as Error).message }, 'cannot record the sandbox: a restart of this server will fail it');
    }
  }

  /**
   * At start, before the control API answers: serves again every sandbox an earlier process of
   * this instance recorded whose VMM still runs, taking its uffd (and memfd) back from the VMM.
   * Faults raised meanwhile waited in the uffd and are served now. Write-protect faults tracked
   * in the old process (wp-sync) are lost with it: such a sandbox is not taken back (the
   * orchestrator then fails it, as for any sandbox this instance does not list).
   */
  async adopt(): Promise<{ adopted: string[]; dropped: Array<{ sandboxId: string; reason: string }> }> {
    const adopted: string[] = [];
    const dropped: Array<{ sandboxId: string; reason: string }> = [];
    if (!this.records) return { adopted, dropped };
    for (const r of this.records.readAll()) {
      if (!('sandboxId' in r)) {
        dropped.push({ sandboxId: r.file, reason: r.error });
        continue;
      }
      const log = sandboxLogger(this.logger, r.sandboxId);
      try {
        await this.adoptOne(r, log);
        adopted.push(r.sandboxId);
        log.info({ peerPid: r.peerPid, tracking: r.tracking }, 'sandbox taken back after a restart');
      } catch (err) {
        this.records.remove(r.sandboxId);
        const reason = (err as Error).message;
        dropped.push({ sandboxId: r.sandboxId, reason });
        log.warn({ peerPid: r.peerPid, reason }, 'sandbox not taken back after a restart (the orchestrator fails it)');
      }
    }
    return { adopted, dropped };
  }

  private async adoptOne(r: SandboxRecord, log: Logger): Promise<void> {
    if (r.tracking === 'wp-sync')
      throw new Error('wp-sync: the written pages were tracked in the earlier process and are lost with it');
    if (processStartTime(r.peerPid) !== r.peerStartTime) throw new Error(`the VMM (pid ${r.peerPid}) is gone`);
    const fds: number[] = [];
    let source: SourceView | undefined;
    try {
      const pidfd = pidfdOpen(r.peerPid);
      fds.push(pidfd);
      const uffd = pidfdGetfd(pidfd, r.uffdFd);
      fds.push(uffd);
      const memfd = r.memfdFd !== undefined ? pidfdGetfd(pidfd, r.memfdFd) : undefined;
      if (memfd !== undefined) fds.push(memfd);
      const buildId = r.buildId;
      source = buildId
        ? (await this.sources.acquire(SharedSources.buildKey(buildId), () => this.openBuild(buildId, log))).source.view
        : (await this.acquireFile(r.memfilePath!)).view;
      const hs: ReceivedHandshake = {
        regions: r.regions,
        pageSizeKey: 'page_size', // how the VMM spelled it no longer matters once taken
        hasMemfd: memfd !== undefined,
        uffd,
        memfd,
        connection: -1,
        peerPid: r.peerPid,
      };
      const sandbox = new SandboxMemory({
        sandboxId: r.sandboxId,
        socketPath: r.socketPath,
        source,
        pageSize: r.pageSize,
        ...(r.blockSize ? { blockSize: r.blockSize } : {}),
        prefetchBytes: r.prefetchBytes,
        readaheadWindows: this.settings.readaheadWindows,
        prefetchWithoutTracking: this.settings.prefetchWithoutTracking,
        threads: this.settings.threadsPerSandbox,
        poolThreads: this.settings.servePoolThreads ?? 0,
        handshakeTimeoutMs: undefined,
        logger: log,
        onEnded: (s) => this.ended(s),
        adopted: hs,
      });
      close(pidfd);
      fds.length = 0; // the sandbox owns uffd and memfd now
      if (sandbox.state !== 'serving') {
        await sandbox.stop();
        throw new Error(`cannot serve: ${sandbox.error}`);
      }
      this.sandboxes.set(r.sandboxId, sandbox);
    } catch (err) {
      for (const fd of fds) close(fd);
      if (fds.length) source?.close();
      throw err;
    }
  }

  get(sandboxId: string): SandboxMemory {
    const s = this.sandboxes.get(sandboxId);
    if (!s) throw new SandboxNotFound(sandboxId);
    return s;
  }

  stopSourcing(sandboxId: string): number {
    return this.get(sandboxId).stopSourcing();
  }

  exportDiff(sandboxId: string, request: DiffExportRequest): Promise<ExportResult> {
    const { diffPath, memfilePath, vmmDirtyLog, prefetchPath } = request;
    if (!isAbsolute(diffPath)) throw new RequestInvalid('diff_path', 'must be absolute');
    if (prefetchPath && !isAbsolute(prefetchPath)) throw new RequestInvalid('prefetch_path', 'must be absolute');
    if (memfilePath && !isAbsolute(memfilePath)) throw new RequestInvalid('memfile_path', 'must be absolute');
    if (vmmDirtyLog && !memfilePath)
      throw new RequestInvalid('memfile_path', "required with vmm_dirty_log (the VMM's Diff snapshot)");
    return this.get(sandboxId).exportDiff(request);
  }

  stopRecording(sandboxId: string): SandboxStats {
    const s = this.get(sandboxId);
    s.stopRecording();
    return s.stats();
  }

  async stop(sandboxId: string): Promise<void> {
    const s = this.get(sandboxId);
    this.sandboxes.delete(sandboxId);
    this.records?.remove(sandboxId);
    try {
      await s.stop();
    } finally {
      this.onStopped?.(s.stats());
    }
  }

  stats(sandboxId: string): SandboxStats {
    return this.get(sandboxId).stats();
  }

  list(): SandboxStats[] {
    return [...this.sandboxes.values()].map((s) => s.stats());
  }

  get size(): number {
    return this.sandboxes.size;
  }

  /**
   * Stops serving every sandbox (service shutdown). Records stay: the VMMs keep their uffds, and
   * the next start of this instance serves them on (a fault waits until then).
   */
  async shutdown(): Promise<void> {
    const all = [...this.sandboxes.values()];
    this.sandboxes.clear();
    await Promise.allSettled(
      all.map(async (s) => {
        try {
          await s.stop();
        } finally {
          this.onStopped?.(s.stats());
        }
      }),
    );
  }
}

function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}
