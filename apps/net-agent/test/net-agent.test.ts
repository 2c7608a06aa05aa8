/**
 * net-agent end to end: the real process in a throwaway node namespace (see node-namespace.ts),
 * driven only through its control socket. Traffic goes only to addresses this test creates.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NetSlot } from '#proto/sbx/net';
import { openFds, sbx } from '#test-kit';
import { AgentProcess } from './agent-process.js';
import { ConsulAgent } from '../../../libs/test-peers/src/consul-agent.js';
import { peerBinary } from '../../../libs/test-peers/src/peer-binary.js';
import { createConsulClient } from '../src/consul-slot-reservation.js';
import { INTERNET_IP, METADATA_IP, NodeNamespace, PRIVATE_IP, UPLINK_NODE_IP } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn('net-agent integration tests need root (network namespaces): skipped');

let node: NodeNamespace;
let dir: string;
const agents: AgentProcess[] = [];
const consuls: ConsulAgent[] = [];

let agentCount = 0;

async function startAgent(args: string[], name = `net${++agentCount}`): Promise<AgentProcess> {
  const agent = await AgentProcess.start(node, join(dir, `${name}.sock`), args);
  agents.push(agent);
  return agent;
}

/** A real Consul agent (a test peer); net-agent reaches it at `socketAddress`. */
async function startConsul(name: string): Promise<ConsulAgent> {
  // A Unix socket: the agent runs in the node namespace, where the test's loopback is not reachable.
  const consul = await ConsulAgent.start({ unixSocket: join(dir, `${name}.consul.sock`) });
  consuls.push(consul);
  return consul;
}

async function kvKeys(consul: ConsulAgent, prefix: string): Promise<string[]> {
  const client = createConsulClient(consul.address);
  try {
    return (await client.kv.keys(prefix)).sort();
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return [];
    throw err;
  } finally {
    client.destroy();
  }
}

async function kvValue(consul: ConsulAgent, key: string): Promise<string | undefined> {
  const client = createConsulClient(consul.address);
  try {
    const pair = (await client.kv.get(key)) as { Value: string | null } | undefined;
    return pair ? (pair.Value ?? '') : undefined;
  } finally {
    client.destroy();
  }
}

function grpcCode(err: unknown): number | undefined {
  return (err as ServiceError).code;
}

beforeAll(async () => {
  if (!isRoot) return;
  // Builds the Consul test peer on a machine that does not have it yet (minutes, once).
  peerBinary('consul');
  dir = await mkdtemp(join(tmpdir(), 'net-agent-test-'));
  node = await NodeNamespace.create();
}, 1_800_000);

afterAll(async () => {
  for (const agent of agents) agent.kill();
  for (const consul of consuls) await consul.close();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('net-agent in a throwaway node namespace', () => {
  it('a slot carries traffic: node → guest via host IP, guest → internet, no guest → private or metadata', async () => {
    await node.startServer(node.internet, '0.0.0.0', 8080, 'internet');
    const agent = await startAgent(['--pool-new-size', '2']);
    const slot = await agent.acquire('sbx-traffic');
    expect(slot.namespace.startsWith(node.slotPrefix)).toBe(true);
    expect(slot.hostIp).toMatch(/^10\.11\./);
    expect(await node.namespaceState(slot.namespace)).toEqual(expectedNamespaceState(slot));
    const guest = await node.attachGuest(slot);
    await node.startServer(guest, slot.guestIp, 49983, 'guest');

    // The node reaches the sandbox at its host IP (DNAT in the slot namespace); the reply is an
    // established connection, so the egress block on private ranges does not stop it.
    expect(await node.probe(node.node, slot.hostIp, 49983)).toBe(`guest saw ${slot.hostVethIp}`);
    // The guest reaches the internet, SNAT-ed to its host IP and masqueraded out of the uplink.
    expect(await node.probe(guest, INTERNET_IP, 8080)).toBe(`internet saw ${UPLINK_NODE_IP}`);
    // The node itself reaches the private and metadata addresses: only the guest is blocked.
    expect(await node.probe(node.node, PRIVATE_IP, 8080)).toBe(`internet saw ${UPLINK_NODE_IP}`);
    expect(await node.probe(node.node, METADATA_IP, 8080)).toBe(`internet saw ${UPLINK_NODE_IP}`);
    expect(await node.probe(guest, PRIVATE_IP, 8080, 0.7)).toBeUndefined();
    expect(await node.probe(guest, METADATA_IP, 8080, 0.7)).toBeUndefined();
    expect(await node.probe(guest, slot.hostVethIp, 8080, 0.7)).toBeUndefined();

    await agent.release(slot.idx, 'sbx-traffic');
    expect(await node.slotNamespaces()).not.toContain(slot.namespace);
    expect(await node.probe(node.node, slot.hostIp, 49983, 0.5)).toBeUndefined();
    expect(await agent.stop()).toBe(0);
  });

  it('bad requests get clear errors and the agent keeps serving (slots set up by ip and nft processes)', async () => {
    const agent = await startAgent([
      '--pool-new-size',
      '1',
      '--namespace-setup',
      'ip',
      '--nft-mode',
      'process',
      '--metrics-port',
      '19463',
    ]);
    await expect(agent.acquire('')).rejects.toSatisfy((e) => grpcCode(e) === status.INVALID_ARGUMENT);
    await expect(agent.acquire('../etc')).rejects.toSatisfy((e) => grpcCode(e) === status.INVALID_ARGUMENT);
    await expect(agent.release(99_999, 'x')).rejects.toSatisfy((e) => grpcCode(e) === status.NOT_FOUND);
    const slot = await agent.acquire('owner');
    expect(await node.namespaceState(slot.namespace)).toEqual(expectedNamespaceState(slot));
    const err = await agent.release(slot.idx, 'intruder').catch((e: unknown) => e);
    expect(grpcCode(err)).toBe(status.FAILED_PRECONDITION);
    expect((err as Error).message).toContain('owner');
    expect((await agent.list()).map((s) => s.sandboxId)).toEqual(['owner']);
    // Metrics listen on the node's loopback (inside the node namespace).
    const metrics = await node.mustExec(node.node, 'python3', [
      '-c',
      'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:19463/metrics", timeout=5).read().decode())',
    ]);
    expect(metrics).toMatch(/sbx_net_agent_slots_in_use\{service="net-agent"\} 1/);
    expect(metrics).toMatch(/sbx_net_agent_requests_total\{method="acquire",result="invalid",service="net-agent"\} 2/);
    await agent.release(slot.idx, 'owner', true);
    expect((await agent.stats()).readyReused).toBe(1);
    expect(await agent.stop()).toBe(0);
  });

  it('creates and removes 200 slots with Consul KV reservation and leaves nothing behind', async () => {
    const consul = await startConsul('two-hundred');
    const before = await node.snapshot();
    const agent = await startAgent([
      '--reservation',
      'consul',
      '--consul-addr',
      consul.socketAddress,
      '--pool-new-size',
      '200',
      '--pool-reused-size',
      '50',
      '--create-batch',
      '50',
    ]);
    await agent.waitFor((s) => s.readyNew === 200, 60_000);
    const fdsAtStart = agentFds(agent);
    expect(await kvKeys(consul, `${node.prefix}/`)).toHaveLength(200);
    expect(await node.slotNamespaces()).toHaveLength(200);
    const during = await node.snapshot();
    expect(during.links.filter((l) => l.startsWith('veth-'))).toHaveLength(200);
    expect(during.rules).toContain('table ip sbx_net');

    const slots = await Promise.all(Array.from({ length: 200 }, (_, i) => agent.acquire(`sbx-${i}`)));
    expect(new Set(slots.map((s) => s.idx)).size).toBe(200);
    expect(new Set(slots.map((s) => s.hostIp)).size).toBe(200);
    // Half removed at once, a quarter kept for reuse, the rest still in use at the agent's stop.
    await Promise.all(slots.slice(0, 100).map((s, i) => agent.release(s.idx, `sbx-${i}`)));
    await Promise.all(slots.slice(100, 150).map((s, i) => agent.release(s.idx, `sbx-${100 + i}`, true)));
    const mid = await agent.stats();
    expect(mid.readyReused).toBe(50);
    expect(mid.inUse).toBe(50);
    expect(mid.removed).toBe(100);
    // The refill makes 200 new ones again; a full create/remove cycle must not leave fds behind.
    await agent.waitFor((s) => s.readyNew === 200, 60_000);
    expect(agentFds(agent)).toEqual(fdsAtStart);

    // The 50 in use stay with their sandboxes (namespaces, links, keys) for the next run to adopt.
    expect(await agent.stop()).toBe(0);
    const inUse = slots.slice(150);
    expect(await node.slotNamespaces()).toEqual(inUse.map((s) => s.namespace).sort());
    expect(await kvKeys(consul, `${node.prefix}/`)).toEqual(inUse.map((s) => `${node.prefix}/${s.idx}`).sort());
    const next = await startAgent([
      '--reservation',
      'consul',
      '--consul-addr',
      consul.socketAddress,
      '--pool-new-size',
      '0',
    ]);
    const adopted = await next.list();
    expect(adopted.map((s) => s.sandboxId).sort()).toEqual(inUse.map((_, i) => `sbx-${150 + i}`).sort());
    await Promise.all(inUse.map((s, i) => next.release(s.idx, `sbx-${150 + i}`)));
    expect(await next.stop()).toBe(0);
    const after = await node.snapshot();
    expect(after).toEqual(before);
    expect(await kvKeys(consul, `${node.prefix}/`)).toEqual([]);
  });

  it('reconciles after a crash: leftovers removed fast, a slot still in use adopted', async () => {
    const consul = await startConsul('reconcile');
    const before = await node.snapshot();
    const args = ['--reservation', 'consul', '--consul-addr', consul.socketAddress, '--pool-new-size', '4'];
    const first = await startAgent(args, 'crash1');
    const used = await first.acquire('survivor');
    const dropped = await first.acquire('lost');
    const vmm = node.spawnIn(used.namespace, 'sleep', ['120']);
    // Let the refill finish so the crash leaves a known set: 2 in use + 4 ready.
    await first.waitFor((s) => s.readyNew === 4);
    await first.crash();

    // Leftovers of a bigger crashed run: 1000 namespaces and veths in our naming, and their keys.
    // (Indexes the crashed agent did not hold: Consul reservation picks them at random.)
    const taken = new Set(await node.slotNamespaces());
    const leftoverIdx: number[] = [];
    for (let i = 5000; leftoverIdx.length < 1000; i++) if (!taken.has(`${node.slotPrefix}${i}`)) leftoverIdx.push(i);
    await node.mustExec(
      node.node,
      'ip',
      ['-batch', '-'],
      leftoverIdx
        .map(
          (i) =>
            `netns add ${node.slotPrefix}${i}\nlink add veth-${i} type veth peer name eth0 netns ${node.slotPrefix}${i}\n`,
        )
        .join(''),
    );
    const leftoverKeys = await AgentKeys.put(consul, `${node.prefix}/`, leftoverIdx.slice(0, 100));
    expect(await node.slotNamespaces()).toHaveLength(1000 + 6);

    const second = await startAgent(args, 'crash2');
    const reconciled = second.logs
      .map((l) => JSON.parse(l) as Record<string, unknown>)
      .find((l) => l['msg'] === 'reconciled leftovers');
    // Both slots handed out are kept: one has its VMM, the other is marked with its sandbox.
    expect(reconciled?.['adopted']).toEqual([used.idx, dropped.idx].sort((a, b) => a - b));
    expect(reconciled?.['removed']).toBe(1000 + 4);
    expect(Number(reconciled?.['ms'])).toBeGreaterThan(0);
    console.info(
      `reconcile removed ${String(reconciled?.['removed'])} leftover slots in ${String(reconciled?.['ms'])} ms`,
    );

    const listed = await second.list();
    expect(listed.map((s) => [s.idx, s.sandboxId])).toEqual(
      [
        [used.idx, 'survivor'],
        [dropped.idx, 'lost'],
      ].sort((a, b) => Number(a[0]) - Number(b[0])),
    );
    const namespaces = await node.slotNamespaces();
    expect(namespaces).toContain(used.namespace);
    expect(namespaces).toContain(dropped.namespace);
    // Each leftover key is released, or (random reservation) taken afresh by the new agent.
    for (const key of leftoverKeys) {
      const value = await kvValue(consul, key);
      if (value !== undefined) expect((JSON.parse(value) as { pid: number }).pid).toBe(second.child.pid);
    }
    const released = [];
    for (const k of leftoverKeys) if ((await kvValue(consul, k)) === undefined) released.push(k);
    expect(released.length).toBeGreaterThan(90);
    expect(await kvKeys(consul, `${node.prefix}/${used.idx}`)).toEqual([`${node.prefix}/${used.idx}`]);
    // The adopted slot still routes: its host route and rules were kept.
    const guest = await node.attachGuest(used);
    await node.startServer(guest, used.guestIp, 49983, 'adopted');
    expect(await node.probe(node.node, used.hostIp, 49983)).toBe(`adopted saw ${used.hostVethIp}`);

    vmm.kill('SIGKILL');
    await second.release(used.idx, '');
    // The orchestrator gives back what a sandbox it lost held (its restart reconcile does).
    await second.release(dropped.idx, 'lost');
    expect(await second.stop()).toBe(0);
    expect(await node.snapshot()).toEqual(before);
    expect(await kvKeys(consul, `${node.prefix}/`)).toEqual([]);
  });

  it('`net-agent cleanup` removes leftovers once and exits', async () => {
    const before = await node.snapshot();
    const idx = Array.from({ length: 20 }, (_, i) => 9000 + i);
    await node.mustExec(
      node.node,
      'ip',
      ['-batch', '-'],
      idx
        .map(
          (i) =>
            `netns add ${node.slotPrefix}${i}\nlink add veth-${i} type veth peer name eth0 netns ${node.slotPrefix}${i}\n`,
        )
        .join(''),
    );
    const out = await node.mustExec(node.node, sbx, [
      'net-agent',
      'cleanup',
      '--namespace-prefix',
      node.slotPrefix,
      '--log-level',
      'warn',
    ]);
    expect(out).toContain('removed 20 leftover slot(s)');
    expect(await node.snapshot()).toEqual(before);
  });

  it('two agents racing for the same node id in Consul never hold the same slot', async () => {
    const consul = await startConsul('race');
    const other = await NodeNamespace.create('b');
    try {
      const args = ['--reservation', 'consul', '--consul-addr', consul.socketAddress, '--node-id', 'shared-node'];
      const sized = [...args, '--slot-count', '50', '--pool-new-size', '30', '--create-batch', '10'];
      const [a, b] = await Promise.all([
        startAgent(sized, 'race-a'),
        AgentProcess.start(other, join(dir, 'race-b.sock'), sized).then((agent) => (agents.push(agent), agent)),
      ]);
      // 60 wanted, 50 exist: between them they fill all 50, each index once, and the loser of
      // the last ones reports exhaustion instead of sharing.
      await a.waitFor(async () => (await a.stats()).readyNew + (await b.stats()).readyNew === 50);
      const keys = await kvKeys(consul, 'shared-node/');
      expect(keys).toHaveLength(50);
      const slotsA = await Promise.all(
        Array.from({ length: (await a.stats()).readyNew }, (_, i) => a.acquire(`a-${i}`)),
      );
      const slotsB = await Promise.all(
        Array.from({ length: (await b.stats()).readyNew }, (_, i) => b.acquire(`b-${i}`)),
      );
      const all = [...slotsA, ...slotsB].map((s) => s.idx);
      expect(new Set(all).size).toBe(50);
      expect(all.map((i) => `shared-node/${i}`).sort()).toEqual(keys);
      const lastErrors = [(await a.stats()).lastError, (await b.stats()).lastError].join(' ');
      expect(lastErrors).toMatch(/no free slot index/);
      // Slots still in use at a stop stay with their sandboxes: give them back first.
      await Promise.all(slotsA.map((s, i) => a.release(s.idx, `a-${i}`)));
      await Promise.all(slotsB.map((s, i) => b.release(s.idx, `b-${i}`)));
      expect(await a.stop()).toBe(0);
      expect(await b.stop()).toBe(0);
      expect(await kvKeys(consul, 'shared-node/')).toEqual([]);
    } finally {
      await other.cleanup();
    }
  });

  it('during a Consul outage ready slots are still handed out, then a clear error, then recovery', async () => {
    const consul = await startConsul('outage');
    const agent = await startAgent([
      '--reservation',
      'consul',
      '--consul-addr',
      consul.socketAddress,
      '--pool-new-size',
      '2',
      '--acquire-timeout-ms',
      '300',
      '--refill-backoff-min-ms',
      '50',
      '--refill-backoff-max-ms',
      '200',
    ]);
    await agent.waitFor((s) => s.readyNew === 2);
    await consul.stop();
    const a = await agent.acquire('during-1');
    const b = await agent.acquire('during-2');
    const err = await agent.acquire('during-3').catch((e: unknown) => e);
    expect(grpcCode(err)).toBe(status.RESOURCE_EXHAUSTED);
    expect((err as Error).message).toMatch(/unavailable/);
    expect((err as Error).message).toContain(consul.socketAddress);
    // A release while Consul is down removes the network now and the key once Consul is back.
    await agent.release(a.idx, 'during-1');
    expect((await agent.stats()).pendingReleases).toBe(1);

    await consul.start();
    await agent.waitFor((s) => s.readyNew === 2 && s.pendingReleases === 0 && s.lastError === '', 15_000);
    const c = await agent.acquire('after');
    expect(await kvKeys(consul, `${node.prefix}/${a.idx}`)).toEqual(a.idx === c.idx ? [`${node.prefix}/${a.idx}`] : []);
    await agent.release(b.idx, 'during-2');
    await agent.release(c.idx, 'after');
    expect(await agent.stop()).toBe(0);
    expect(await kvKeys(consul, `${node.prefix}/`)).toEqual([]);
  });
});

/** The agent's open file descriptors, by what they point at (sockets and pipes by kind only). */
function agentFds(agent: AgentProcess): string[] {
  return openFds(agent.service.pid)
    .map((target) => target.replace(/\[\d+\]$/, '[]'))
    .sort();
}

/** What both set-up paths (rtnetlink in the agent, or ip -batch) must leave in a slot's namespace. */
function expectedNamespaceState(slot: NetSlot) {
  const tapNet = slot.tapIp.replace(
    /\.\d+$/,
    `.${Number(slot.tapIp.split('.')[3]) & ~((1 << (32 - slot.tapPrefix)) - 1)}`,
  );
  return {
    addresses: [`eth0 ${slot.nsVethIp}/31`, `lo 127.0.0.1/8`, `tap0 ${slot.tapIp}/${slot.tapPrefix}`].sort(),
    routes: [
      `default via ${slot.hostVethIp} dev eth0`,
      `${slot.hostVethIp}/31 dev eth0 proto kernel scope link src ${slot.nsVethIp}`,
      `${tapNet}/${slot.tapPrefix} dev tap0 proto kernel scope link src ${slot.tapIp}`,
    ].sort(),
  };
}

/** Writes reservation keys the way a crashed agent would have left them. */
const AgentKeys = {
  async put(consul: ConsulAgent, base: string, idx: number[]): Promise<string[]> {
    const client = createConsulClient(consul.address);
    try {
      for (const i of idx) await client.kv.set({ key: `${base}${i}`, value: '{}', cas: 0 });
    } finally {
      client.destroy();
    }
    return idx.map((i) => `${base}${i}`);
  },
};
