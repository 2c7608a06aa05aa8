import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status, type ServiceError } from '@grpc/grpc-js';
import fc from 'fast-check';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { dial, startGrpcServer, unary, type GrpcServerHandle } from '#grpc';
import { BuildStore, LocalBackend } from '#storage';
import { eventually } from '#test-kit';
import {
  TemplateAdminClient,
  TemplateAdminService,
  type CreateTemplateEvent,
  type CreateTemplateRequest,
} from '#proto/sbx/templates';
import { logger, RecordingNode } from '../test/recording-doubles.js';
import type { FirecrackerApi } from './firecracker-api.js';
import { VmmApiError } from './orchestrator-errors.js';
import { templateAdminService, type TemplateAdmin } from './template-admin-service.js';
import { buildTemplate } from './template-builder.js';
import { TemplateCatalogue } from './template-catalogue.js';
import type { VmmHandle, VmmLauncher } from './vmm-launcher.js';

/*
 * TemplateAdmin over a real gRPC server on a Unix socket and the generated client. Behind it the
 * real template builder, a real local bucket and catalogue; the VMM is a cold-boot double that
 * writes a memfile and snapfile like Firecracker's Full snapshot, and the net slots are the
 * recording doubles, so a test sees what each build took and gave back.
 */

const run = promisify(execFile);
const MiB = 1024 * 1024;

/** Cold boot → pause → Full snapshot, as Firecracker's API answers it; `failAt` / `holdBoot` inject. */
class ColdBootVmm implements VmmLauncher {
  readonly description = 'cold-boot VMM double';
  readonly isDouble = true;
  readonly running = new Set<string>();
  failAt: 'coldBoot' | 'createSnapshot' | undefined;
  /** While set, coldBoot waits on it (a slow boot, to cancel during). */
  holdBoot: Promise<void> | undefined;
  booted: { vcpuCount: number; memSizeMib: number }[] = [];

  async launch(spec: { sandboxId: string; apiSocket: string }): Promise<VmmHandle> {
    const id = `${spec.sandboxId}:${spec.apiSocket}`;
    this.running.add(id);
    let memMib = 0;
    let resolveExit!: (how: string) => void;
    const exited = new Promise<string>((r) => (resolveExit = r));
    const api = {
      coldBoot: async (c: { vcpuCount: number; memSizeMib: number }) => {
        await this.holdBoot;
        if (this.failAt === 'coldBoot') throw new VmmApiError('PUT', '/actions', 400, 'injected boot failure');
        memMib = c.memSizeMib;
        this.booted.push({ vcpuCount: c.vcpuCount, memSizeMib: c.memSizeMib });
      },
      setState: async () => {},
      createSnapshot: async (c: { snapshotPath: string; memFilePath: string }) => {
        if (this.failAt === 'createSnapshot') throw new VmmApiError('PUT', '/snapshot/create', 400, 'injected');
        const mem = Buffer.alloc(memMib * MiB);
        mem.fill(0x5a, 0, 8192);
        await writeFile(c.memFilePath, mem);
        await writeFile(c.snapshotPath, 'snapfile');
      },
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

let root: string;
let rootfs: string;
let node: RecordingNode;
let vmm: ColdBootVmm;
let templates: TemplateCatalogue;
let admin: TemplateAdmin;
let builds: BuildStore;
let server: GrpcServerHandle;
let client: TemplateAdminClient;
const bucket = () => join(root, 'bucket');
const buildsDir = () => join(root, 'cache', 'builds');

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'orch-tpl-admin-'));
  rootfs = join(root, 'in', 'rootfs.ext4');
  await mkdir(join(root, 'in'));
  await run('truncate', ['-s', '6M', rootfs]);
  await run('mkfs.ext4', ['-q', '-F', '-b', '4096', '-L', 'tpl-test', rootfs]);
  node = new RecordingNode();
  vmm = new ColdBootVmm();
  builds = new BuildStore({
    backend: new LocalBackend(bucket()),
    cacheDir: join(root, 'cache'),
    owner: 'orchestrator',
  });
  templates = new TemplateCatalogue(join(root, 'data', 'templates.json'));
  await templates.load();
  admin = templateAdminService({
    templates,
    build: (req) =>
      buildTemplate(
        {
          builds,
          templates,
          vmm,
          slots: node.slots,
          kernelPath: undefined,
          vmRootfsDir: join(root, 'fc'),
          workDir: join(root, 's'),
          logger,
        },
        req,
      ),
    bounds: { minVcpu: 1, maxVcpu: 4, minRamMb: 16, maxRamMb: 64 },
    defaultMemoryMb: 32,
    logger,
  });
  server = await startGrpcServer({
    address: `unix://${join(root, 'orchestrator.sock')}`,
    services: [
      { name: 'sbx.v1.TemplateAdmin', definition: TemplateAdminService, implementation: admin.implementation },
    ],
    logger,
  });
  client = dial(TemplateAdminClient, join(root, 'orchestrator.sock'));
});

afterAll(async () => {
  client?.close();
  await admin?.stop();
  await server?.shutdown(100);
  await builds?.close();
  await rm(root, { recursive: true, force: true });
});

afterEach(() => {
  vmm.failAt = undefined;
  vmm.holdBoot = undefined;
});

function request(fields: Partial<CreateTemplateRequest>): CreateTemplateRequest {
  return { templateId: 't', rootfsPath: rootfs, memoryMb: 0, vcpu: 0, replace: false, ...fields };
}

/** Every event of one CreateTemplate call, or the status it ended with. */
function createTemplate(req: CreateTemplateRequest): Promise<{ events: CreateTemplateEvent[]; error?: ServiceError }> {
  return new Promise((resolve) => {
    const events: CreateTemplateEvent[] = [];
    const stream = client.createTemplate(req, { deadline: Date.now() + 30_000 });
    stream.on('data', (e: CreateTemplateEvent) => events.push(e));
    stream.on('error', (error: ServiceError) => resolve({ events, error }));
    stream.on('end', () => resolve({ events }));
  });
}

/** Nothing held: no slot, no VMM, no staging build left in the cache. */
async function nothingHeld() {
  const staging = existsSync(buildsDir()) ? (await readdir(buildsDir())).filter((d) => d.endsWith('.staging')) : [];
  return { slots: node.slotsInUse.size, vmms: vmm.running.size, staging };
}

describe('TemplateAdmin.CreateTemplate', () => {
  it('streams rootfs, boot, snapshot and build in order, then the entry; the build is in the bucket', async () => {
    const { events, error } = await createTemplate(request({ templateId: 't1', memoryMb: 48, vcpu: 2 }));
    expect(error).toBeUndefined();
    const progress = events.flatMap((e) => (e.progress ? [e.progress] : []));
    const steps = [...new Set(progress.map((p) => p.step))];
    expect(steps).toEqual(['rootfs', 'boot', 'snapshot', 'build']);
    expect(progress.map((p) => p.stepIndex)).toEqual([...progress.map((p) => p.stepIndex)].sort());
    expect(progress.every((p) => p.stepCount === 4)).toBe(true);
    const copied = progress.filter((p) => p.step === 'rootfs');
    expect(copied.at(-1)).toMatchObject({ done: 6 * MiB, total: 6 * MiB });
    expect(progress.at(-1)).toMatchObject({ step: 'build', done: 1, total: 1 });

    const last = events.at(-1)!.template!;
    expect(last).toMatchObject({ templateId: 't1', rootfsBytes: 6 * MiB, memoryBytes: 48 * MiB });
    expect(vmm.booted.at(-1)).toEqual({ vcpuCount: 2, memSizeMib: 48 });
    // The bucket holds the build: rootfs byte for byte, memfile with its header, snapfile last.
    const dir = join(bucket(), last.buildId);
    expect((await readFile(join(dir, 'rootfs.ext4'))).equals(await readFile(rootfs))).toBe(true);
    for (const f of ['memfile', 'memfile.header', 'snapfile']) expect(existsSync(join(dir, f))).toBe(true);
    expect(templates.buildOf('t1')).toBe(last.buildId);
    expect(await nothingHeld()).toEqual({ slots: 0, vmms: 0, staging: [] });

    const list = await unary(client, client.listTemplates, {});
    expect(list.templates.find((t) => t.templateId === 't1')).toEqual(last);
  });

  it('uses the default memory and one vCPU when the request leaves them 0', async () => {
    const { events, error } = await createTemplate(request({ templateId: 'tdefault' }));
    expect(error).toBeUndefined();
    expect(events.at(-1)!.template!.memoryBytes).toBe(32 * MiB);
    expect(vmm.booted.at(-1)).toEqual({ vcpuCount: 1, memSizeMib: 32 });
  });

  it('refuses an existing id unless replace, which points it at a new build', async () => {
    const first = (await createTemplate(request({ templateId: 'again' }))).events.at(-1)!.template!;
    const dup = await createTemplate(request({ templateId: 'again' }));
    expect(dup.error?.code).toBe(status.ALREADY_EXISTS);
    expect(dup.error?.details).toMatch(/template 'again' exists/);
    expect(dup.events).toEqual([]);
    expect(templates.buildOf('again')).toBe(first.buildId);
    const replaced = await createTemplate(request({ templateId: 'again', replace: true }));
    expect(replaced.error).toBeUndefined();
    const second = replaced.events.at(-1)!.template!;
    expect(second.buildId).not.toBe(first.buildId);
    expect(templates.buildOf('again')).toBe(second.buildId);
  });

  it('refuses a second build of the same id while the first runs', async () => {
    let release!: () => void;
    vmm.holdBoot = new Promise((r) => (release = r));
    const first = createTemplate(request({ templateId: 'busy' }));
    await eventually(() => vmm.running.size > 0, { intervalMs: 10 });
    const second = await createTemplate(request({ templateId: 'busy' }));
    expect(second.error?.code).toBe(status.ALREADY_EXISTS);
    expect(second.error?.details).toMatch(/being built/);
    release();
    expect((await first).error).toBeUndefined();
    expect(await nothingHeld()).toEqual({ slots: 0, vmms: 0, staging: [] });
  });

  it.each([
    [{ templateId: '' }, 'template_id', /is empty/],
    [{ templateId: '../etc' }, 'template_id', /path separator|'\.\.'/],
    [{ templateId: 'a b' }, 'template_id', /only letters/],
    [{ memoryMb: 8 }, 'memory_mb', /8 is outside \[16, 64\]/],
    [{ memoryMb: 65 }, 'memory_mb', /65 is outside/],
    [{ vcpu: 5 }, 'vcpu', /5 is outside \[1, 4\]/],
    [{ rootfsPath: '' }, 'rootfs_path', /is empty/],
    [{ rootfsPath: 'rel/rootfs.ext4' }, 'rootfs_path', /not an absolute path/],
    [{ rootfsPath: '/nonexistent/rootfs.ext4' }, 'rootfs_path', /does not exist on the node/],
    [{ rootfsPath: '/tmp' }, 'rootfs_path', /not a regular file/],
  ])('refuses %j with INVALID_ARGUMENT naming %s', async (fields, field, why) => {
    const { events, error } = await createTemplate(request({ templateId: 'bad', ...fields }));
    expect(error?.code).toBe(status.INVALID_ARGUMENT);
    expect(error?.details).toContain(`invalid ${field}`);
    expect(error?.details).toMatch(why);
    expect(events).toEqual([]);
    expect(templates.get('bad')).toBeUndefined();
  });

  it('refuses a file that is not an ext4 image, or not whole 4 KiB blocks', async () => {
    const text = join(root, 'in', 'not-ext4.img');
    await writeFile(text, Buffer.alloc(64 * 1024, 0x41));
    const notExt4 = await createTemplate(request({ templateId: 'bad', rootfsPath: text }));
    expect(notExt4.error?.code).toBe(status.INVALID_ARGUMENT);
    expect(notExt4.error?.details).toMatch(/not an ext4 image/);
    const odd = join(root, 'in', 'odd.img');
    await writeFile(odd, Buffer.concat([await readFile(rootfs), Buffer.alloc(100)]));
    const oddSize = await createTemplate(request({ templateId: 'bad', rootfsPath: odd }));
    expect(oddSize.error?.code).toBe(status.INVALID_ARGUMENT);
    expect(oddSize.error?.details).toMatch(/not a whole number of 4 KiB blocks/);
  });

  it.each(['coldBoot', 'createSnapshot'] as const)(
    'a failure at %s ends the stream with the reason and gives back slot, VMM and staging',
    async (failAt) => {
      vmm.failAt = failAt;
      const { events, error } = await createTemplate(request({ templateId: `fail-${failAt}` }));
      expect(error?.code).toBe(status.INTERNAL);
      expect(error?.details).toMatch(/injected/);
      expect(events.some((e) => e.template)).toBe(false);
      expect(events.length).toBeGreaterThan(0);
      expect(templates.get(`fail-${failAt}`)).toBeUndefined();
      expect(await nothingHeld()).toEqual({ slots: 0, vmms: 0, staging: [] });
    },
  );

  it('a client that goes away aborts the build and everything is given back', async () => {
    let release!: () => void;
    vmm.holdBoot = new Promise((r) => (release = r));
    const stream = client.createTemplate(request({ templateId: 'gone' }));
    stream.on('error', () => undefined);
    stream.on('data', () => undefined);
    await eventually(() => vmm.running.size > 0, { intervalMs: 10 });
    stream.cancel();
    // The server sees the cancel; the build stops at its next step once the boot returns.
    await new Promise((r) => setTimeout(r, 100));
    release();
    await eventually(async () => expect(await nothingHeld()).toEqual({ slots: 0, vmms: 0, staging: [] }), {
      intervalMs: 10,
    });
    expect(templates.get('gone')).toBeUndefined();
    const list = await unary(client, client.listTemplates, {});
    expect(list.templates.map((t) => t.templateId)).not.toContain('gone');
  });

  it('keeps serving after random requests (fuzz), each answered with a status, none built', async () => {
    const before = templates.list().length;
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          templateId: fc.oneof(fc.string({ maxLength: 80 }), fc.constantFrom('ok', '..', '-x', 'a'.repeat(64))),
          rootfsPath: fc.oneof(fc.string({ maxLength: 40 }), fc.constantFrom('/', '/dev/null', '/proc/self/maps')),
          memoryMb: fc.nat({ max: 1 << 20 }),
          vcpu: fc.nat({ max: 1000 }),
          replace: fc.boolean(),
        }),
        async (req) => {
          const { events, error } = await createTemplate(req);
          expect(error?.code).toBe(status.INVALID_ARGUMENT);
          expect(events).toEqual([]);
        },
      ),
      { numRuns: 40 },
    );
    expect(templates.list().length).toBe(before);
    expect((await unary(client, client.listTemplates, {})).templates.length).toBe(before);
  });
});
