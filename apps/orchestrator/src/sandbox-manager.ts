import { createHash } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import {
  BuildNotFound,
  mergeMappings,
  NIL_UUID,
  PREFETCH_FILE,
  type BuildMapping,
  type BuildStore,
  type Header,
  type SnapshotBuild,
} from '#storage';
import { sandboxLogger, type Logger } from '#logging';
import type { SandboxConfig, SandboxNetworkEgressConfig } from '#proto/orchestrator';
import type { BuildMapping as WireMapping } from '#proto/sbx/mapping';
import { BackgroundSaves } from './background-saves.js';
import { BoundedQueue } from './bounded-queue.js';
import type { EnvdClient } from './envd-client.js';
import { compactLayers, layerCount } from './layer-compaction.js';
import type { LifecycleEvents } from './lifecycle-events.js';
import type { NodeServices } from './node-services.js';
import {
  BuildExists,
  BuildUnavailable,
  CapacityExhausted,
  OrchestratorStopping,
  ResourcesMismatch,
  SandboxBusy,
  SandboxExists,
  SandboxNotFound,
  SandboxStepFailed,
} from './orchestrator-errors.js';
import { Sandbox } from './sandbox.js';
import { StartAdmission } from './start-admission.js';
import type { SandboxStateStore } from './sandbox-state-store.js';
import type { TemplateCatalogue } from './template-catalogue.js';
import { describeFailures, type TeardownFailure } from '#service-kit';
import type { VmmHandle, VmmLauncher } from './vmm-launcher.js';
import type { VmmPool } from './vmm-pool.js';
import { netEgressPolicy } from './sandbox-egress.js';

export interface ManagerSettings {
  nodeId: string;
  maxSandboxes: number;
  /** Sandboxes starting at once (E2B: 3); a resume waits up to startWaitMs for a turn. */
  maxStartingSandboxes?: number;
  startWaitMs?: number;
  envdTimeoutMs: number;
  healthIntervalMs: number;
  metricsIntervalMs: number;
  endTimeCheckMs: number;
  pauseParallelism: number;
  generationCap: number;
  /** Without uffd write-protect: written pages from Firecracker's Diff snapshot, or every present page. */
  pauseMemoryDiff: 'vmm-dirty-log' | 'present';
  /** Leave written pages equal to the parent's to it (default true). */
  pauseDedup?: boolean;
  vmRootfsDir: string;
  /** Where API and uffd sockets go (kept short: a Unix socket path has 108 bytes). */
  socketDir: string;
}

export interface SandboxManagerOptions {
  settings: ManagerSettings;
  /** What a sandbox runs on: the node's services, the VMM, envd in the guest. */
  node: { services: NodeServices; vmm: VmmLauncher; envd: EnvdClient; vmmPool?: VmmPool };
  /** What sandboxes start from and pause into: every build read and written, templates. */
  builds: BuildStore;
  templates: TemplateCatalogue;
  /** What is kept about sandboxes: state files, catalogue entries and lifecycle events. */
  records: { states: SandboxStateStore; events: LifecycleEvents };
  logger: Logger;
}

/** An Update's egress fields (E2B's SandboxUpdateRequest): unset = unchanged. */
export interface EgressChange {
  allowInternetAccess?: boolean;
  egress?: SandboxNetworkEgressConfig;
}

export interface CreateRequest {
  config: SandboxConfig;
  startTime: Date;
  endTime: Date;
}

export interface RunningSandboxView {
  config: SandboxConfig;
  startTime: Date;
  endTime: Date;
}

/** Timings of the last create, per step (bench and logs). */
export type StepTimings = Record<string, number>;

/**
 * The sandbox lifecycle of DESIGN.md §3. Every resource a sandbox takes goes on its teardown
 * stack the moment it is taken; a failed step unwinds the stack in reverse and the error
 * names the step.
 */
export class SandboxManager {
  readonly sandboxes = new Map<string, Sandbox>();
  private readonly pauseQueue: BoundedQueue;
  readonly admission: StartAdmission;
  private endTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  private socketDirMade = false;
  lastCreateTimings: StepTimings = {};
  lastPauseTimings: StepTimings = {};
  /** Of the last checkpoint, with guestPaused: from the VM pausing to its resuming (ms). */
  lastCheckpointTimings: StepTimings = {};

  constructor(private readonly o: SandboxManagerOptions) {
    this.pauseQueue = new BoundedQueue(o.settings.pauseParallelism);
    this.admission = new StartAdmission(o.settings.maxStartingSandboxes ?? 3, o.settings.startWaitMs ?? 15_000);
  }

  get settings(): ManagerSettings {
    return this.o.settings;
  }

  startEndTimeEnforcement(): void {
    this.endTimer = setInterval(() => void this.enforceEndTimes(), this.o.settings.endTimeCheckMs);
    this.endTimer.unref();
  }

  socketPaths(sandboxId: string): { api: string; uffd: string } {
    const tag = createHash('sha256').update(sandboxId).digest('hex').slice(0, 16);
    return {
      api: join(this.o.settings.socketDir, `${tag}.api.sock`),
      uffd: join(this.o.settings.socketDir, `${tag}.uffd.sock`),
    };
  }

  list(): RunningSandboxView[] {
    return [...this.sandboxes.values()]
      .filter((s) => s.phase === 'running')
      .map((s) => ({ config: s.config, startTime: s.startTime, endTime: s.endTime }));
  }

  get(sandboxId: string): Sandbox {
    const sbx = this.sandboxes.get(sandboxId);
    if (!sbx) throw new SandboxNotFound(sandboxId);
    return sbx;
  }

  /**
   * New end time and/or egress policy. A policy change replaces the sandbox's whole egress
   * (what the request leaves unset is kept) and holds in the slot before this answers.
   */
  async update(sandboxId: string, endTime: Date | undefined, change: EgressChange = {}): Promise<void> {
    const sbx = this.get(sandboxId);
    if (sbx.phase !== 'running') throw new SandboxBusy(sandboxId, sbx.phase, 'update');
    if (sbx.checkpointing) throw new SandboxBusy(sandboxId, 'checkpointing', 'update');
    if (change.egress !== undefined || change.allowInternetAccess !== undefined) {
      const allowInternetAccess = change.allowInternetAccess ?? sbx.config.allowInternetAccess;
      const egress = change.egress ?? sbx.config.network?.egress;
      if (sbx.slot) await this.o.node.services.slots.setEgress(sbx.slot, netEgressPolicy(allowInternetAccess, egress));
      sbx.config.allowInternetAccess = allowInternetAccess;
      sbx.config.network = { ...sbx.config.network, egress };
      sbx.log.info({ allowInternetAccess, egress }, 'sandbox egress policy updated');
    }
    if (endTime) sbx.endTime = endTime;
    await this.o.records.states.save(sbx.toState());
    await this.o.records.events.publish(this.catalogueEntry(sbx));
    if (endTime) sbx.log.info({ endTime: endTime.toISOString() }, 'sandbox end time updated');
  }

  async create(request: CreateRequest): Promise<Sandbox> {
    if (this.stopping) throw new OrchestratorStopping();
    const { config } = request;
    const id = config.sandboxId;
    if (this.sandboxes.has(id)) throw new SandboxExists(id);
    if (this.sandboxes.size >= this.o.settings.maxSandboxes) {
      throw new CapacityExhausted('sandboxes on this node', this.o.settings.maxSandboxes);
    }
    const log = sandboxLogger(this.o.logger, id);
    // Reserve the id before the first await so a concurrent duplicate is refused.
    const placeholder = { phase: 'creating' } as Sandbox;
    this.sandboxes.set(id, placeholder);
    let admitted: (() => void) | undefined;
    const timings: StepTimings = {};
    let step = 'resolve build';
    let sbx: Sandbox | undefined;
    let saves: BackgroundSaves | undefined;
    const t0 = performance.now();
    let last = t0;
    const mark = (name: string) => {
      const now = performance.now();
      timings[name] = now - last;
      last = now;
    };
    try {
      const buildId = config.buildId || this.o.templates.buildOf(config.templateId);
      // A build paused on this node is read from {cacheDir}/builds at once, by block-server and
      // uffd-server too: no wait for its upload.
      const build = await this.resolveBuild(buildId);
      const ramMb = memoryOfBuild(build, config.ramMb);
      mark(step);
      step = 'admission';
      admitted = await this.admission.enter(config.snapshot ? 'resume' : 'create');
      mark(step);
      const dir = this.o.records.states.create(id);
      sbx = new Sandbox({
        id,
        config: { ...config, buildId, ramMb },
        build,
        startTime: request.startTime,
        endTime: request.endTime,
        dir,
        log,
      });
      const current = sbx;
      // Set once the snapshot is loaded: from then on the file says `running` (startSandbox).
      let runningOnDisk = false;
      saves = new BackgroundSaves(() =>
        this.o.records.states.save(runningOnDisk ? { ...current.toState(), phase: 'running' } : current.toState()),
      );
      sbx.teardown.push('files', () => this.o.records.states.remove(id));
      this.sandboxes.set(id, sbx);
      // No save yet: it would say no more than the directory does (a restart cleans up a sandbox
      // without a state file, and finds what the services hold by asking them), and its write
      // would compete with the steps below. The first one follows the slot, device and uffd.
      // Steps run side by side are timed each on their own too (their times overlap the step's).
      const side = <T>(name: string, work: Promise<T>): Promise<T> => {
        const started = performance.now();
        return work.finally(() => (timings[`(side by side) ${name}`] = performance.now() - started));
      };
      const savedRunning = saves;
      await this.startSandbox(sbx, saves, {
        at: (s) => (step = s),
        mark,
        side,
        saveRunning: () => {
          runningOnDisk = true;
          savedRunning.soon();
        },
      });
      step = 'save state';
      sbx.phase = 'running';
      // The `running` save was started with the VM's last steps: waited for here, rarely still writing.
      await saves.flush();
      mark(step);
      timings['total'] = performance.now() - t0;
      this.lastCreateTimings = timings;
      admitted?.();
      // That save may have gone out before envd answered: this one says it did, behind the create.
      saves.soon();
      saves.flush().catch((err: unknown) => {
        log.warn(
          { err: (err as Error).message },
          'state file not updated after envd init; a restart sends /init again',
        );
      });
    } catch (error) {
      admitted?.();
      // A save still writing must not recreate the directory the teardown removes.
      await saves?.settled();
      const failures = sbx ? await sbx.teardown.unwind() : [];
      this.o.node.vmmPool?.refill();
      if (this.sandboxes.get(id) === sbx || this.sandboxes.get(id) === placeholder) this.sandboxes.delete(id);
      if (!sbx) {
        // Failed before the sandbox had anything (unknown template or build): a plain error.
        throw error;
      }
      // The request's fault, found once the VMM read the snapshot: INVALID_ARGUMENT, not a failure.
      if (error instanceof ResourcesMismatch) {
        log.warn({ err: error.message }, 'sandbox create refused; rolled back');
        throw error;
      }
      const failed = new SandboxStepFailed(id, 'create', step, error, describeFailures(failures));
      log.error({ step, err: failed.message }, 'sandbox create failed; rolled back');
      await this.o.records.events.event('failed', id, { step, error: failed.message });
      throw failed;
    }
    await this.o.records.events.publish(this.catalogueEntry(sbx));
    await this.o.records.events.event(config.snapshot ? 'resumed' : 'created', id, { buildId: sbx.build.buildId });
    sbx.startPolling(this.o.node.envd, this.o.settings.healthIntervalMs, this.o.settings.metricsIntervalMs);
    this.watchExit(sbx);
    log.info({ buildId: sbx.build.buildId, hostIp: sbx.hostIp, steps: rounded(timings) }, 'sandbox created');
    // Recorded prefetch: the start is over once envd answers; the faults recorded so far are the
    // set the next pause or checkpoint stores. Sent once the answer is on its way (the call
    // itself costs the create's CPU; the uffd-server also ends recording at a bounded time and
    // at pause).
    const started = sbx;
    setImmediate(() => {
      this.o.node.services.memory.stopRecording(id).catch((err: unknown) => {
        started.log.warn({ err: (err as Error).message }, 'uffd-server did not stop recording the start');
      });
    });
    // The pooled VMM it took is replaced now, not while the create needed the CPU (vmm-pool.ts).
    this.o.node.vmmPool?.refill();
    return sbx;
  }

  /**
   * Steps 2–7 of Create: slot, device, memory, VMM (snapshot load, resume, MMDS), envd init, DNS.
   * What does not depend on anything else runs at once: the slot (or a pooled VMM with its slot),
   * the device and the uffd socket, then the load; the DNS record is set while the VMM loads
   * (the sandbox only answers to its name once the create returns, and a failure takes it
   * back), resume and MMDS go together.
   */
  private async startSandbox(
    sbx: Sandbox,
    saves: BackgroundSaves,
    steps: {
      at: (step: string) => void;
      mark: (step: string) => void;
      side: <T>(name: string, work: Promise<T>) => Promise<T>;
      /** Writes the state file as `running` (behind the caller's back). */
      saveRunning: () => void;
    },
  ): Promise<void> {
    const { at, mark, side } = steps;
    const { slots, devices, memory, names } = this.o.node.services;
    const id = sbx.id;
    const sockets = this.socketPaths(id);
    const killVmm = (vmm: VmmHandle) => async () => {
      await vmm.kill();
      await rm(vmm.apiSocket, { force: true });
    };

    // The two calls to other services go out first: the hand-over below is this process's own
    // work, done while they are under way.
    sbx.teardown.push('device', () => devices.close(id));
    const deviceOpened = side('open rootfs device', devices.open(id, sbx.build.buildId));
    sbx.teardown.push('uffd', async () => {
      try {
        await memory.stop(id);
      } finally {
        await rm(sockets.uffd, { force: true });
      }
    });
    const uffdPrepared = side(
      'prepare uffd',
      this.socketDirMade
        ? memory.prepare(id, sockets.uffd, sbx.build.buildId)
        : this.makeSocketDir().then(() => memory.prepare(id, sockets.uffd, sbx.build.buildId)),
    );
    // A VMM started ahead in a slot of its own (vmm-pool.ts) brings the slot with it.
    const pooled = this.o.node.vmmPool?.take();
    const egress = netEgressPolicy(sbx.config.allowInternetAccess, sbx.config.network?.egress);
    const slotTaken = side(
      pooled ? 'take pooled vmm' : 'acquire network slot',
      (async (): Promise<void> => {
        if (pooled) {
          sbx.slot = pooled.slot;
          sbx.teardown.push('slot', () => slots.release(pooled.slot, true));
          sbx.vmm = pooled.vmm;
          sbx.teardown.push('vmm', killVmm(pooled.vmm));
          if (egress) await slots.setEgress(pooled.slot, egress);
          await pooled.vmm.handOver({
            stdoutPath: join(sbx.dir, 'vmm.stdout.log'),
            stderrPath: join(sbx.dir, 'vmm.stderr.log'),
            logger: sbx.log,
          });
          return;
        }
        const slot = await slots.acquire(id, egress);
        sbx.slot = slot;
        sbx.teardown.push('slot', () => slots.release(slot, true));
      })(),
    );
    const [slotResult, device, uffd] = await Promise.allSettled([slotTaken, deviceOpened, uffdPrepared]);
    const takeSlot = pooled ? 'take pooled vmm' : 'acquire network slot';
    for (const [result, name] of [
      [slotResult, takeSlot],
      [device, 'open rootfs device'],
      [uffd, 'prepare uffd'],
    ] as const) {
      if (result.status === 'rejected') {
        at(name);
        throw result.reason;
      }
    }
    if (device.status !== 'fulfilled') throw new Error('unreachable');
    sbx.device = device.value;
    sbx.memorySocket = sockets.uffd;
    saves.soon();
    mark(`${pooled ? 'take pooled vmm' : 'acquire slot'}, open device, prepare uffd (at once)`);
    const slot = sbx.slot!;

    const rootfsTarget = sbx.device.devicePath || sbx.device.socketPath;
    const rootfsLinkPath = this.rootfsLinkPath(sbx.build.rootfsHeader);
    let vmm: VmmHandle;
    if (pooled) {
      at('link rootfs');
      await pooled.vmm.linkRootfs(rootfsLinkPath, rootfsTarget);
      vmm = pooled.vmm;
      // The VMM now uses the device and the uffd: it goes before them on teardown.
      sbx.teardown.forget('vmm');
      sbx.teardown.push('vmm', killVmm(vmm));
      mark('link rootfs');
    } else {
      at('start vmm');
      vmm = await this.o.node.vmm.launch(
        {
          sandboxId: id,
          apiSocket: sockets.api,
          rootfsLinkPath,
          rootfsTarget,
          namespace: slot.namespace,
          stdoutPath: join(sbx.dir, 'vmm.stdout.log'),
          stderrPath: join(sbx.dir, 'vmm.stderr.log'),
        },
        sbx.log,
      );
      sbx.vmm = vmm;
      sbx.teardown.push('vmm', killVmm(vmm));
      saves.soon();
      mark('start vmm');
    }

    // DESIGN.md §3 step 7's record, set while the VMM loads (the orchestrator waits then anyway).
    // Its teardown entry waits for the set, so a failure at any later step takes it back.
    const dnsIp = slot.hostIp;
    const dnsSet = names.set(id, dnsIp).then(
      () => undefined,
      (error: unknown) => ({ error }),
    );
    sbx.teardown.push('dns', async () => {
      if ((await dnsSet) === undefined) await names.remove(id, dnsIp);
    });

    at('load snapshot');
    await vmm.api.loadSnapshot({
      snapshotPath: sbx.build.snapfilePath,
      backend: { type: 'Uffd', path: sockets.uffd },
      enableDiffSnapshots: true,
      resumeVm: false,
    });
    await this.checkVcpus(sbx, vmm);
    mark('load snapshot');
    // Everything the sandbox holds is in its state now: it is written as `running` while the VM
    // resumes and envd answers (the file says whether envd did: a restart that finds it running
    // adopts it and sends /init again if not). A later failure waits for this save before the
    // teardown removes the directory; the create answers only once it is written.
    steps.saveRunning();
    // Independent calls: Firecracker takes them one after the other, the double at once.
    at('resume vm');
    const resumed = vmm.api.setState('Resumed');
    const mmdsSet = vmm.api.setMmds({
      instanceID: id,
      envID: sbx.config.templateId,
      address: slot.hostIp,
      traceID: '',
      teamID: sbx.config.teamId,
    });
    const [resume, mmds] = await Promise.allSettled([resumed, mmdsSet]);
    if (resume.status === 'rejected') throw resume.reason;
    if (mmds.status === 'rejected') {
      at('set mmds');
      throw mmds.reason;
    }
    mark('resume vm and set mmds');
    at('init envd');
    await this.o.node.envd.init(slot.hostIp, sbx.config.envVars ?? {}, this.o.settings.envdTimeoutMs);
    sbx.envdInitialized = true;
    mark('init envd');
    at('set dns');
    const dns = await dnsSet;
    if (dns) throw dns.error;
    sbx.dnsIp = dnsIp;
    mark('set dns');
  }

  /** The directory of the uffd sockets, made once (prepare listens there on every create). */
  private async makeSocketDir(): Promise<void> {
    await mkdir(this.o.settings.socketDir, { recursive: true });
    this.socketDirMade = true;
  }

  /**
   * The vCPUs are in the VM state (the snapfile), which only the VMM reads: asked of it after the
   * load, before the guest runs. A VMM that does not say (older Firecracker) leaves the request as is.
   */
  private async checkVcpus(sbx: Sandbox, vmm: VmmHandle): Promise<void> {
    const machine = await vmm.api.machineConfig().catch(() => undefined);
    if (!machine) return;
    const requested = sbx.config.vcpu;
    if (requested !== 0 && requested !== machine.vcpuCount) {
      throw new ResourcesMismatch('sandbox.vcpu', requested, machine.vcpuCount, sbx.build.buildId);
    }
    sbx.config.vcpu = machine.vcpuCount;
  }

  /**
   * Snapshots a running sandbox into a new build and keeps it running (E2B's Checkpoint). E2B
   * pauses, snapshots, stops the VM and resumes a new one from the build; here the same VM is
   * resumed in place as soon as its state is on disk: the guest is paused only for the VM
   * snapshot (a Diff: KVM's dirty log, which the snapshot resets, so the next pause or
   * checkpoint writes only what changed since) and the disk export. The memory diff is
   * exported from the snapshot file while the guest runs on. Answers once the build is uploaded.
   */
  async checkpoint(sandboxId: string, newBuildId: string): Promise<SnapshotBuild> {
    if (this.stopping) throw new OrchestratorStopping();
    const sbx = this.get(sandboxId);
    if (sbx.phase !== 'running') throw new SandboxBusy(sandboxId, sbx.phase, 'checkpoint');
    if (sbx.checkpointing) throw new SandboxBusy(sandboxId, 'checkpointing', 'checkpoint');
    if (await this.o.builds.exists(newBuildId)) throw new BuildExists(newBuildId);
    sbx.checkpointing = true;
    try {
      return await this.pauseQueue.run(() => this.checkpointNow(sbx, newBuildId));
    } finally {
      sbx.checkpointing = false;
    }
  }

  private async checkpointNow(sbx: Sandbox, newBuildId: string): Promise<SnapshotBuild> {
    const { memory, devices } = this.o.node.services;
    const id = sbx.id;
    const vmm = sbx.vmm!;
    const timings: StepTimings = {};
    const t0 = performance.now();
    let last = t0;
    const mark = (name: string) => {
      const now = performance.now();
      timings[name] = now - last;
      last = now;
    };
    let step = 'pause vm';
    let staging: string | undefined;
    let paused = false;
    let pausedAt: number;
    const snapshotMemfile = join(sbx.dir, 'memfile.checkpoint');
    try {
      const tracking = await memory.tracking(id).catch(() => 'unknown');
      // With write-protect the uffd-server's tracking is not reset by a checkpoint: the VMM's
      // dirty log (a Diff) is the record that restarts; a 2 MiB guest keeps Full + present pages.
      const vmmDirtyLog =
        !sbx.config.hugePages && (tracking.startsWith('wp') || this.o.settings.pauseMemoryDiff === 'vmm-dirty-log');
      await rm(snapshotMemfile, { force: true });
      staging = await this.o.builds.stageBuild(newBuildId);
      pausedAt = performance.now();
      await vmm.api.setState('Paused');
      paused = true;
      mark(step);
      // While paused, at once: the VM's snapshot and the disk export (the overlay must not
      // change under it; the paused VM has flushed its writes and a snapshot writes no disk).
      const stagingDir = staging;
      const [, disk] = await inParallel(timings, (s) => (step = s), [
        [
          'create snapshot',
          () =>
            vmm.api.createSnapshot({
              type: vmmDirtyLog ? 'Diff' : 'Full',
              snapshotPath: join(stagingDir, 'snapfile'),
              memFilePath: snapshotMemfile,
            }),
        ],
        [
          'export rootfs diff',
          () =>
            devices.export(id, newBuildId, join(stagingDir, 'rootfs.ext4'), {
              keepServing: true,
              ...this.diskDedup(sbx),
            }),
        ],
      ] as const);
      last = performance.now();
      const memoryDiffPath = join(staging, 'memfile');
      const prefetchPath = join(staging, PREFETCH_FILE);
      const exportMemory = () =>
        memory.exportDiff({
          sandboxId: id,
          newBuildId,
          diffPath: memoryDiffPath,
          memfilePath: snapshotMemfile,
          vmmDirtyLog,
          keepServing: true,
          dedup: this.dedupAgainst(sbx),
          prefetchPath,
        });
      let mem: Awaited<ReturnType<typeof memory.exportDiff>> | undefined;
      if (tracking.startsWith('wp')) {
        // Firecracker shared a memfd: the export reads live memory, so it too runs while paused.
        step = 'export memory diff';
        mem = await exportMemory();
        mark(step);
      }
      step = 'resume vm';
      await vmm.api.setState('Resumed');
      paused = false;
      const guestPausedMs = performance.now() - pausedAt;
      mark(step);
      if (!mem) {
        step = 'export memory diff';
        mem = await exportMemory();
        mark(step);
      }
      await rm(snapshotMemfile, { force: true });
      const build = await this.commitSnapshot(
        sbx.build,
        newBuildId,
        staging,
        { memory: mem.mappings, rootfs: disk.mappings },
        {
          begin: (s) => (step = s),
          end: mark,
        },
      );
      staging = undefined;
      // The next pause or checkpoint is a diff over this build.
      sbx.build = build;
      await this.o.records.states.save(sbx.toState());
      mark(step);
      step = 'upload build';
      await this.o.builds.uploadBuild(newBuildId);
      mark(step);
      timings['total'] = performance.now() - t0;
      this.lastCheckpointTimings = { ...timings, guestPaused: guestPausedMs };
      await this.o.records.events.event('checkpointed', id, {
        buildId: newBuildId,
        generation: String(build.memfileHeader.metadata.generation),
      });
      sbx.log.info(
        {
          buildId: newBuildId,
          guestPausedMs: Math.round(guestPausedMs * 100) / 100,
          memoryDiff: {
            tracking: mem.tracking,
            pages: mem.dirtyPages,
            dedupedPages: mem.dedupedPages,
            bytes: mem.diffSize,
          },
          diskDiff: { blocks: disk.dirtyBlocks, dedupedBlocks: disk.dedupedBlocks, bytes: disk.diffSize },
          steps: rounded(timings),
        },
        'sandbox checkpointed',
      );
      return build;
    } catch (error) {
      await rm(snapshotMemfile, { force: true }).catch(() => undefined);
      if (staging) await this.o.builds.discardBuild(newBuildId).catch(() => undefined);
      if (paused && vmm.isAlive()) await vmm.api.setState('Resumed').catch(() => undefined);
      throw new SandboxStepFailed(id, 'checkpoint', step, error);
    }
  }

  /**
   * The uffd-server compares with the build it serves the sandbox from: that is the new build's
   * parent until the first checkpoint, after which the parent is the checkpoint (not served).
   */
  private dedupAgainst(sbx: Sandbox): boolean {
    return (this.o.settings.pauseDedup ?? true) && sbx.build.buildId === sbx.config.buildId;
  }

  /**
   * The block-server reads the parent build itself (its own layers, local after a checkpoint),
   * so disk dedup holds after checkpoints too; it also exports only what changed since the
   * checkpoint that parent is.
   */
  private diskDedup(sbx: Sandbox): { parentBuildId: string; dedup: boolean } {
    return { parentBuildId: sbx.build.buildId, dedup: this.o.settings.pauseDedup ?? true };
  }

  admissionStatus() {
    const running = [...this.sandboxes.values()].filter((s) => s.phase === 'running' && s.config);
    return {
      starting: this.admission.starting,
      waitingToStart: this.admission.waiting,
      maxStarting: this.admission.limit,
      startWaitMs: this.admission.waitMs,
      sandboxes: this.sandboxes.size,
      maxSandboxes: this.o.settings.maxSandboxes,
      runningVcpus: running.reduce((n, s) => n + s.config.vcpu, 0),
      runningRamMb: running.reduce((n, s) => n + s.config.ramMb, 0),
      vmmPoolWaiting: this.o.node.vmmPool?.waiting ?? 0,
      vmmPoolSize: this.o.node.vmmPool?.enabled ? this.o.node.vmmPool.size : 0,
    };
  }

  /**
   * Steps 5–6 of Pause (and of Checkpoint): both diffs merged over the parent's headers, the
   * layers compacted past the generation cap, the staged build committed in place in
   * {cacheDir}/builds, where every service of the node reads it from now on.
   */
  private async commitSnapshot(
    parent: SnapshotBuild,
    newBuildId: string,
    staging: string,
    diffs: { memory: WireMapping[]; rootfs: WireMapping[] },
    steps: { begin: (step: string) => void; end: (step: string) => void },
  ): Promise<SnapshotBuild> {
    steps.begin('write headers');
    let memHeader = nextHeader(parent.memfileHeader, newBuildId, diffs.memory);
    let rootHeader = nextHeader(parent.rootfsHeader, newBuildId, diffs.rootfs);
    steps.end('write headers');
    if (
      layerCount(memHeader) > this.o.settings.generationCap ||
      layerCount(rootHeader) > this.o.settings.generationCap
    ) {
      steps.begin('compact layers');
      memHeader = await compactLayers(memHeader, staging, 'memfile', this.o.builds);
      rootHeader = await compactLayers(rootHeader, staging, 'rootfs.ext4', this.o.builds);
      steps.end('compact layers');
    }
    steps.begin('register build');
    await this.o.builds.commitBuild(newBuildId, { memfile: memHeader, 'rootfs.ext4': rootHeader });
    steps.end('register build');
    return {
      buildId: newBuildId,
      snapfilePath: join(this.o.builds.localDir(newBuildId), 'snapfile'),
      memfileHeader: memHeader,
      rootfsHeader: rootHeader,
    };
  }

  rootfsLinkPath(rootfsHeader: Header): string {
    return join(this.o.settings.vmRootfsDir, rootfsHeader.metadata.baseBuildId, 'rootfs.ext4');
  }

  async delete(sandboxId: string, reason: 'killed' | 'expired' = 'killed'): Promise<void> {
    const sbx = this.get(sandboxId);
    if (sbx.phase !== 'running') throw new SandboxBusy(sandboxId, sbx.phase, 'delete');
    if (sbx.checkpointing) throw new SandboxBusy(sandboxId, 'checkpointing', 'delete');
    await this.stop(sbx, reason);
  }

  /** Removes DNS and the catalogue entry first (no new connections), then the rest in reverse. */
  private async stop(sbx: Sandbox, reason: string): Promise<void> {
    sbx.phase = 'stopping';
    sbx.stopPolling();
    await this.o.records.states.save(sbx.toState()).catch(() => undefined);
    await this.o.records.events.unpublish(sbx.id);
    const failures = await sbx.teardown.unwind();
    this.sandboxes.delete(sbx.id);
    if (failures.length) sbx.log.error({ problems: describeFailures(failures) }, 'sandbox teardown had problems');
    await this.o.records.events.event('killed', sbx.id, { reason });
    sbx.log.info({ reason }, 'sandbox stopped');
  }

  /** Headers and snapfile of a build; one missing from storage is BuildUnavailable (FAILED_PRECONDITION). */
  async resolveBuild(buildId: string): Promise<SnapshotBuild> {
    try {
      return await this.o.builds.resolveSnapshot(buildId);
    } catch (err) {
      if (err instanceof BuildNotFound) throw new BuildUnavailable(buildId, err.message);
      throw err;
    }
  }

  async pause(sandboxId: string, newBuildId: string, templateId?: string): Promise<SnapshotBuild> {
    if (this.stopping) throw new OrchestratorStopping();
    const sbx = this.get(sandboxId);
    if (sbx.phase !== 'running') throw new SandboxBusy(sandboxId, sbx.phase, 'pause');
    if (sbx.checkpointing) throw new SandboxBusy(sandboxId, 'checkpointing', 'pause');
    if (await this.o.builds.exists(newBuildId)) throw new BuildExists(newBuildId);
    sbx.phase = 'pausing';
    return this.pauseQueue.run(() => this.pauseNow(sbx, newBuildId, templateId ?? sbx.config.templateId));
  }

  private async pauseNow(sbx: Sandbox, newBuildId: string, templateId: string): Promise<SnapshotBuild> {
    const { memory, devices, names } = this.o.node.services;
    const id = sbx.id;
    const vmm = sbx.vmm!;
    const timings: StepTimings = {};
    const t0 = performance.now();
    let last = t0;
    const mark = (name: string) => {
      const now = performance.now();
      timings[name] = now - last;
      last = now;
    };
    let step = 'remove dns';
    let sourcingStopped = false;
    let snapshotType: 'Full' | 'Diff' | undefined;
    let staging: string | undefined;
    try {
      sbx.stopPolling();
      await this.o.records.states.save(sbx.toState());
      if (sbx.dnsIp) await names.remove(id, sbx.dnsIp);
      sbx.teardown.forget('dns');
      await this.o.records.events.unpublish(id);
      mark(step);
      step = 'pause vm';
      await vmm.api.setState('Paused');
      mark(step);
      // The VM was loaded with dirty tracking, so a Diff snapshot holds the pages written since
      // load. With uffd write-protect (E2B's fork) the uffd-server knows them too and reads
      // them from it. Without (upstream Firecracker) the Diff is the only exact record: the
      // uffd-server takes its data extents as the written pages (vmm_dirty_log) instead of
      // every page it installed. Firecracker logs dirty memory in 4 KiB pages, so a 2 MiB
      // guest without a memfd keeps the Full snapshot and every present page.
      const trackingBefore = await memory.tracking(id).catch(() => 'unknown');
      const fullMemfile = join(sbx.dir, 'memfile.full');
      staging = await this.o.builds.stageBuild(newBuildId);
      // A Diff lands on an existing file (Firecracker's diff-onto-base): start from none.
      await rm(fullMemfile, { force: true });
      const stagingDir = staging;
      const snapshot = (type: 'Full' | 'Diff') =>
        vmm.api.createSnapshot({ type, snapshotPath: join(stagingDir, 'snapfile'), memFilePath: fullMemfile });
      const vmmDirtyLogOf = (tracking: string) =>
        !tracking.startsWith('wp') && this.o.settings.pauseMemoryDiff === 'vmm-dirty-log' && !sbx.config.hugePages;
      let tracking = trackingBefore;
      sourcingStopped = true;
      if (trackingBefore === 'present' && vmmDirtyLogOf(trackingBefore)) {
        // Upstream Firecracker: the Diff (KVM's dirty log) reads only written pages, which are
        // present (no fault to serve), and the uffd-server's own record is not used for the
        // diff: stop-sourcing and the snapshot at once.
        snapshotType = 'Diff';
        await inParallel(timings, (s) => (step = s), [
          ['stop uffd sourcing', () => memory.stopSourcing(id)],
          ['create snapshot', () => snapshot('Diff')],
        ] as const);
        last = performance.now();
      } else {
        step = 'stop uffd sourcing';
        await memory.stopSourcing(id);
        mark(step);
        step = 'create snapshot';
        // Asked after stop-sourcing: a failed write-protect scan there falls back to 'present'.
        tracking = await memory.tracking(id).catch(() => 'unknown');
        snapshotType = tracking.startsWith('wp') || vmmDirtyLogOf(tracking) ? 'Diff' : 'Full';
        await snapshot(snapshotType);
        mark(step);
      }
      const vmmDirtyLog = vmmDirtyLogOf(tracking);
      // The written pages are fixed now (stop-sourcing, the VMM's Diff) and the uffd-server holds
      // the memfd or reads the snapshot file: the memory diff is written while the VMM stops and
      // the disk is exported (the disk export waits for the VMM to let go of the device).
      // What each export used is given back as soon as it is done with (a failure there is
      // reported with the rest of the teardown, as before, and does not fail the pause).
      const releaseFailures: TeardownFailure[] = [];
      const releaseEarly = (name: string) =>
        sbx.teardown.release(name).catch((error: unknown) => void releaseFailures.push({ name, error }));
      const [mem, disk] = await inParallel(timings, (s) => (step = s), [
        [
          'export memory diff',
          async () => {
            const exported = await memory.exportDiff({
              sandboxId: id,
              newBuildId,
              diffPath: join(stagingDir, 'memfile'),
              memfilePath: fullMemfile,
              vmmDirtyLog,
              dedup: this.dedupAgainst(sbx),
              prefetchPath: join(stagingDir, PREFETCH_FILE),
            });
            await rm(fullMemfile, { force: true });
            await releaseEarly('uffd');
            return exported;
          },
        ],
        [
          'stop vmm, export rootfs diff',
          async () => {
            await sbx.teardown.release('vmm');
            const exported = await devices.export(id, newBuildId, join(stagingDir, 'rootfs.ext4'), this.diskDedup(sbx));
            await Promise.all([releaseEarly('device'), releaseEarly('slot')]);
            return exported;
          },
        ],
      ] as const);
      last = performance.now();
      const build = await this.commitSnapshot(
        sbx.build,
        newBuildId,
        staging,
        { memory: mem.mappings, rootfs: disk.mappings },
        {
          begin: (s) => (step = s),
          end: mark,
        },
      );
      staging = undefined;
      step = 'release resources';
      const failures = [...releaseFailures, ...(await sbx.teardown.unwind())];
      this.sandboxes.delete(id);
      if (failures.length) sbx.log.warn({ problems: describeFailures(failures) }, 'pause teardown had problems');
      mark(step);
      timings['total'] = performance.now() - t0;
      this.lastPauseTimings = timings;
      this.o.builds.startUpload(newBuildId);
      await this.o.records.events.event('paused', id, {
        buildId: newBuildId,
        templateId,
        generation: String(build.memfileHeader.metadata.generation),
      });
      sbx.log.info(
        {
          buildId: newBuildId,
          generation: build.memfileHeader.metadata.generation,
          snapshotType,
          memoryDiff: {
            tracking: mem.tracking,
            pages: mem.dirtyPages,
            zeroPages: mem.zeroPages,
            dedupedPages: mem.dedupedPages,
            bytes: mem.diffSize,
          },
          diskDiff: {
            blocks: disk.dirtyBlocks,
            zeroBlocks: disk.zeroBlocks,
            dedupedBlocks: disk.dedupedBlocks,
            bytes: disk.diffSize,
          },
          steps: rounded(timings),
        },
        'sandbox paused',
      );
      return build;
    } catch (error) {
      if (staging) await this.o.builds.discardBuild(newBuildId).catch(() => undefined);
      if (!sourcingStopped && vmm.isAlive()) {
        // Nothing irreversible happened yet: the guest keeps running as before.
        await vmm.api.setState('Resumed').catch(() => undefined);
        if (sbx.dnsIp) {
          const ip = sbx.dnsIp;
          await names.set(id, ip).catch(() => undefined);
          if (!sbx.teardown.has('dns')) sbx.teardown.push('dns', () => names.remove(id, ip));
        }
        sbx.phase = 'running';
        await this.o.records.states.save(sbx.toState()).catch(() => undefined);
        await this.o.records.events.publish(this.catalogueEntry(sbx));
        sbx.startPolling(this.o.node.envd, this.o.settings.healthIntervalMs, this.o.settings.metricsIntervalMs);
        throw new SandboxStepFailed(id, 'pause', step, error);
      }
      // Past StopSourcing a fault gets a zero page: the sandbox cannot safely run on.
      const failures = await sbx.teardown.unwind();
      this.sandboxes.delete(id);
      const failed = new SandboxStepFailed(id, 'pause', step, error, describeFailures(failures));
      sbx.log.error({ step, err: failed.message }, 'sandbox pause failed; sandbox removed');
      await this.o.records.events.event('failed', id, { step, error: failed.message });
      throw failed;
    }
  }

  private catalogueEntry(sbx: Sandbox) {
    return {
      sandboxId: sbx.id,
      nodeId: this.o.settings.nodeId,
      templateId: sbx.config.templateId,
      buildId: sbx.build.buildId,
      hostIp: sbx.hostIp,
      guestIp: sbx.slot?.guestIp ?? '',
      startTime: sbx.startTime,
      endTime: sbx.endTime,
    };
  }

  /** A VMM that dies on its own takes its sandbox with it: full cleanup and a `failed` event. */
  watchExit(sbx: Sandbox): void {
    const vmm = sbx.vmm;
    if (!vmm) return;
    void vmm.exited.then((how) => this.fail(sbx, 'vmm', `vmm ${how}`));
  }

  /**
   * A running sandbox that cannot go on (its VMM died, or a node service lost its memory or
   * device): full cleanup and a `failed` event. A no-op once it is no longer running.
   */
  async fail(sbx: Sandbox, step: string, error: string): Promise<void> {
    if (this.sandboxes.get(sbx.id) !== sbx || sbx.phase !== 'running') return;
    sbx.log.error({ step, err: error }, 'sandbox cannot go on; cleaning it up');
    sbx.phase = 'stopping';
    sbx.stopPolling();
    await this.o.records.events.unpublish(sbx.id);
    const failures = await sbx.teardown.unwind();
    this.sandboxes.delete(sbx.id);
    if (failures.length) sbx.log.error({ problems: describeFailures(failures) }, 'sandbox teardown had problems');
    await this.o.records.events.event('failed', sbx.id, { step, error });
  }

  /** Kills (or pauses, with auto_pause) every running sandbox past its end time. */
  async enforceEndTimes(now = Date.now()): Promise<void> {
    for (const sbx of [...this.sandboxes.values()]) {
      if (sbx.phase !== 'running' || sbx.checkpointing || sbx.endTime.getTime() > now) continue;
      try {
        if (sbx.config.autoPause) {
          sbx.log.info('end time reached; auto-pausing');
          await this.pause(sbx.id, crypto.randomUUID());
        } else {
          sbx.log.info('end time reached; killing');
          await this.delete(sbx.id, 'expired');
        }
      } catch (err) {
        sbx.log.error({ err: (err as Error).message }, 'end-time enforcement failed');
      }
    }
  }

  /** Adds a sandbox found running by the restart reconciler. */
  adopt(sbx: Sandbox): void {
    this.sandboxes.set(sbx.id, sbx);
    sbx.startPolling(this.o.node.envd, this.o.settings.healthIntervalMs, this.o.settings.metricsIntervalMs);
    this.watchExit(sbx);
  }

  async shutdown(mode: 'kill' | 'keep'): Promise<void> {
    this.stopping = true;
    if (this.endTimer) clearInterval(this.endTimer);
    const all = [...this.sandboxes.values()];
    for (const sbx of all) sbx.stopPolling();
    if (mode === 'kill') {
      await Promise.allSettled(all.filter((s) => s.phase === 'running').map((s) => this.stop(s, 'node shutdown')));
    }
  }
}

/**
 * A snapshot fixes the guest's memory: its size is the memfile's. A request's ram_mb must equal
 * it (wrenn: snapshot templates lock memory to the baked-in value); 0 takes it.
 */
function memoryOfBuild(build: SnapshotBuild, requestedMb: number): number {
  const mb = Math.ceil(build.memfileHeader.metadata.size / 2 ** 20);
  if (requestedMb !== 0 && requestedMb !== mb) {
    throw new ResourcesMismatch('sandbox.ram_mb', requestedMb, mb, build.buildId);
  }
  return mb;
}

/** Step timings in ms with two decimals, for the log line each create and pause ends with. */
/**
 * Runs independent steps at once; each one's time goes into `timings` under its name. Waits
 * for all of them even when one fails (nothing may still run when the caller unwinds), then
 * throws the first failure with `failed` told its step.
 */
async function inParallel<T extends readonly (readonly [string, () => Promise<unknown>])[]>(
  timings: StepTimings,
  failed: (step: string) => void,
  steps: T,
): Promise<{ -readonly [K in keyof T]: Awaited<ReturnType<T[K][1]>> }> {
  const settled = await Promise.allSettled(
    steps.map(async ([name, run]) => {
      const t0 = performance.now();
      try {
        return await run();
      } finally {
        timings[name] = performance.now() - t0;
      }
    }),
  );
  const i = settled.findIndex((r) => r.status === 'rejected');
  if (i >= 0) {
    failed(steps[i]![0]);
    throw (settled[i] as PromiseRejectedResult).reason;
  }
  return settled.map((r) => (r as PromiseFulfilledResult<unknown>).value) as {
    -readonly [K in keyof T]: Awaited<ReturnType<T[K][1]>>;
  };
}

function rounded(timings: StepTimings): StepTimings {
  return Object.fromEntries(Object.entries(timings).map(([k, v]) => [k, Math.round(v * 100) / 100]));
}

/** The header of a new generation: the diff's mappings merged over the parent's (new wins). */
export function nextHeader(parent: Header, newBuildId: string, diff: WireMapping[]): Header {
  const mapped: BuildMapping[] = diff.map((m) => ({
    offset: m.offset,
    length: m.length,
    buildId: m.buildId || NIL_UUID,
    buildStorageOffset: m.buildStorageOffset,
  }));
  return {
    metadata: {
      ...parent.metadata,
      version: Math.max(parent.metadata.version, 1),
      generation: parent.metadata.generation + 1,
      buildId: newBuildId,
    },
    mappings: mergeMappings(parent.mappings, mapped),
  };
}
