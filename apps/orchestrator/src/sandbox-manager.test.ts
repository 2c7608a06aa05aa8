import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { NIL_UUID, type Header } from '#storage';
import {
  BASE,
  createReq,
  makeHarness,
  MEM_PAGES,
  PAGE,
  type Harness,
  type RecordingEvents,
  type RecordingNode,
  type RecordingVmm,
  type Step,
} from '../test/recording-doubles.js';
import { layerCount } from './layer-compaction.js';
import { SandboxExists, SandboxStepFailed } from './orchestrator-errors.js';
import type { SandboxManager } from './sandbox-manager.js';
import type { SandboxStateFile } from './sandbox-state-store.js';

/*
 * The manager's flows over recording doubles of the services, the VMM and envd
 * (test/recording-doubles.ts), with a failure injected at every step.
 */

let root: string;
let h: Harness;
let node: RecordingNode;
let vmm: RecordingVmm;
let events: RecordingEvents;
let manager: SandboxManager;

beforeEach(async () => {
  root = await mkdtemp(join(tmpdir(), 'orch-mgr-'));
  h = await makeHarness(root);
  ({ node, vmm, events, manager } = h);
});

afterEach(async () => {
  await h.close();
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

  it('writes the running state while envd /init is under way; a failure of /init then removes it', async () => {
    let release!: () => void;
    h.envd.hold = new Promise<void>((r) => (release = r));
    h.envd.fails = true;
    const creating = manager.create(createReq('held')).catch((e: unknown) => e);
    const statePath = join(root, 'data', 'sandboxes', 'held', 'state.json');
    const state = await eventually(
      async () => {
        const s = JSON.parse(await readFile(statePath, 'utf8')) as SandboxStateFile;
        return s.phase === 'running' && s;
      },
      { what: 'the state file saying running while /init waits' },
    );
    // Everything a restart needs to adopt it, and that envd has not answered yet.
    expect(state.vmm).toBeDefined();
    expect(state.slot?.hostIp).toBe('10.11.0.1');
    expect(state.envdInitialized).toBeUndefined();
    // Not yet running for anyone else: it is not listed and cannot be deleted.
    expect(manager.list()).toEqual([]);
    await expect(manager.delete('held')).rejects.toThrow(/creating/);
    release();
    const err = await creating;
    expect((err as SandboxStepFailed).step).toBe('init envd');
    await expectNothingHeld();
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
      if (failAt === 'envd') h.envd.fails = true;
      else node.failAt = failAt;
      const err = await manager.create(createReq('half')).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(SandboxStepFailed);
      expect((err as SandboxStepFailed).step).toBe(step);
      expect((err as Error).message).toContain(`step '${step}' failed`);
      await expectNothingHeld();
      expect(events.events.map((e) => `${e.type}:${e.fields['step']}`)).toEqual([`failed:${step}`]);
      // The node is still usable after the failure.
      node.failAt = undefined;
      h.envd.fails = false;
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
      (await readdir(join(cacheBuilds, id)).catch(() => [] as string[])).includes('memfile')
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
      const header = await h.builds.readHeader(newBuild, 'memfile');
      expect(header).toEqual(build.memfileHeader);
      const dirs = new Map<string, string>();
      for (const m of header.mappings) dirs.set(m.buildId, await dirOf(m.buildId));
      const bytes = await readVirtual((b) => dirs.get(b)!, header, 'memfile');
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
    // No half-written build (a bucket build is never copied into the local builds).
    expect(await readdir(join(root, 'cache', 'builds')).catch(() => [])).toEqual([]);
  });

  it('uploads the new build to the bucket in the background', async () => {
    await manager.create(createReq('up'));
    const id = crypto.randomUUID();
    await manager.pause('up', id);
    await h.builds.uploadBuild(id); // joins the upload the pause started
    expect(h.builds.uploadCounts()).toEqual({ uploading: 0, done: 1, failed: 0 });
    expect((await readdir(join(root, 'bucket', id))).sort()).toEqual([
      'memfile',
      'memfile.header',
      'rootfs.ext4',
      'rootfs.ext4.header',
      'snapfile',
    ]);
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
