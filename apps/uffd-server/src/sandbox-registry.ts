import { isAbsolute } from 'node:path';
import { sandboxLogger, type Logger } from '#logging';
import { PAGE_2M, PAGE_4K } from '#uffd';
import type { BuildStore } from '#storage';
import { SandboxMemory, type ExportResult, type SandboxStats } from './sandbox-memory.js';
import { SourceView } from './source-view.js';
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
  handshakeTimeoutMs: number;
  maxSandboxes: number;
}

const SANDBOX_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** sun_path holds 108 bytes with the terminating NUL. */
const MAX_SOCKET_PATH = 107;

/** The sandboxes one uffd-server process serves; each fails or stops alone. */
export class SandboxRegistry {
  private readonly sandboxes = new Map<string, SandboxMemory>();
  /** Ids being prepared (resolving layers), so a duplicate is refused before it maps anything. */
  private readonly preparing = new Set<string>();

  private readonly settings: RegistrySettings;
  private readonly builds: BuildStore;
  private readonly logger: Logger;
  private readonly onEnded?: (s: SandboxMemory) => void;
  private readonly onStopped?: (final: SandboxStats) => void;

  constructor(options: {
    settings: RegistrySettings;
    /** Builds' memory layers (local builds first, then the bucket). */
    builds: BuildStore;
    logger: Logger;
    onEnded?: (s: SandboxMemory) => void;
    /** Called with a stopped sandbox's final counts, after which it is gone from here. */
    onStopped?: (final: SandboxStats) => void;
  }) {
    ({ settings: this.settings, builds: this.builds, logger: this.logger } = options);
    this.onEnded = options.onEnded;
    this.onStopped = options.onStopped;
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
    this.preparing.add(req.sandboxId);
    let source: SourceView | undefined;
    try {
      const pageSize = req.pageSize || undefined;
      let blockSize: number | undefined;
      if (req.buildId) {
        const { header, file } = await this.builds.openBuildFile(req.buildId, 'memfile');
        blockSize = header.metadata.blockSize;
        // Diff mappings must stay aligned to the header's blocks: the page size is a multiple of them.
        if (pageSize !== undefined && pageSize % blockSize !== 0)
          throw new SourceInvalid(
            `build ${req.buildId}`,
            `page size ${pageSize} is not a multiple of the header block size ${blockSize}`,
          );
        source = await SourceView.ofLayers(file);
      } else {
        source = SourceView.ofFile(req.memfilePath!);
      }
      const log = sandboxLogger(this.logger, req.sandboxId);
      const sandbox = new SandboxMemory({
        sandboxId: req.sandboxId,
        socketPath: req.socketPath,
        source,
        pageSize,
        ...(blockSize ? { blockSize } : {}),
        prefetchBytes: req.prefetchBytes || this.settings.prefetchBytes,
        readaheadWindows: this.settings.readaheadWindows,
        prefetchWithoutTracking: this.settings.prefetchWithoutTracking,
        threads: this.settings.threadsPerSandbox,
        handshakeTimeoutMs: this.settings.handshakeTimeoutMs,
        logger: log,
        ...(this.onEnded ? { onEnded: this.onEnded } : {}),
      });
      this.sandboxes.set(req.sandboxId, sandbox);
      log.info(
        { socketPath: req.socketPath, memorySize: source.size, pageSize, buildId: req.buildId },
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

  get(sandboxId: string): SandboxMemory {
    const s = this.sandboxes.get(sandboxId);
    if (!s) throw new SandboxNotFound(sandboxId);
    return s;
  }

  stopSourcing(sandboxId: string): number {
    return this.get(sandboxId).stopSourcing();
  }

  exportDiff(
    sandboxId: string,
    buildId: string,
    diffPath: string,
    memfilePath: string | undefined,
    vmmDirtyLog = false,
    keepServing = false,
    dedup = false,
  ): Promise<ExportResult> {
    if (!isAbsolute(diffPath)) throw new RequestInvalid('diff_path', 'must be absolute');
    if (memfilePath && !isAbsolute(memfilePath)) throw new RequestInvalid('memfile_path', 'must be absolute');
    if (vmmDirtyLog && !memfilePath)
      throw new RequestInvalid('memfile_path', "required with vmm_dirty_log (the VMM's Diff snapshot)");
    return this.get(sandboxId).exportDiff(buildId, diffPath, memfilePath, vmmDirtyLog, keepServing, dedup);
  }

  async stop(sandboxId: string): Promise<void> {
    const s = this.get(sandboxId);
    this.sandboxes.delete(sandboxId);
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

  /** Stops every sandbox (service shutdown). */
  async shutdown(): Promise<void> {
    const all = [...this.sandboxes.keys()];
    await Promise.allSettled(all.map((id) => this.stop(id)));
  }
}
