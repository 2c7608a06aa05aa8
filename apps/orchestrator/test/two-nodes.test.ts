/**
 * Two nodes, one cluster: two complete nodes (all five services each, separate data dirs, DNS
 * addresses, node ids, slot ranges, link and nftables names) on one throwaway machine (a network
 * namespace), sharing one real Consul agent (slot reservations) and one fake-gcs-server bucket
 * (builds). A sandbox paused on node A is resumed on node B, which has nothing cached, with memory
 * and disk byte for byte; then paused on B and resumed on A.
 */
import { execFile } from 'node:child_process';
import { randomBytes, randomUUID } from 'node:crypto';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { eventually } from '#test-kit';
import type { SandboxConfig } from '#proto/orchestrator';
import { DnsClient } from '#proto/sbx/dns';
import { ConsulAgent } from '../../../libs/test-peers/src/consul-agent.js';
import { FakeGcsServer } from '../../../libs/test-peers/src/fake-gcs-server.js';
import { MachineNamespace } from '../../../libs/test-peers/src/machine-namespace.js';
import { peerBinary } from '../../../libs/test-peers/src/peer-binary.js';
import { missingPieces, NodeUnderTest } from './node-under-test.js';
import { sandboxConfig } from './node-driver.js';

const execFileAsync = promisify(execFile);
const missing = missingPieces();
if (missing) console.warn(`two-node test skipped: missing ${missing}`);

const machineName = `tn${process.pid % 100000}`;
const BUCKET = 'builds';
let machine: MachineNamespace | undefined;
let consul: ConsulAgent | undefined;
let gcs: FakeGcsServer | undefined;
const nodes: Record<'a' | 'b', NodeUnderTest | undefined> = { a: undefined, b: undefined };

/** The node-specific part of a node on the shared machine: its slots, names and DNS address. */
function startNode(tag: 'a' | 'b', firstSlot: number, dnsListen: string): Promise<NodeUnderTest> {
  return NodeUnderTest.start({
    tag: `tn${tag}`,
    machineNs: machineName,
    dnsListen,
    // The rootfs path recorded in a snapfile is `{vm-rootfs-dir}/{baseBuildId}/rootfs.ext4`: a
    // snapshot resumes on another node only when both use the same directory.
    vmRootfsDir: `/run/${machineName}fc`,
    storage: async () => ({ bucket: `gs://${BUCKET}`, env: { SBX_GCS_ENDPOINT: gcs!.endpoint } }),
    netAgentArgs: [
      '--reservation',
      'consul',
      '--consul-addr',
      consul!.socketAddress,
      '--node-id',
      `node-${tag}-${machineName}`,
      '--first-slot',
      String(firstSlot),
      '--slot-count',
      '100',
      '--host-table',
      `sbx_net_${tag}`,
      '--host-veth-prefix',
      `v${tag}${machineName.slice(-3)}-`,
      '--removal-group',
      String(0x5b1 + firstSlot),
    ],
  });
}

async function create(node: NodeUnderTest, id: string, extra: Partial<SandboxConfig> = {}): Promise<string> {
  await unary(
    node.client,
    node.client.create,
    { sandbox: sandboxConfig(id, extra), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
    120_000,
  );
  const dns = dial(DnsClient, node.sockets.dns);
  try {
    const record = (await unary(dns, dns.list, {}, 5000)).records.find((r) => r.name === id);
    if (!record) throw new Error(`no DNS record for ${id} on ${node.prefix}`);
    return record.ip;
  } finally {
    dns.close();
  }
}

/** Until every file of the build is in the bucket (a pause uploads in the background). */
async function uploaded(buildId: string): Promise<string[]> {
  const want = ['memfile', 'memfile.header', 'rootfs.ext4', 'rootfs.ext4.header', 'snapfile'].map(
    (f) => `${buildId}/${f}`,
  );
  return eventually(
    async () => {
      const objects = await gcs!.list(BUCKET, `${buildId}/`);
      return want.every((w) => objects.includes(w)) ? objects : false;
    },
    { what: `every file of build ${buildId} in the bucket`, timeoutMs: 60_000 },
  );
}

/** Bytes a node's build caches hold on disk (sparse chunk files: what was fetched). */
async function cachedBytes(node: NodeUnderTest): Promise<number> {
  const { stdout } = await execFileAsync('du', ['-sB1', node.cacheDir]).catch(() => ({ stdout: '0' }));
  return Number(stdout.split(/\s/)[0]);
}

interface Image {
  memory: Buffer;
  disk: Buffer;
}

const MEMORY = 16 * 1024 * 1024;
const DISK = 8 * 1024 * 1024;

/** The whole of guest memory and disk, read through the guest (the vmm-sim double's test endpoints). */
async function image(node: NodeUnderTest, ip: string): Promise<Image> {
  return { memory: await node.readMemory(ip, 0, MEMORY), disk: await node.readDisk(ip, 0, DISK) };
}

async function scribble(node: NodeUnderTest, ip: string): Promise<void> {
  for (let i = 0; i < 4; i++) {
    await node.writeMemory(ip, (i * 3 + 1) * 1024 * 1024 + i * 4096, randomBytes(64 * 1024));
    await node.writeDisk(ip, (i * 2 + 1) * 1024 * 1024 + i * 512 * 8, randomBytes(32 * 1024));
  }
}

async function consulKeys(prefix: string): Promise<string[]> {
  const { createConsulClient } = await import('../../net-agent/src/consul-slot-reservation.js');
  const client = createConsulClient(consul!.address);
  try {
    return await client.kv.keys(prefix);
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return [];
    throw err;
  } finally {
    client.destroy();
  }
}

beforeAll(async () => {
  if (missing) return;
  peerBinary('consul');
  peerBinary('fake-gcs-server');
  machine = await MachineNamespace.create(machineName);
  consul = await ConsulAgent.start({ unixSocket: `/tmp/${machineName}-consul.sock` });
  gcs = await FakeGcsServer.start({ netns: machineName });
  await gcs.createBucket(BUCKET);
  // Both at once; a node that started is kept for afterAll to stop even when the other failed.
  const [a, b] = await Promise.allSettled([startNode('a', 1, '127.0.0.4:53'), startNode('b', 101, '127.0.0.5:53')]);
  if (a.status === 'fulfilled') nodes.a = a.value;
  if (b.status === 'fulfilled') nodes.b = b.value;
  for (const started of [a, b]) if (started.status === 'rejected') throw started.reason;
}, 1_800_000);

afterAll(async () => {
  await Promise.all([nodes.a?.stop(), nodes.b?.stop()]);
  await gcs?.stop();
  await consul?.close();
  await machine?.remove();
}, 120_000);

describe.skipIf(missing !== undefined)('two nodes, one Consul, one bucket', { timeout: 300_000 }, () => {
  it('both nodes reserve slots in the same Consul KV, each in its own range, no index twice', async () => {
    const a = await consulKeys(`node-a-${machineName}/`);
    const b = await consulKeys(`node-b-${machineName}/`);
    expect(a.length).toBeGreaterThanOrEqual(4);
    expect(b.length).toBeGreaterThanOrEqual(4);
    const idx = (keys: string[]) => keys.map((k) => Number(k.split('/').pop()));
    expect(idx(a).every((i) => i >= 1 && i <= 100)).toBe(true);
    expect(idx(b).every((i) => i >= 101 && i <= 200)).toBe(true);
    expect(new Set([...idx(a), ...idx(b)]).size).toBe(a.length + b.length);
  });

  it('a sandbox paused on A resumes on B (cold cache) byte for byte, then pauses on B and resumes on A', async () => {
    const a = nodes.a!;
    const b = nodes.b!;
    const id = 'wanderer';
    let ip = await create(a, id);
    await scribble(a, ip);
    const onA = await image(a, ip);

    const first = randomUUID();
    await unary(a.client, a.client.pause, { sandboxId: id, templateId: 'base', buildId: first }, 120_000);
    await uploaded(first);

    const coldBefore = await cachedBytes(b);
    let started = Date.now();
    ip = await create(b, id, { snapshot: true, buildId: first });
    const resumeMs = Date.now() - started;
    const fetchedByResume = (await cachedBytes(b)) - coldBefore;
    const onB = await image(b, ip);
    const fetchedInAll = (await cachedBytes(b)) - coldBefore;
    expect(onB.memory.equals(onA.memory), 'memory on B equals memory on A').toBe(true);
    expect(onB.disk.equals(onA.disk), 'disk on B equals disk on A').toBe(true);
    console.info(
      `two nodes: resume on B (cold cache) ${resumeMs} ms, ${fetchedByResume} bytes fetched by the resume, ` +
        `${fetchedInAll} bytes after reading all ${MEMORY} bytes of memory and ${DISK} of disk`,
    );

    await scribble(b, ip);
    const changedOnB = await image(b, ip);
    const second = randomUUID();
    await unary(b.client, b.client.pause, { sandboxId: id, templateId: 'base', buildId: second }, 120_000);
    await uploaded(second);

    const warmBefore = await cachedBytes(a);
    started = Date.now();
    ip = await create(a, id, { snapshot: true, buildId: second });
    const backMs = Date.now() - started;
    const back = await image(a, ip);
    expect(back.memory.equals(changedOnB.memory), 'memory back on A equals memory on B').toBe(true);
    expect(back.disk.equals(changedOnB.disk), 'disk back on A equals disk on B').toBe(true);
    console.info(
      `two nodes: resume back on A ${backMs} ms, ${(await cachedBytes(a)) - warmBefore} bytes fetched (A had the parent)`,
    );
    await unary(a.client, a.client.delete, { sandboxId: id }, 60_000);
  });
});
