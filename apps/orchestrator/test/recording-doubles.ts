import { mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { createLogger, type Logger } from '#logging';
import { baseMappings, BuildStore, encodeHeader, LocalBackend, type Header } from '#storage';
import type { SandboxConfig } from '#proto/orchestrator';
import { BlockDevice, BlockExportResponse } from '#proto/sbx/block';
import { NetSlot, type NetEgressPolicy } from '#proto/sbx/net';
import { UffdExportDiffResponse, UffdPrepareResponse } from '#proto/sbx/uffd';
import type { EnvdClient } from '../src/envd-client.js';
import type { FirecrackerApi } from '../src/firecracker-api.js';
import type { CatalogueEntry, LifecycleEvents, LifecycleEventType } from '../src/lifecycle-events.js';
import type { MemoryDiffExport, NodeServices } from '../src/node-services.js';
import { EnvdInitTimeout, VmmApiError, VmmExited } from '../src/orchestrator-errors.js';
import { SandboxManager } from '../src/sandbox-manager.js';
import { SandboxStateStore } from '../src/sandbox-state-store.js';
import { TemplateCatalogue } from '../src/template-catalogue.js';
import type { VmmHandle, VmmLauncher } from '../src/vmm-launcher.js';

/*
 * Recording doubles of the four node services, the VMM and envd for the orchestrator's unit
 * tests: each keeps the set of resources it handed out, so a test can inject a failure at any
 * step and check that everything taken was given back. The same flows run against the real
 * services in test/orchestrator-e2e.test.ts.
 */

export const PAGE = 4096;
export const MEM_PAGES = 16;
export const BASE = '11111111-1111-4111-8111-111111111111';
export const logger = createLogger({ service: 'orchestrator-test', level: 'silent' });

export type Step =
  | 'acquire'
  | 'open'
  | 'prepare'
  | 'launch'
  | 'loadSnapshot'
  | 'setState'
  | 'envd'
  | 'dns'
  | 'createSnapshot'
  | 'exportDiff';

export class RecordingNode implements NodeServices {
  failAt: Step | undefined;
  nextIdx = 1;
  readonly slotsInUse = new Map<string, NetSlot>();
  readonly devicesOpen = new Set<string>();
  readonly servings = new Set<string>();
  readonly records = new Map<string, string>();
  exportPage = 0;

  private check(step: Step): void {
    if (this.failAt === step) throw new Error(`injected failure at ${step}`);
  }

  /** Every SetEgress the orchestrator made, in order. */
  readonly egressSets: Array<{ idx: number; egress: NetEgressPolicy | undefined }> = [];

  slots = {
    setEgress: async (slot: NetSlot, egress: NetEgressPolicy | undefined): Promise<void> => {
      this.egressSets.push({ idx: slot.idx, egress });
    },
    acquire: async (sandboxId: string, egress?: NetEgressPolicy): Promise<NetSlot> => {
      this.check('acquire');
      const idx = this.nextIdx++;
      if (egress) this.egressSets.push({ idx, egress });
      const slot = NetSlot.fromPartial({
        idx,
        sandboxId,
        namespace: `ns-${idx}`,
        hostVeth: '',
        nsVeth: '',
        hostVethIp: '',
        nsVethIp: '',
        tapName: 'tap0',
        tapIp: '169.254.0.22',
        tapPrefix: 30,
        guestIp: '169.254.0.21',
        hostIp: `10.11.0.${idx}`,
      });
      this.slotsInUse.set(sandboxId, slot);
      return slot;
    },
    release: async (slot: NetSlot) => {
      this.slotsInUse.delete(slot.sandboxId);
    },
    list: async () => [...this.slotsInUse.values()],
  };

  devices = {
    open: async (sandboxId: string, buildId: string): Promise<BlockDevice> => {
      this.check('open');
      this.devicesOpen.add(sandboxId);
      return {
        sandboxId,
        buildId,
        socketPath: `/tmp/${sandboxId}.nbd`,
        devicePath: '',
        size: 8 * PAGE,
        blockSize: PAGE,
        exportName: '',
      };
    },
    export: async (_id: string, newBuildId: string, diffPath: string): Promise<BlockExportResponse> => {
      await writeFile(diffPath, Buffer.alloc(PAGE, 0x60 + this.exportPage));
      return BlockExportResponse.fromPartial({
        mappings: [{ offset: (this.exportPage % 8) * PAGE, length: PAGE, buildId: newBuildId, buildStorageOffset: 0 }],
        diffSize: PAGE,
        dirtyBlocks: 1,
        blockSize: PAGE,
        size: 8 * PAGE,
      });
    },
    close: async (sandboxId: string) => {
      this.devicesOpen.delete(sandboxId);
    },
    list: async (): Promise<BlockDevice[]> =>
      [...this.devicesOpen].map((sandboxId) =>
        BlockDevice.fromPartial({ sandboxId, socketPath: `/tmp/${sandboxId}.nbd`, size: 8 * PAGE, blockSize: PAGE }),
      ),
  };

  memory = {
    prepare: async (sandboxId: string, socketPath: string) => {
      this.check('prepare');
      this.servings.add(sandboxId);
      return UffdPrepareResponse.fromPartial({ socketPath, memorySize: MEM_PAGES * PAGE });
    },
    stopSourcing: async () => {},
    stopRecording: async () => {},
    tracking: async () => 'present',
    exportDiff: async ({ newBuildId, diffPath }: MemoryDiffExport): Promise<UffdExportDiffResponse> => {
      this.check('exportDiff');
      // Each pause dirties page `exportPage` (with its own byte) and page 0.
      const page = (this.exportPage % (MEM_PAGES - 1)) + 1;
      const fill = 0x10 + this.exportPage;
      await writeFile(diffPath, Buffer.concat([Buffer.alloc(PAGE, fill), Buffer.alloc(PAGE, fill + 0x80)]));
      this.exportPage++;
      return UffdExportDiffResponse.fromPartial({
        mappings: [
          { offset: 0, length: PAGE, buildId: newBuildId, buildStorageOffset: 0 },
          { offset: page * PAGE, length: PAGE, buildId: newBuildId, buildStorageOffset: PAGE },
        ],
        diffSize: 2 * PAGE,
        dirtyPages: 2,
        zeroPages: 0,
        pageSize: PAGE,
        memorySize: MEM_PAGES * PAGE,
        tracking: 'present',
      });
    },
    stop: async (sandboxId: string) => {
      this.servings.delete(sandboxId);
    },
    list: async () => [...this.servings].map((sandboxId) => ({ sandboxId, state: 'serving', error: '' })),
  };

  names = {
    set: async (name: string, ip: string) => {
      this.check('dns');
      this.records.set(name, ip);
    },
    remove: async (name: string, ip: string) => {
      if (this.records.get(name) === ip) this.records.delete(name);
    },
    list: async () => [...this.records].map(([name, ip]) => ({ name, ip })),
  };
}

export class RecordingVmm implements VmmLauncher {
  readonly description = 'recording VMM double';
  readonly isDouble = true;
  readonly running = new Set<string>();
  constructor(private readonly node: RecordingNode) {}

  async launch(spec: { sandboxId: string; apiSocket: string }): Promise<VmmHandle> {
    if (this.node.failAt === 'launch') throw new VmmExited(spec.sandboxId, 'exited while starting: code 1');
    this.running.add(spec.sandboxId);
    return this.handle(spec.sandboxId, spec.apiSocket);
  }

  /** A VMM a previous run started is found again while it still runs (by the sandbox id of the logger). */
  async adopt(record: { apiSocket: string }, logger: Logger): Promise<VmmHandle | undefined> {
    const id = logger.bindings()['sandboxId'] as string;
    return this.running.has(id) ? this.handle(id, record.apiSocket) : undefined;
  }

  private handle(id: string, apiSocket: string): VmmHandle {
    let resolveExit!: (how: string) => void;
    const exited = new Promise<string>((r) => (resolveExit = r));
    const fail = (step: Step, path: string) => {
      if (this.node.failAt === step) throw new VmmApiError('PUT', path, 400, `injected failure at ${step}`);
    };
    const api = {
      loadSnapshot: async () => fail('loadSnapshot', '/snapshot/load'),
      setState: async () => fail('setState', '/vm'),
      setMmds: async () => {},
      createSnapshot: async (c: { snapshotPath: string }) => {
        fail('createSnapshot', '/snapshot/create');
        await writeFile(c.snapshotPath, 'snapfile');
      },
      describe: async () => ({ state: 'Running' }),
      // The restored machine, as GET /vm/config reports it: the snapshots here are of 1 vCPU.
      machineConfig: async () => ({ vcpuCount: 1, memSizeMib: 1 }),
    } as unknown as FirecrackerApi;
    return {
      pid: 1,
      startTicks: 1,
      apiSocket,
      api,
      exited,
      isAlive: () => this.running.has(id),
      kill: async () => {
        this.running.delete(id);
        resolveExit('killed');
      },
    };
  }
}

export class RecordingEvents implements LifecycleEvents {
  readonly catalogue = new Map<string, CatalogueEntry>();
  readonly events: { type: LifecycleEventType; sandboxId: string; fields: Record<string, string> }[] = [];
  async publish(e: CatalogueEntry) {
    this.catalogue.set(e.sandboxId, e);
  }
  async unpublish(id: string) {
    this.catalogue.delete(id);
  }
  async event(type: LifecycleEventType, sandboxId: string, fields: Record<string, string> = {}) {
    this.events.push({ type, sandboxId, fields });
  }
  async close() {}
}

export async function makeBaseBuild(bucket: string): Promise<Buffer> {
  const dir = join(bucket, BASE);
  await mkdir(dir, { recursive: true });
  const mem = Buffer.alloc(MEM_PAGES * PAGE);
  for (let p = 0; p < MEM_PAGES; p++) mem.fill(p, p * PAGE, (p + 1) * PAGE);
  await writeFile(join(dir, 'memfile'), mem);
  const header: Header = {
    metadata: { version: 3, blockSize: PAGE, size: mem.length, generation: 0, buildId: BASE, baseBuildId: BASE },
    mappings: baseMappings(mem.length, BASE),
  };
  await writeFile(join(dir, 'memfile.header'), encodeHeader(header));
  await writeFile(join(dir, 'rootfs.ext4'), Buffer.alloc(8 * PAGE, 0xee));
  await writeFile(join(dir, 'snapfile'), 'snapfile');
  return mem;
}

export function config(id: string, extra: Partial<SandboxConfig> = {}): SandboxConfig {
  return {
    templateId: 'base',
    buildId: '',
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId: id,
    envVars: { A: '1' },
    metadata: {},
    envdVersion: '0.2.0',
    vcpu: 1,
    ramMb: 0,
    teamId: 'team',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: '',
    executionId: '',
    volumeMounts: [],
    ...extra,
  };
}

export function createReq(id: string, extra: Partial<SandboxConfig> = {}, endInMs = 3_600_000) {
  return { config: config(id, extra), startTime: new Date(), endTime: new Date(Date.now() + endInMs) };
}

export interface Harness {
  root: string;
  node: RecordingNode;
  vmm: RecordingVmm;
  events: RecordingEvents;
  manager: SandboxManager;
  builds: BuildStore;
  /** fails: /init times out; hold: /init answers only once it settles (a sandbox kept starting); inits: host IPs sent /init. */
  envd: { fails: boolean; hold?: Promise<void>; inits: string[] };
  /** What a restarted orchestrator is built from: the same options (node, files), a new manager. */
  newManager(): SandboxManager;
  states: SandboxStateStore;
  /** The envd double the managers use (recording into `envd`). */
  envdClient: EnvdClient;
  close(): Promise<void>;
}

/** A manager over the recording doubles, a real local bucket with a base build, and real files. */
export async function makeHarness(root: string, generationCap = 3): Promise<Harness> {
  const bucket = join(root, 'bucket');
  await makeBaseBuild(bucket);
  const node = new RecordingNode();
  const vmm = new RecordingVmm(node);
  const events = new RecordingEvents();
  const envdState: Harness['envd'] = { fails: false, inits: [] };
  const envd: EnvdClient = {
    init: async (ip, _env, timeoutMs) => {
      envdState.inits.push(ip);
      if (envdState.hold) await envdState.hold;
      if (envdState.fails) throw new EnvdInitTimeout(`${ip}:49983`, timeoutMs, 'connection refused');
    },
    health: async () => true,
    metrics: async () => undefined,
  };
  const builds = new BuildStore({
    backend: new LocalBackend(bucket),
    cacheDir: join(root, 'cache'),
    owner: 'orchestrator',
    uploadRetry: { attempts: 2, initialDelayMs: 1, maxDelayMs: 1, multiplier: 1 },
  });
  const templates = new TemplateCatalogue(join(root, 'data', 'templates.json'));
  await templates.set({ templateId: 'base', buildId: BASE, createdAt: new Date().toISOString() });
  const states = new SandboxStateStore(join(root, 'data', 'sandboxes'));
  const newManager = () =>
    new SandboxManager({
      settings: {
        nodeId: 'node-1',
        maxSandboxes: 100,
        envdTimeoutMs: 200,
        healthIntervalMs: 0,
        metricsIntervalMs: 0,
        endTimeCheckMs: 50,
        pauseParallelism: 2,
        generationCap,
        pauseMemoryDiff: 'vmm-dirty-log',
        vmRootfsDir: join(root, 'fc'),
        socketDir: join(root, 's'),
      },
      node: { services: node, vmm, envd },
      builds,
      templates,
      records: { states, events },
      logger,
    });
  const manager = newManager();
  return {
    root,
    node,
    vmm,
    events,
    manager,
    builds,
    envd: envdState,
    newManager,
    states,
    envdClient: envd,
    close: async () => {
      await manager.shutdown('kill');
      await builds.close();
    },
  };
}
