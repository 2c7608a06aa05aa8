import { readFile, writeFile } from 'node:fs/promises';
import type { Logger } from '#logging';
import { VmmFailure, osErrorText } from './api-error.js';
import type { CreateSnapshotParams, DriveConfig, MachineConfig, NetworkInterfaceConfig } from './api-request.js';
import { bootSeed } from './boot-image.js';
import { EnvdServer, type GuestView } from './envd-server.js';
import { openGuestDisk, type GuestDisk } from './guest-disk.js';
import { GuestMemory, type MemoryBacking, type PageSizeSpelling, type WriteProtectMode } from './guest-memory.js';
import { GuestNetwork } from './guest-network.js';
import type { PreparedNetwork } from './prepared-network.js';
import { StepTimings } from './step-timings.js';
import {
  SNAPFILE_FORMAT,
  SNAPFILE_VERSION,
  decodeSnapfile,
  encodeSnapfile,
  memoryBytes,
  type Snapfile,
} from './snapfile.js';

const PAUSE_DRAIN_MS = 5000;

/** Settings from the command line that shape every microVM this process runs. */
export interface MicrovmSettings {
  logger: Logger;
  /** Listen on this loopback address instead of inside a slot (tests without net-agent). */
  guestListen: { host: string; port: number } | undefined;
  /** The guest's address and prefix when the snapfile does not say (cold boot). */
  guestAddress: string;
  guestPrefixLength: number;
  /** The slot side of the guest link (net-agent's tap address), e.g. 169.254.0.22/30. */
  tapCidr: string;
  shareMemfd: boolean;
  uffdWriteProtect: WriteProtectMode;
  uffdPageSizeSpelling: PageSizeSpelling;
  nbdExportName: string;
  /** The guest link plumbed while the VMM waited for a load (prepared-network.ts). */
  preparedNetwork?: PreparedNetwork | undefined;
}

export interface BootResources {
  machine: MachineConfig;
  bootSource: { kernelImagePath: string; bootArgs?: string; initrdPath?: string } | undefined;
  drives: DriveConfig[];
  networkInterfaces: NetworkInterfaceConfig[];
}

export interface LoadParams {
  snapshotPath: string;
  backendType: 'Uffd' | 'File';
  backendPath: string;
  enableDiffSnapshots: boolean;
  networkOverrides: { ifaceId: string; hostDevName: string }[];
}

/**
 * A running (or paused) microVM: its memory, drives, network and guest agent. Every resource
 * is pushed on a teardown stack as it is taken, and `close` (also after a failure half-way
 * through building) releases them in reverse.
 */
export class Microvm implements GuestView {
  state: 'Running' | 'Paused' = 'Paused';
  readonly envVars: Record<string, string>;
  mmdsValue: unknown = null;
  private readonly teardown: { what: string; release: () => Promise<void> | void }[] = [];
  private resumeWaiters: (() => void)[] = [];
  private inFlight = 0;
  private drained: (() => void) | undefined;
  private closed = false;
  memory!: GuestMemory;
  readonly drives = new Map<string, GuestDisk>();
  rootDriveId: string | undefined;
  envd: EnvdServer | undefined;
  /** Of the snapshot load that made this VM (logged with 'snapshot loaded'). */
  loadSteps: StepTimings | undefined;

  private constructor(
    private readonly settings: MicrovmSettings,
    readonly config: Omit<Snapfile, 'createdAt' | 'mmds' | 'envVars' | 'format' | 'version'>,
    envVars: Record<string, string>,
  ) {
    this.envVars = { ...envVars };
  }

  get vcpuCount(): number {
    return this.config.vcpuCount;
  }

  get memSizeMib(): number {
    return this.config.memSizeMib;
  }

  get trackDirtyPages(): boolean {
    return this.memory.dirty !== undefined;
  }

  mmds(): unknown {
    return this.mmdsValue;
  }

  /** Firecracker's restore_from_snapshot: the VM comes up paused. */
  static async load(params: LoadParams, settings: MicrovmSettings, stop?: AbortSignal): Promise<Microvm> {
    const steps = new StepTimings();
    let bytes: Buffer;
    try {
      bytes = await readFile(params.snapshotPath);
    } catch (err) {
      throw new VmmFailure(
        'SNAPFILE_OPEN',
        `Failed to restore from snapshot: Failed to get snapshot state from file: Failed to open snapshot file: ${osErrorText(err)}`,
        { path: params.snapshotPath },
      );
    }
    let snapfile: Snapfile;
    try {
      snapfile = decodeSnapfile(bytes, params.snapshotPath);
    } catch (err) {
      throw new VmmFailure(
        'SNAPFILE_INVALID',
        `Failed to restore from snapshot: Failed to get snapshot state from file: Failed to load snapshot state from file: ${(err as Error).message}`,
      );
    }
    const networkInterfaces = snapfile.networkInterfaces.map((n) => ({ ...n }));
    for (const o of params.networkOverrides) {
      const nic = networkInterfaces.find((n) => n.ifaceId === o.ifaceId);
      if (!nic)
        throw new VmmFailure(
          'UNKNOWN_NIC',
          'Failed to restore from snapshot: Failed to get snapshot state from file: Unknown Network Device.',
        );
      nic.hostDevName = o.hostDevName;
    }
    if (params.backendType === 'File' && snapfile.pageSize !== 4096) {
      throw new VmmFailure(
        'HUGETLBFS_FILE_BACKEND',
        'Failed to restore from snapshot: Failed to load guest memory: Error creating guest memory from file: Cannot restore hugetlbfs backed snapshot by mapping the memory file. Please use uffd.',
      );
    }
    const { createdAt: _c, mmds: _m, envVars, format: _f, version: _v, ...config } = snapfile;
    const vm = new Microvm(settings, { ...config, networkInterfaces }, envVars);
    vm.loadSteps = steps;
    steps.mark('read snapfile');
    const backing: MemoryBacking =
      params.backendType === 'Uffd'
        ? {
            kind: 'uffd',
            socketPath: params.backendPath,
            shareMemfd: settings.shareMemfd,
            writeProtect: settings.uffdWriteProtect,
            pageSizeSpelling: settings.uffdPageSizeSpelling,
          }
        : { kind: 'file', path: params.backendPath };
    // Firecracker touches guest memory before the load answers (restoreWrite): done as soon as
    // the memory is handed over, while the drives and the link are still being taken. A VMM told
    // to stop while that write waits for a fault nobody serves gives everything back instead.
    const abandon = () => void vm.close().catch(() => undefined);
    if (stop?.aborted) abandon();
    stop?.addEventListener('abort', abandon);
    try {
      await vm.build(backing, params.enableDiffSnapshots, 'Failed to restore from snapshot', async (memory) => {
        const startedAt = performance.now();
        try {
          await memory.restoreWrite();
        } catch (err) {
          throw new VmmFailure(
            'RESTORE_WRITE',
            `Failed to restore from snapshot: Failed to load guest memory: ${(err as Error).message}`,
          );
        }
        steps.record('(side by side) restore write', startedAt);
      });
    } finally {
      stop?.removeEventListener('abort', abandon);
    }
    return vm;
  }

  /** Cold boot for template builds: a deterministic memory image instead of a kernel. */
  static async boot(resources: BootResources, settings: MicrovmSettings): Promise<Microvm> {
    const { machine } = resources;
    const config: Microvm['config'] = {
      memSizeMib: machine.memSizeMib,
      pageSize: machine.hugePages === '2M' ? 2 * 1024 * 1024 : 4096,
      vcpuCount: machine.vcpuCount,
      smt: machine.smt,
      bootSeed: bootSeed(machine),
      bootSource: resources.bootSource,
      drives: resources.drives,
      networkInterfaces: resources.networkInterfaces,
      guestNetwork: {
        address: settings.guestAddress,
        prefixLength: settings.guestPrefixLength,
        gateway: settings.tapCidr.split('/')[0] ?? '',
      },
    };
    const vm = new Microvm(settings, config, {});
    await vm.build({ kind: 'boot', shareMemfd: settings.shareMemfd }, machine.trackDirtyPages, 'Start microvm error');
    await vm.memory.boot(config.bootSeed);
    vm.state = 'Running';
    return vm;
  }

  /**
   * Memory (with the uffd handshake), drives and network do not depend on each other: they are
   * taken at once (a load waited on each of the uffd-server, the block-server and the link in
   * turn). Each goes on the teardown stack the moment it is taken; after a failure every branch
   * is waited for before everything is given back, so nothing is taken after the teardown.
   */
  private async build(
    backing: MemoryBacking,
    trackDirtyPages: boolean,
    context: string,
    /** Runs on the memory as soon as it is there, alongside the drives and the network. */
    withMemory?: (memory: GuestMemory) => Promise<void>,
  ): Promise<void> {
    const logger = this.settings.logger;
    try {
      const startedAt = performance.now();
      // Started in the order they wait longest (the drives' NBD handshake first): the memory's
      // own syscalls run before its first await.
      const drives = Promise.all(this.config.drives.map((drive) => this.openDrive(drive, startedAt)));
      const network = this.attachNetwork().then((attached) => this.startEnvd(attached, startedAt));
      const memory = (async () => {
        const opened = await GuestMemory.open({
          sizeBytes: memoryBytes(this.config),
          pageSize: this.config.pageSize,
          backing,
          trackDirtyPages,
          logger,
        });
        this.memory = opened;
        this.hold('memory', () => opened.close());
        this.loadSteps?.record('(side by side) memory and uffd handshake', startedAt);
        await withMemory?.(opened);
      })();
      const taken = await Promise.allSettled([memory, drives, network]);
      this.loadSteps?.mark(
        withMemory ? 'memory (and restore write), drives, network and envd' : 'memory, drives, network and envd',
      );
      for (const t of taken) if (t.status === 'rejected') throw t.reason;
      this.rootDriveId = this.config.drives.find((d) => d.isRootDevice)?.driveId ?? this.config.drives[0]?.driveId;
    } catch (err) {
      await this.close().catch(() => undefined);
      const message = (err as Error).message;
      throw new VmmFailure(
        (err as { code?: string }).code ?? 'BUILD',
        message.startsWith(context) ? message : `${context}: ${message}`,
      );
    }
  }

  private async openDrive(drive: DriveConfig, startedAt: number): Promise<void> {
    const logger = this.settings.logger;
    let disk: GuestDisk;
    try {
      disk = await openGuestDisk(drive.pathOnHost, {
        readOnly: drive.isReadOnly,
        nbdExportName: this.settings.nbdExportName,
        logger,
      });
    } catch (err) {
      throw new VmmFailure(
        'DRIVE_OPEN',
        `VirtioBlock: Error manipulating the backing file: ${(err as Error).message} ${drive.pathOnHost}`,
        { driveId: drive.driveId, path: drive.pathOnHost },
      );
    }
    this.drives.set(drive.driveId, disk);
    this.hold(`drive ${drive.driveId}`, async () => {
      // What the guest wrote is on the device before the VMM lets go of it.
      if (!disk.readOnly) await disk.flush().catch((err: unknown) => logger.warn({ err }, 'final drive flush failed'));
      await disk.close();
    });
    this.loadSteps?.record(`(side by side) drive ${drive.driveId}`, startedAt);
    logger.info({ driveId: drive.driveId, path: drive.pathOnHost, kind: disk.kind, size: disk.size }, 'drive opened');
  }

  /** The guest agent on the guest link (or on --guest-listen); none without either. */
  private async startEnvd(network: GuestNetwork | undefined, startedAt: number): Promise<void> {
    const logger = this.settings.logger;
    if (!network && !this.settings.guestListen) {
      logger.warn('the VM has no network interface and no --guest-listen: the guest agent is unreachable');
      return;
    }
    const envd = await EnvdServer.start({
      guest: this,
      logger,
      ...(network ? { netns: network.netns } : {}),
      ...(this.settings.guestListen ? { listen: this.settings.guestListen } : {}),
    });
    this.envd = envd;
    this.hold('envd', () => envd.close());
    logger.info({ address: envd.address() }, 'guest agent (envd) listening');
    this.loadSteps?.record('(side by side) network and envd', startedAt);
  }

  /** The guest link in the slot (taken over from the one prepared while waiting, when it matches). */
  private async attachNetwork(): Promise<GuestNetwork | undefined> {
    const nic = this.config.networkInterfaces[0];
    if (this.settings.guestListen || !nic) return undefined;
    const wanted = {
      tapName: nic.hostDevName,
      tapCidr: this.settings.tapCidr,
      guestAddress: this.config.guestNetwork.address,
      guestPrefixLength: this.config.guestNetwork.prefixLength,
      logger: this.settings.logger,
    };
    const network = (await this.settings.preparedNetwork?.take(wanted)) ?? (await GuestNetwork.attach(wanted));
    this.hold('network', () => network.close());
    return network;
  }

  /**
   * Puts a resource just taken on the teardown stack; when the VM was closed meanwhile (a stop
   * while other parts were still being taken) it is given back at once.
   */
  private hold(what: string, release: () => Promise<void> | void): void {
    if (!this.closed) {
      this.teardown.push({ what, release });
      return;
    }
    void (async () => release())().catch((err: unknown) =>
      this.settings.logger.error({ err, step: what }, 'giving back a resource taken after close failed'),
    );
  }

  /** Runs a guest request once the VM runs; pause waits for the requests already running. */
  async whileRunning<T>(fn: () => Promise<T>): Promise<T> {
    while (this.state !== 'Running') {
      if (this.closed) throw new VmmFailure('VM_CLOSED', 'the VM is gone');
      await new Promise<void>((resolve) => this.resumeWaiters.push(resolve));
    }
    this.inFlight++;
    try {
      return await fn();
    } finally {
      this.inFlight--;
      if (this.inFlight === 0) this.drained?.();
    }
  }

  async pause(): Promise<void> {
    if (this.state === 'Paused') return;
    this.state = 'Paused';
    if (this.inFlight > 0) {
      // A vCPU stuck in a fault nobody serves must not wedge the API: Firecracker kicks such a
      // vCPU out of the fault and pauses it; here the request stays stuck and the VM pauses.
      const drained = new Promise<boolean>((resolve) => (this.drained = () => resolve(true)));
      const timedOut = new Promise<boolean>((resolve) => setTimeout(() => resolve(false), PAUSE_DRAIN_MS).unref());
      if (!(await Promise.race([drained, timedOut]))) {
        this.settings.logger.warn(
          { inFlight: this.inFlight },
          'pausing with guest requests still stuck in memory faults',
        );
      }
    }
    this.drained = undefined;
    await this.flushDrives();
  }

  resume(): void {
    if (this.state === 'Running') return;
    this.state = 'Running';
    const waiters = this.resumeWaiters;
    this.resumeWaiters = [];
    for (const w of waiters) w();
  }

  async flushDrives(): Promise<void> {
    for (const disk of this.drives.values()) if (!disk.readOnly) await disk.flush();
  }

  async createSnapshot(params: CreateSnapshotParams): Promise<void> {
    const snapfile: Snapfile = {
      format: SNAPFILE_FORMAT,
      version: SNAPFILE_VERSION,
      ...this.config,
      mmds: this.mmdsValue ?? undefined,
      envVars: this.envVars,
      createdAt: new Date().toISOString(),
    };
    try {
      await writeFile(params.snapshotPath, encodeSnapfile(snapfile));
    } catch (err) {
      throw new VmmFailure(
        'SNAPFILE_WRITE',
        `Create snapshot error: Cannot perform open on the snapshot backing file: ${osErrorText(err)}`,
        { path: params.snapshotPath },
      );
    }
    try {
      const written = await this.memory.dump(params.memFilePath, params.snapshotType);
      this.settings.logger.info(
        { type: params.snapshotType, memFile: params.memFilePath, bytesWritten: written },
        'snapshot memory written',
      );
    } catch (err) {
      throw new VmmFailure(
        'MEMFILE_WRITE',
        `Create snapshot error: Cannot write memory file: ${(err as Error).message}`,
        {
          path: params.memFilePath,
        },
      );
    }
    await this.flushDrives();
  }

  /** Releases everything this VM took, in reverse order. Idempotent. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const waiters = this.resumeWaiters;
    this.resumeWaiters = [];
    for (const w of waiters) w();
    const errors: unknown[] = [];
    for (const step of this.teardown.reverse()) {
      try {
        await step.release();
      } catch (err) {
        errors.push(err);
        this.settings.logger.error({ err, step: step.what }, 'teardown step failed');
      }
    }
    this.teardown.length = 0;
    if (errors.length > 0) throw errors[0];
  }
}
