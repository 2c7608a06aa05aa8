import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status, type ServiceError } from '@grpc/grpc-js';
import fc from 'fast-check';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { dial, startGrpcServer, unary, waitForServing, type GrpcServerHandle } from '#grpc';
import { SandboxServiceClient, SandboxServiceService, type SandboxConfig } from '#proto/orchestrator';
import { BASE, config, logger, makeHarness, type Harness } from '../test/recording-doubles.js';
import { sandboxService } from './sandbox-service.js';

/*
 * The gRPC edge over a real gRPC server and the client generated from orchestrator.proto:
 * validation of every field, status codes, and that the server keeps serving after bad input.
 * The node services behind it are the recording doubles.
 */

let root: string;
let h: Harness;
let server: GrpcServerHandle;
let client: SandboxServiceClient;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'orch-edge-'));
  h = await makeHarness(root);
  const implementation = sandboxService({
    manager: h.manager,
    builds: h.builds,
    bounds: { minVcpu: 1, maxVcpu: 4, minRamMb: 128, maxRamMb: 2048 },
    clientId: 'node-1',
    logger,
  });
  server = await startGrpcServer({
    address: '127.0.0.1:0',
    services: [{ name: 'SandboxService', definition: SandboxServiceService, implementation }],
    logger,
  });
  client = dial(SandboxServiceClient, server.address);
});

afterAll(async () => {
  client?.close();
  await server?.shutdown(100);
  await h?.close();
  await rm(root, { recursive: true, force: true });
});

const hour = () => new Date(Date.now() + 3_600_000);

function create(sandbox: Partial<SandboxConfig>, endTime: Date | null = hour()) {
  return unary(
    client,
    client.create,
    { sandbox: { ...config('x'), ...sandbox }, startTime: new Date(), endTime: endTime ?? undefined },
    5000,
  );
}

async function failure(p: Promise<unknown>): Promise<ServiceError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e as ServiceError,
  );
  if (!err) throw new Error('expected the call to fail');
  return err;
}

describe('SandboxService edge', () => {
  it('answers grpc health', async () => {
    await waitForServing(server.address, 2000);
  });

  it('creates, lists, updates and deletes through gRPC', async () => {
    const res = await create({ sandboxId: 'edge-1' });
    expect(res.clientId).toBe('node-1');
    const list = await unary(client, client.list, {}, 5000);
    expect(list.sandboxes.map((s) => s.config?.sandboxId)).toEqual(['edge-1']);
    expect(list.sandboxes[0]?.config?.buildId).toBe(BASE);
    const cached = await unary(client, client.listCachedBuilds, {}, 5000);
    expect(cached.builds.map((b) => b.buildId)).toEqual([BASE]);
    expect(cached.builds[0]!.expirationTime!.getTime()).toBeGreaterThan(Date.now());
    const end = new Date(Date.now() + 7_200_000);
    await unary(client, client.update, { sandboxId: 'edge-1', endTime: end }, 5000);
    const after = await unary(client, client.list, {}, 5000);
    expect(after.sandboxes[0]?.endTime?.getTime()).toBe(end.getTime());
    const dup = await failure(create({ sandboxId: 'edge-1' }));
    expect(dup.code).toBe(status.ALREADY_EXISTS);
    expect(dup.details).toContain('edge-1');
    await unary(client, client.delete, { sandboxId: 'edge-1' }, 5000);
    expect((await unary(client, client.list, {}, 5000)).sandboxes).toEqual([]);
    const gone = await failure(unary(client, client.delete, { sandboxId: 'edge-1' }, 5000));
    expect(gone.code).toBe(status.NOT_FOUND);
  });

  const invalid: [string, Partial<SandboxConfig>, string][] = [
    ['path separator', { sandboxId: 'a/b' }, 'sandbox.sandbox_id'],
    ['dot-dot', { sandboxId: 'a..b' }, 'sandbox.sandbox_id'],
    ['too long', { sandboxId: 'a'.repeat(64) }, 'sandbox.sandbox_id'],
    ['empty', { sandboxId: '' }, 'sandbox.sandbox_id'],
    ['template traversal', { templateId: '../etc' }, 'sandbox.template_id'],
    ['vcpu negative', { sandboxId: 'v0', vcpu: -1 }, 'sandbox.vcpu'],
    ['vcpu too many', { sandboxId: 'v9', vcpu: 9 }, 'sandbox.vcpu'],
    ['ram too small', { sandboxId: 'r1', ramMb: 1 }, 'sandbox.ram_mb'],
    ['ram too big', { sandboxId: 'r2', ramMb: 1 << 20 }, 'sandbox.ram_mb'],
    ['build id not a uuid', { sandboxId: 'b1', buildId: 'nope' }, 'sandbox.build_id'],
    ['snapshot without build', { sandboxId: 'b2', snapshot: true }, 'sandbox.build_id'],
    ['bad env name', { sandboxId: 'e1', envVars: { 'A=B': '1' } }, 'sandbox.env_vars'],
  ];
  for (const [name, sandbox, field] of invalid) {
    it(`rejects ${name} with INVALID_ARGUMENT naming ${field}`, async () => {
      const err = await failure(create(sandbox));
      expect(err.code).toBe(status.INVALID_ARGUMENT);
      expect(err.details).toContain(field);
    });
  }

  it('rejects a missing or backwards end time', async () => {
    expect((await failure(create({ sandboxId: 't1' }, null))).details).toContain('end_time');
    expect((await failure(create({ sandboxId: 't2' }, new Date(Date.now() - 1000)))).details).toContain('end_time');
  });

  it('answers NOT_FOUND naming an unknown template, FAILED_PRECONDITION naming a build not in storage', async () => {
    const t = await failure(create({ sandboxId: 'nt', templateId: 'no-such-template' }));
    expect(t.code).toBe(status.NOT_FOUND);
    expect(t.details).toContain('no-such-template');
    const missing = '22222222-2222-4222-8222-222222222222';
    const b = await failure(create({ sandboxId: 'nb', buildId: missing, snapshot: true }));
    // E2B's control plane retries a FAILED_PRECONDITION later (the build may be still uploading).
    expect(b.code).toBe(status.FAILED_PRECONDITION);
    expect(b.details).toContain(missing);
    expect(h.node.slotsInUse.size).toBe(0);
  });

  it('names the failed step, maps an exhausted slot pool to RESOURCE_EXHAUSTED', async () => {
    h.node.failAt = 'loadSnapshot';
    const err = await failure(create({ sandboxId: 'fail-1' }));
    expect(err.code).toBe(status.INTERNAL);
    expect(err.details).toContain("step 'load snapshot' failed");
    h.node.failAt = 'acquire';
    const orig = h.node.slots.acquire;
    h.node.slots.acquire = async () => {
      throw Object.assign(new Error('no free slot'), { code: status.RESOURCE_EXHAUSTED, metadata: {} });
    };
    const noSlot = await failure(create({ sandboxId: 'fail-2' }));
    h.node.slots.acquire = orig;
    h.node.failAt = undefined;
    expect(noSlot.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(noSlot.details).toContain("step 'acquire network slot'");
  });

  it('validates Pause and Update', async () => {
    const bad = await failure(
      unary(client, client.pause, { sandboxId: 'x', templateId: 'base', buildId: 'zzz' }, 5000),
    );
    expect(bad.code).toBe(status.INVALID_ARGUMENT);
    expect(bad.details).toContain('build_id');
    const unknown = await failure(
      unary(client, client.pause, { sandboxId: 'ghost', templateId: 'base', buildId: crypto.randomUUID() }, 5000),
    );
    expect(unknown.code).toBe(status.NOT_FOUND);
    const noEnd = await failure(unary(client, client.update, { sandboxId: 'ghost', endTime: undefined }, 5000));
    expect(noEnd.code).toBe(status.INVALID_ARGUMENT);
  });

  it('refuses fields it does not serve with UNIMPLEMENTED naming them', async () => {
    const mount = await failure(
      create({ sandboxId: 'vm1', volumeMounts: [{ id: 'v', path: '/data', type: 'nfs', name: 'data' }] }),
    );
    expect(mount.code).toBe(status.UNIMPLEMENTED);
    expect(mount.details).toContain('sandbox.volumeMounts');
    expect(h.node.slotsInUse.size).toBe(0);
  });

  it('passes the egress policy to net-agent at create and on Update, keeping what an Update leaves unset', async () => {
    await create({ sandboxId: 'eg1', allowInternetAccess: true });
    await create({
      sandboxId: 'eg2',
      allowInternetAccess: false,
      network: { egress: { allowedCidrs: ['1.1.1.1:53'], deniedCidrs: [], allowedDomains: [] } },
    });
    const idx2 = h.node.slotsInUse.get('eg2')!.idx;
    // No policy asked for: none applied. eg2's applies before its slot is handed out.
    expect(h.node.egressSets).toEqual([
      { idx: idx2, egress: { denyInternet: true, allowedCidrs: ['1.1.1.1:53'], deniedCidrs: [], allowedDomains: [] } },
    ]);
    // An Update with only an egress change (no end time) replaces the rules, keeps allow_internet_access.
    const deny = { allowedCidrs: [], deniedCidrs: ['8.8.8.0/24:443'], allowedDomains: ['*.x.com'] };
    await unary(client, client.update, { sandboxId: 'eg2', endTime: undefined, egress: deny }, 5000);
    expect(h.node.egressSets.at(-1)).toEqual({ idx: idx2, egress: { denyInternet: true, ...deny } });
    await unary(client, client.update, { sandboxId: 'eg2', endTime: undefined, allowInternetAccess: true }, 5000);
    expect(h.node.egressSets.at(-1)).toEqual({ idx: idx2, egress: { denyInternet: false, ...deny } });
    const listed = (await unary(client, client.list, {}, 5000)).sandboxes.find((s) => s.config?.sandboxId === 'eg2');
    expect(listed?.config?.allowInternetAccess).toBe(true);
    expect(listed?.config?.network?.egress?.deniedCidrs).toEqual(['8.8.8.0/24:443']);
    // Back to nothing: the slot's policy is removed (undefined = open).
    await unary(
      client,
      client.update,
      { sandboxId: 'eg2', endTime: undefined, egress: { allowedCidrs: [], deniedCidrs: [], allowedDomains: [] } },
      5000,
    );
    expect(h.node.egressSets.at(-1)).toEqual({ idx: idx2, egress: undefined });
    // Domain rules go to net-agent like the rest (its egress proxy applies them).
    const names = { allowedCidrs: [], deniedCidrs: [], allowedDomains: ['*'] };
    await unary(client, client.update, { sandboxId: 'eg1', endTime: hour(), egress: names }, 5000);
    const idx1 = h.node.slotsInUse.get('eg1')!.idx;
    expect(h.node.egressSets.at(-1)).toEqual({ idx: idx1, egress: { denyInternet: false, ...names } });
    for (const id of ['eg1', 'eg2']) await unary(client, client.delete, { sandboxId: id }, 5000);
  });

  it('takes vCPUs and memory from the build, refuses others naming both values', async () => {
    // The base build's memfile is 8 pages (rounds up to 1 MiB); its VM state has 1 vCPU.
    const ram = await failure(create({ sandboxId: 'res1', ramMb: 1024 }));
    expect(ram.code).toBe(status.INVALID_ARGUMENT);
    expect(ram.details).toContain('sandbox.ram_mb');
    expect(ram.details).toMatch(/1024 requested.*snapshotted with 1\b/);
    const cpu = await failure(create({ sandboxId: 'res2', vcpu: 4, ramMb: 0 }));
    expect(cpu.code).toBe(status.INVALID_ARGUMENT);
    expect(cpu.details).toMatch(/sandbox\.vcpu: 4 requested.*snapshotted with 1\b/);
    expect(h.node.slotsInUse.size).toBe(0);
    expect(h.vmm.running.size).toBe(0);
    await create({ sandboxId: 'res3', vcpu: 0, ramMb: 0 });
    const listed = (await unary(client, client.list, {}, 5000)).sandboxes.find((s) => s.config?.sandboxId === 'res3');
    expect({ vcpu: listed?.config?.vcpu, ramMb: listed?.config?.ramMb }).toEqual({ vcpu: 1, ramMb: 1 });
    await unary(client, client.delete, { sandboxId: 'res3' }, 5000);
  });

  it('admits 3 starting at once: a fresh create is refused at once, a resume waits for a turn', async () => {
    await create({ sandboxId: 'adm-src' });
    const paused = crypto.randomUUID();
    await unary(client, client.pause, { sandboxId: 'adm-src', templateId: 'base', buildId: paused }, 5000);
    let release!: () => void;
    h.envd.hold = new Promise<void>((r) => (release = r));
    const starting = ['adm-1', 'adm-2', 'adm-3'].map((sandboxId) => create({ sandboxId }));
    await eventually(() => h.manager.admission.starting === 3);
    const refused = await failure(create({ sandboxId: 'adm-4' }));
    expect(refused.code).toBe(status.RESOURCE_EXHAUSTED);
    expect(refused.details).toContain('sandboxes starting at once at its limit (3)');
    const resume = create({ sandboxId: 'adm-resumed', buildId: paused, snapshot: true });
    await eventually(() => h.manager.admission.waiting === 1);
    h.envd.hold = undefined;
    release();
    await Promise.all([...starting, resume]);
    const ids = (await unary(client, client.list, {}, 5000)).sandboxes.map((s) => s.config?.sandboxId).sort();
    expect(ids).toEqual(['adm-1', 'adm-2', 'adm-3', 'adm-resumed']);
    expect(h.manager.admission.starting).toBe(0);
    for (const sandboxId of ids) await unary(client, client.delete, { sandboxId: sandboxId! }, 5000);
  });

  it('survives random requests and keeps serving', async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.record({
          sandboxId: fc.string({ maxLength: 80 }),
          templateId: fc.string({ maxLength: 20 }),
          buildId: fc.oneof(fc.constant(''), fc.uuid(), fc.string()),
          vcpu: fc.integer({ min: -5, max: 20 }),
          ramMb: fc.integer({ min: -5, max: 5000 }),
          snapshot: fc.boolean(),
        }),
        async (sandbox) => {
          const code = await create(sandbox).then(
            () => status.OK,
            (e: ServiceError) => e.code,
          );
          expect([
            status.OK,
            status.INVALID_ARGUMENT,
            status.NOT_FOUND,
            status.FAILED_PRECONDITION,
            status.ALREADY_EXISTS,
          ]).toContain(code);
        },
      ),
      { numRuns: 60 },
    );
    for (const s of (await unary(client, client.list, {}, 5000)).sandboxes) {
      await unary(client, client.delete, { sandboxId: s.config!.sandboxId }, 5000);
    }
    expect(h.node.slotsInUse.size).toBe(0);
    await waitForServing(server.address, 2000);
  });
});
