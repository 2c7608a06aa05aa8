import { execFile } from 'node:child_process';
import { randomUUID } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { status, type Client, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { repoRoot } from '#test-kit';
import { NodeDriver } from './node-driver.js';
import { missingPieces } from './node-under-test.js';

/*
 * An upstream control plane written for E2B's current orchestrator.proto works against this node
 * unchanged: the client is generated (protoc + ts-proto, as `npm run proto` does for ours) from
 * E2B's file in fixtures/e2b, not from proto/orchestrator.proto, and drives create with a network
 * config, list, checkpoint, pause, resume and delete over a whole node. A client generated from
 * the seed's file (fixtures/seed) still works too.
 */

const missing = missingPieces();
const run = promisify(execFile);

/** The parts of a ts-proto SandboxService client this test calls; messages are plain objects. */
interface GeneratedClient extends Client {
  create: (...args: never[]) => unknown;
  list: (...args: never[]) => unknown;
  update: (...args: never[]) => unknown;
  pause: (...args: never[]) => unknown;
  delete: (...args: never[]) => unknown;
  checkpoint?: (...args: never[]) => unknown;
}
type ClientClass = new (...args: never[]) => GeneratedClient;
type Call = (
  client: GeneratedClient,
  method: keyof GeneratedClient,
  request: object,
) => Promise<Record<string, unknown>>;

const call: Call = (client, method, request) =>
  unary(client, client[method] as never, request as never, 120_000) as Promise<Record<string, unknown>>;

/** Generates TypeScript for one fixture proto into a directory under this test (removed after). */
async function generateClient(fixture: string, out: string): Promise<ClientClass> {
  await mkdir(out, { recursive: true });
  await run('protoc', [
    `--plugin=protoc-gen-ts_proto=${join(repoRoot, 'node_modules/.bin/protoc-gen-ts_proto')}`,
    `--ts_proto_out=${out}`,
    '--ts_proto_opt=outputServices=grpc-js,esModuleInterop=true,env=node,importSuffix=.js,forceLong=number,useDate=true,useExactTypes=false',
    '-I',
    join(import.meta.dirname, 'fixtures', fixture),
    '-I',
    '/usr/include',
    'orchestrator.proto',
  ]);
  const module = (await import(join(out, 'orchestrator.ts'))) as { SandboxServiceClient: ClientClass };
  return module.SandboxServiceClient;
}

function config(sandboxId: string, extra: Record<string, unknown> = {}): Record<string, unknown> {
  // As E2B's API fills it for a template of 1 vCPU and 128 MiB (the node's sample template here).
  return {
    templateId: 'base',
    buildId: '',
    kernelVersion: 'vmlinux-6.1.102',
    firecrackerVersion: 'v1.12.1_d990331',
    hugePages: false,
    sandboxId,
    envVars: { FROM: 'e2b' },
    metadata: { owner: 'control-plane' },
    envdVersion: '0.2.4',
    vcpu: 1,
    ramMb: 128,
    teamId: 'team-e2b',
    maxSandboxLength: 24,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: 'base',
    autoPause: false,
    executionId: randomUUID(),
    volumeMounts: [],
    ...extra,
  };
}

describe.skipIf(missing !== undefined)('E2B control plane client', () => {
  let d: NodeDriver;
  const genDir = join(import.meta.dirname, `.generated-${process.pid}`);
  let E2bClient: ClientClass;
  let SeedClient: ClientClass;

  beforeAll(async () => {
    E2bClient = await generateClient('e2b', join(genDir, 'e2b'));
    SeedClient = await generateClient('seed', join(genDir, 'seed'));
    d = await NodeDriver.start({ tag: 'e2bcl', sampleMemoryMb: 128 });
  }, 240_000);

  afterAll(async () => {
    await d?.stop();
    await rm(genDir, { recursive: true, force: true });
  }, 120_000);

  const times = () => ({ startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) });

  it('creates with a network config, lists, checkpoints, pauses, resumes and deletes', async () => {
    const client = dial(E2bClient as never, d.node.sockets.orchestrator) as GeneratedClient;
    try {
      const network = {
        ingress: { trafficAccessToken: 'e2b-traffic-token', maskRequestHost: 'localhost:3000' },
        egress: { allowedCidrs: [], deniedCidrs: [], allowedDomains: [] },
      };
      const created = await call(client, 'create', {
        sandbox: config('e2b-1', {
          envdAccessToken: 'envd-secret',
          allowInternetAccess: true,
          network,
          autoResume: { policy: 'any' },
        }),
        ...times(),
      });
      // This node's id, as E2B's orchestrator answers (its client id is the node id).
      expect(created['clientId']).toBe(hostname());

      const listed = (await call(client, 'list', {}))['sandboxes'] as Record<string, Record<string, unknown>>[];
      const mine = listed.find((s) => s['config']?.['sandboxId'] === 'e2b-1');
      expect(mine?.['clientId']).toBe(hostname());
      expect(mine?.['config']).toMatchObject({
        vcpu: 1,
        ramMb: 128,
        network: { ingress: network.ingress },
        autoResume: { policy: 'any' },
        allowInternetAccess: true,
        envdAccessToken: 'envd-secret',
      });

      const checkpointBuild = randomUUID();
      await call(client, 'checkpoint', { sandboxId: 'e2b-1', buildId: checkpointBuild });
      const afterCheckpoint = (await call(client, 'list', {}))['sandboxes'] as Record<string, unknown>[];
      expect(afterCheckpoint.length).toBe(1);

      const pausedBuild = randomUUID();
      await call(client, 'pause', { sandboxId: 'e2b-1', templateId: 'base', buildId: pausedBuild });
      expect((await call(client, 'list', {}))['sandboxes']).toEqual([]);

      await call(client, 'create', {
        sandbox: config('e2b-1', { buildId: pausedBuild, snapshot: true, network }),
        ...times(),
      });
      // The checkpoint build starts a second sandbox of its own.
      await call(client, 'create', {
        sandbox: config('e2b-2', { buildId: checkpointBuild, snapshot: true }),
        ...times(),
      });
      const ids = ((await call(client, 'list', {}))['sandboxes'] as Record<string, Record<string, unknown>>[])
        .map((s) => s['config']?.['sandboxId'])
        .sort();
      expect(ids).toEqual(['e2b-1', 'e2b-2']);

      await call(client, 'update', { sandboxId: 'e2b-1', endTime: new Date(Date.now() + 7_200_000) });
      await call(client, 'delete', { sandboxId: 'e2b-1' });
      await call(client, 'delete', { sandboxId: 'e2b-2' });
      expect((await call(client, 'list', {}))['sandboxes']).toEqual([]);
    } finally {
      client.close();
    }
    await d.expectFootprintBack();
  }, 300_000);

  it('refuses volume mounts with UNIMPLEMENTED naming the field, and other resources than the build', async () => {
    const client = dial(E2bClient as never, d.node.sockets.orchestrator) as GeneratedClient;
    try {
      const mount = await call(client, 'create', {
        sandbox: config('e2b-vol', { volumeMounts: [{ id: 'vol-1', path: '/data', type: 'nfs', name: 'data' }] }),
        ...times(),
      }).catch((e: ServiceError) => e);
      expect((mount as ServiceError).code).toBe(status.UNIMPLEMENTED);
      expect((mount as ServiceError).details).toContain('sandbox.volumeMounts');
      const big = await call(client, 'create', { sandbox: config('e2b-big', { ramMb: 1024 }), ...times() }).catch(
        (e: ServiceError) => e,
      );
      expect((big as ServiceError).code).toBe(status.INVALID_ARGUMENT);
      expect((big as ServiceError).details).toMatch(/sandbox\.ram_mb: 1024 requested.*snapshotted with 128/);
      expect((await call(client, 'list', {}))['sandboxes']).toEqual([]);
    } finally {
      client.close();
    }
    await d.expectFootprintBack();
  }, 120_000);

  it("the seed proto's client still creates, pauses, resumes and deletes", async () => {
    const client = dial(SeedClient as never, d.node.sockets.orchestrator) as GeneratedClient;
    try {
      const seedConfig = (id: string, extra: Record<string, unknown> = {}) => {
        const all = config(id, extra);
        // The seed's SandboxConfig ends at auto_pause (18).
        for (const field of ['envdAccessToken', 'executionId', 'allowInternetAccess', 'volumeMounts'])
          delete all[field];
        return all;
      };
      await call(client, 'create', { sandbox: seedConfig('seed-1'), ...times() });
      const build = randomUUID();
      await call(client, 'pause', { sandboxId: 'seed-1', templateId: 'base', buildId: build });
      await call(client, 'create', { sandbox: seedConfig('seed-1', { buildId: build, snapshot: true }), ...times() });
      const listed = (await call(client, 'list', {}))['sandboxes'] as Record<string, Record<string, unknown>>[];
      expect(listed.map((s) => s['config']?.['sandboxId'])).toEqual(['seed-1']);
      await call(client, 'delete', { sandboxId: 'seed-1' });
    } finally {
      client.close();
    }
    await d.expectFootprintBack();
  }, 180_000);
});
