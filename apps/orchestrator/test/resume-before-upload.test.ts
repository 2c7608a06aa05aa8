import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { eventually } from '#test-kit';
import { FakeGcsServer } from '../../../libs/test-peers/src/fake-gcs-server.js';
import { GcsFaultProxy, type LoggedRequest } from '../../../libs/storage/test/gcs-fault-proxy.js';
import { missingPieces, NodeUnderTest } from './node-under-test.js';
import { sandboxConfig } from './node-driver.js';

/*
 * DESIGN §3 Pause step 5: a resume on this node of a build paused a moment ago must not wait
 * for its upload. The whole node runs (orchestrator, uffd-server, block-server, net-agent, dns,
 * vmm-sim) on a gs:// bucket: fake-gcs-server behind a fault proxy that listens inside the
 * node's network namespace. Every upload of the new build hangs at the bucket; creating a
 * sandbox from that build must still succeed with its memory and disk intact, while the bucket
 * has none of it. Released, the upload completes.
 */
const missing = missingPieces();
const BUCKET = 'builds';
const proxy = new GcsFaultProxy();
let fakeGcs: FakeGcsServer | undefined;
let node: NodeUnderTest;

beforeAll(async () => {
  if (missing) return;
  node = await NodeUnderTest.start({
    tag: 'u',
    storage: async (n) => {
      await proxy.listen(`/run/netns/${n.nodeNs}`);
      fakeGcs = await FakeGcsServer.start({ externalUrl: proxy.endpoint });
      proxy.forwardTo(fakeGcs.endpoint);
      await fakeGcs.createBucket(BUCKET);
      return { bucket: `gs://${BUCKET}`, env: { SBX_GCS_ENDPOINT: proxy.endpoint } };
    },
  });
}, 1_800_000);

afterAll(async () => {
  proxy.clearFaults();
  proxy.releaseHung();
  await node?.stop();
  await proxy.stop();
  await fakeGcs?.stop();
}, 120_000);

async function create(id: string, extra: Partial<SandboxConfig> = {}): Promise<string> {
  const sandbox = sandboxConfig(id, extra);
  await unary(
    node.client,
    node.client.create,
    { sandbox, startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
    120_000,
  );
  const record = (await node.footprint())['dns']!.find((r) => r.startsWith(`${id}=`));
  return record!.split('=')[1]!;
}

describe.skipIf(missing !== undefined)('resume of a build paused a moment ago, its upload held at the bucket', () => {
  it('creates from the new build while the upload is still running; the upload ends once the bucket answers', async () => {
    const first = await create('before-upload');
    const memory = randomBytes(64 * 1024);
    const disk = randomBytes(32 * 1024);
    await node.writeMemory(first, 1024 * 1024, memory);
    await node.writeDisk(first, 2 * 1024 * 1024, disk);

    const buildId = crypto.randomUUID();
    const uploadOf = (r: LoggedRequest) => r.path.startsWith('/upload/') && (r.query['name'] ?? '').startsWith(buildId);
    proxy.failNext({ status: 'hang', match: uploadOf }, 1000);
    await unary(node.client, node.client.pause, { sandboxId: 'before-upload', templateId: 'base', buildId }, 120_000);
    // The upload has started and is held: the bucket has nothing of the new build.
    await eventually(() => proxy.count(uploadOf) > 0, { what: 'the upload of the new build to start' });

    const second = await create('after-pause', { snapshot: true, buildId });
    expect((await node.readMemory(second, 1024 * 1024, memory.length)).equals(memory)).toBe(true);
    expect((await node.readDisk(second, 2 * 1024 * 1024, disk.length)).equals(disk)).toBe(true);
    // Still running: only the first file's upload was tried, and nothing of the build is in the bucket.
    expect(await fakeGcs!.list(BUCKET, `${buildId}/`)).toEqual([]);
    expect(proxy.count(uploadOf)).toBeGreaterThan(0);

    proxy.clearFaults();
    proxy.releaseHung();
    await eventually(async () => (await fakeGcs!.list(BUCKET, `${buildId}/`)).includes(`${buildId}/snapfile`), {
      timeoutMs: 60_000,
      what: 'the released upload to complete',
    });
    await unary(node.client, node.client.delete, { sandboxId: 'after-pause' }, 60_000);
  }, 300_000);
});
