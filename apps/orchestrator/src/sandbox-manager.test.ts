import { mkdtemp, readFile, readdir, rm, writeFile, mkdir } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { createLogger } from '#logging';
import { baseMappings, encodeHeader, NIL_UUID, type Header } from '#storage';
import type { SandboxConfig } from '#proto/orchestrator';
import { BlockDevice, BlockExportResponse } from '#proto/sbx/block';
import { NetSlot } from '#proto/sbx/net';
import { UffdExportDiffResponse } from '#proto/sbx/uffd';
import { BUILD_FILES, DirectoryBuildFiles, readBuildHeader } from './build-files.js';
import { BuildUploader } from './build-uploader.js';
import type { EnvdClient } from './envd-client.js';
import { EnvdInitTimeout, SandboxExists, SandboxStepFailed, VmmApiError, VmmExited } from './orchestrator-errors.js';
import type { FirecrackerApi } from './firecracker-api.js';
import type { CatalogueEntry, LifecycleEvents, LifecycleEventType } from './lifecycle-events.js';
import type { NodeServices } from './node-services.js';
import { SandboxManager } from './sandbox-manager.js';
import { SandboxStateStore } from './sandbox-state-store.js';
import { TemplateCache } from './template-cache.js';
import { TemplateCatalogue } from './template-catalogue.js';
import type { VmmHandle, VmmLauncher } from './vmm-launcher.js';
import { layerCount } from './layer-compaction.js';

/*
 * The manager's flows over recording doubles of the four services, the VMM and envd (each a
 * double that keeps the set of resources it handed out), so a failure can be injected at
 * every step and the test checks that every resource taken was given back. The same flows run
 * against the real services in test/orchestrator-e2e.test.ts.
 */

const PAGE = 4096;
const MEM_PAGES = 16;
const BASE = '11111111-1111-4111-8111-111111111111';
const logger = createLogger({ service: 'orchestrator-test', level: 'silent' });

type Step =
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

class RecordingNode implements NodeServices {
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

  slots = {
    acquire: async (sandboxId: string): Promise<NetSlot> => {
      this.check('acquire');
      const idx = this.nextIdx++;
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
    list: async () => [],
  };

  memory = {
    prepare: async (sandboxId: string, socketPath: string) => {
      this.check('prepare');
      this.servings.add(sandboxId);
      return { socketPath, memorySize: MEM_PAGES * PAGE };
    },
    stopSourcing: async () => {},
    exportDiff: async (_id: string, newBuildId: string, diffPath: string): Promise<UffdExportDiffResponse> => {
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
    list: async () => [],
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

class RecordingVmm implements VmmLauncher {
  readonly description = 'recording VMM double';
  readonly isDouble = true;
  readonly running = new Set<string>();
  constructor(private readonly node: RecordingNode) {}

  async launch(spec: { sandboxId: string; apiSocket: string }): Promise<VmmHandle> {
    if (this.node.failAt === 'launch') throw new VmmExited(spec.sandboxId, 'exited while starting: code 1');
    const id = spec.sandboxId;
    this.running.add(id);
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
    } as unknown as FirecrackerApi;
    return {
      pid: 1,
      startTicks: 1,
      apiSocket: spec.apiSocket,
      api,
      exited,
      isAlive: () => this.running.has(id),
      kill: async () => {
        this.running.delete(id);
        resolveExit('killed');
      },
    };
  }

  async adopt(): Promise<VmmHandle | undefined> {
    return undefined;
  }
}

class RecordingEvents implements LifecycleEvents {
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

let root: string;
let node: RecordingNode;
let vmm: RecordingVmm;
let events: RecordingEvents;
let manager: SandboxManager;
let envdFails: boolean;
let uploader: BuildUploader;

async function makeBaseBuild(bucket: string): Promise<Buffer> {
  const dir = join(bucket, BASE);
  await mkdir(dir, { recursive: true });
  const mem = Buffer.alloc(MEM_PAGES * PAGE);
  for (let p = 0; p < MEM_PAGES; p++) mem.fill(p, p * PAGE, (p + 1) * PAGE);
  await writeFile(join(dir, BUILD_FILES.memfile), mem);
  const header: Header = {
    metadata: { version: 3, blockSize: PAGE, size: mem.length, generation: 0, buildId: BASE, baseBuildId: BASE },
    mappings: baseMappings(mem.length, BASE),
  };
  await writeFile(join(dir, BUILD_FILES.memfileHeader), encodeHeader(header));
  await writeFile(join(dir, BUILD_FILES.rootfs), Buffer.alloc(8 * PAGE, 0xee));
  await writeFile(join(dir, BUILD_FILES.snapfile), 'snapfile');
  return mem;
}

function config(id: string, extra: Partial<SandboxConfig> = {}): SandboxConfig {
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
    ramMb: 128,
    teamId: 'team',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: '',
    ...extra,
  };
}

function createReq(id: string, extra: Partial<SandboxConfig> = {}, endInMs = 3_600_000) {
  return { config: config(id, extra), startTime: new Date(), endTime: new Date(Date.now() + endInMs) };
}

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'orch-mgr-'));
  const bucket = join(root, 'bucket');
  await makeBaseBuild(bucket);
  node = new RecordingNode();
  vmm = new RecordingVmm(node);
  events = new RecordingEvents();
  envdFails = false;
  const envd: EnvdClient = {
    init: async (ip, _env, timeoutMs) => {
      if (envdFails) throw new EnvdInitTimeout(`${ip}:49983`, timeoutMs, 'connection refused');
    },
    health: async () => true,
    metrics: async () => undefined,
  };
  const builds = new DirectoryBuildFiles(join(root, 'cache'), bucket);
  const templates = new TemplateCatalogue(join(root, 'data', 'templates.json'));
  await templates.set({ templateId: 'base', buildId: BASE, createdAt: new Date().toISOString() });
  manager = new SandboxManager({
    settings: {
      nodeId: 'node-1',
      maxSandboxes: 100,
      envdTimeoutMs: 200,
      healthIntervalMs: 0,
      metricsIntervalMs: 0,
      endTimeCheckMs: 50,
      pauseParallelism: 2,
      generationCap: 3,
      vmRootfsDir: join(root, 'fc'),
      socketDir: join(root, 's'),
    },
    services: node,
    vmm,
    envd,
    builds,
    cache: new TemplateCache(builds, 60_000),
    templates,
    events,
    states: new SandboxStateStore(join(root, 'data', 'sandboxes')),
    uploader: (uploader = new BuildUploader((id) => builds.upload(id), { retries: 1, backoffMs: 1, logger })),
    logger,
  });
});

afterEach(async () => {
  await manager.shutdown('kill');
  await uploader.drain();
  await rm(root, { recursive: true, force: true });
});

async function expectNothingHeld(): Promise<void> {
  expect([...node.slotsInUse.keys()]).toEqual([]);
  expect([...node.devicesOpen]).toEqual([]);
  expect([...node.servings]).toEqual([]);
  expect([...node.records.keys()]).toEqual([]);
  expect([...vmm.running]).toEqual([]);
  expect(await readdir(join(root, 'data', 'sandboxes')).catch(() => [])).toEqual([]);
  expect(manager.list()).toEqual([]);
}

describe('create', () => {
  it('takes a slot, device, uffd serving, VMM and DNS record, and lists the sandbox', async () => {
    await manager.create(createReq('sbx-1'));
    expect(node.slotsInUse.has('sbx-1')).toBe(true);
    expect(node.devicesOpen.has('sbx-1')).toBe(true);
    expect(node.servings.has('sbx-1')).toBe(true);
    expect(node.records.get('sbx-1')).toBe('10.11.0.1');
    expect(vmm.running.has('sbx-1')).toBe(true);
    expect(manager.list().map((s) => s.config.sandboxId)).toEqual(['sbx-1']);
    expect(events.catalogue.get('sbx-1')?.hostIp).toBe('10.11.0.1');
    expect(events.events.map((e) => e.type)).toEqual(['created']);
    const state = JSON.parse(await readFile(join(root, 'data', 'sandboxes', 'sbx-1', 'state.json'), 'utf8'));
    expect(state.phase).toBe('running');
    await manager.delete('sbx-1');
    await expectNothingHeld();
    expect(events.events.map((e) => e.type)).toEqual(['created', 'killed']);
  });

  it('refuses a duplicate id, also while the first is still being created', async () => {
    const first = manager.create(createReq('dup'));
    await expect(manager.create(createReq('dup'))).rejects.toBeInstanceOf(SandboxExists);
    await first;
    await expect(manager.create(createReq('dup'))).rejects.toBeInstanceOf(SandboxExists);
  });

  const failurePoints: [Step, string][] = [
    ['acquire', 'acquire network slot'],
    ['open', 'open rootfs device'],
    ['prepare', 'prepare uffd'],
    ['launch', 'start vmm'],
    ['loadSnapshot', 'load snapshot'],
    ['setState', 'resume vm'],
    ['envd', 'init envd'],
    ['dns', 'set dns'],
  ];
  for (const [failAt, step] of failurePoints) {
    it(`a failure at '${step}' rolls back everything taken and names the step`, async () => {
      if (failAt === 'envd') envdFails = true;
      else node.failAt = failAt;
      const err = await manager.create(createReq('half')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SandboxStepFailed);
      expect((err as SandboxStepFailed).step).toBe(step);
      expect((err as Error).message).toContain(`step '${step}' failed`);
      await expectNothingHeld();
      expect(events.events.map((e) => `${e.type}:${e.fields['step']}`)).toEqual([`failed:${step}`]);
      // The node is still usable after the failure.
      node.failAt = undefined;
      envdFails = false;
      await manager.create(createReq('after'));
      expect(manager.list()).toHaveLength(1);
    });
  }
});

/** Reads a build file's virtual bytes through its header, from the layers' data files. */
async function readVirtual(buildDirOf: (id: string) => string, header: Header, name: string): Promise<Buffer> {
  const out = Buffer.alloc(header.metadata.size);
  for (const m of header.mappings) {
    if (m.buildId === NIL_UUID) continue;
    const data = await readFile(join(buildDirOf(m.buildId), name));
    data.copy(out, m.offset, m.buildStorageOffset, m.buildStorageOffset + m.length);
  }
  return out;
}

describe('pause and resume chains', () => {
  it('writes merged headers generation by generation and compacts past the cap, bytes intact', async () => {
    const bucket = join(root, 'bucket');
    const cacheBuilds = join(root, 'cache', 'builds');
    const dirOf = async (id: string) =>
      (await readdir(join(cacheBuilds, id)).catch(() => [] as string[])).includes(BUILD_FILES.memfile)
        ? join(cacheBuilds, id)
        : join(bucket, id);
    const expected = Buffer.alloc(MEM_PAGES * PAGE);
    for (let p = 0; p < MEM_PAGES; p++) expected.fill(p, p * PAGE, (p + 1) * PAGE);
    let buildId = '';
    for (let gen = 1; gen <= 6; gen++) {
      const id = `chain`;
      await manager.create(createReq(id, gen === 1 ? {} : { snapshot: true, buildId }));
      const newBuild = crypto.randomUUID();
      const build = await manager.pause(id, newBuild);
      const page = ((gen - 1) % (MEM_PAGES - 1)) + 1;
      expected.fill(0x10 + gen - 1, 0, PAGE);
      expected.fill(0x10 + gen - 1 + 0x80, page * PAGE, (page + 1) * PAGE);
      expect(build.memfileHeader.metadata.generation).toBe(gen);
      expect(build.memfileHeader.metadata.baseBuildId).toBe(BASE);
      expect(layerCount(build.memfileHeader)).toBeLessThanOrEqual(3);
      const header = await readBuildHeader(join(cacheBuilds, newBuild), 'memfile', newBuild);
      expect(header).toEqual(build.memfileHeader);
      const dirs = new Map<string, string>();
      for (const m of header.mappings) dirs.set(m.buildId, await dirOf(m.buildId));
      const bytes = await readVirtual((b) => dirs.get(b)!, header, BUILD_FILES.memfile);
      expect(bytes.equals(expected)).toBe(true);
      buildId = newBuild;
      await expectNothingHeld();
    }
    expect(events.events.filter((e) => e.type === 'paused')).toHaveLength(6);
    expect(events.events.filter((e) => e.type === 'resumed')).toHaveLength(5);
  });

  it('a pause that fails before StopSourcing leaves the sandbox running; after it, removes it cleanly', async () => {
    await manager.create(createReq('p1'));
    node.failAt = 'setState';
    const early = await manager.pause('p1', crypto.randomUUID()).catch((e: unknown) => e);
    expect((early as SandboxStepFailed).step).toBe('pause vm');
    expect(manager.list().map((s) => s.config.sandboxId)).toEqual(['p1']);
    expect(node.records.get('p1')).toBe('10.11.0.1');
    node.failAt = 'exportDiff';
    const late = await manager.pause('p1', crypto.randomUUID()).catch((e: unknown) => e);
    expect((late as SandboxStepFailed).step).toBe('export memory diff');
    await expectNothingHeld();
    // Only the template's fetched headers remain; no half-written build.
    expect(await readdir(join(root, 'cache', 'builds')).catch(() => [])).toEqual([BASE]);
  });

  it('uploads the new build to the bucket in the background', async () => {
    await manager.create(createReq('up'));
    const id = crypto.randomUUID();
    await manager.pause('up', id);
    await uploader.drain();
    expect((await readdir(join(root, 'bucket', id))).sort()).toEqual(Object.values(BUILD_FILES).sort());
  });
});

describe('end time', () => {
  it('kills a sandbox past its end time, pauses one with auto_pause', async () => {
    await manager.create(createReq('short', {}, 100));
    await manager.create(createReq('auto', { autoPause: true }, 100));
    await manager.enforceEndTimes(Date.now() + 1000);
    await expectNothingHeld();
    const types = events.events.map((e) => `${e.type}:${e.sandboxId}`);
    expect(types).toContain('killed:short');
    expect(types).toContain('paused:auto');
  });
});
