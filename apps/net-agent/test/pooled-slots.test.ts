/**
 * Slots acquired for the orchestrator's VMM pool (Acquire `pooled`): when every service of the
 * node stops at once (Nomad stopping the node, Ctrl-C) the pool's Release cannot reach the
 * stopping agent, so the agent frees such a slot itself once no process is left in it; a slot a
 * sandbox runs in (it took the pooled VMM) or whose VMM is still starting is kept. The real
 * process in a throwaway node namespace (node-namespace.ts), a real Consul as the reservation store.
 */
import type { ChildProcess } from 'node:child_process';
import { mkdtemp, readlink, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { eventually } from '#test-kit';
import { AgentProcess } from './agent-process.js';
import { ConsulAgent } from '../../../libs/test-peers/src/consul-agent.js';
import { peerBinary } from '../../../libs/test-peers/src/peer-binary.js';
import { createConsulClient } from '../src/consul-slot-reservation.js';
import { NodeNamespace } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn('net-agent pooled slot tests need root (network namespaces): skipped');

let node: NodeNamespace;
let dir: string;
let consul: ConsulAgent;
const agents: AgentProcess[] = [];

async function startAgent(name: string, args: string[]): Promise<AgentProcess> {
  const agent = await AgentProcess.start(node, join(dir, `${name}.sock`), [
    '--reservation',
    'consul',
    '--consul-addr',
    consul.socketAddress,
    ...args,
  ]);
  agents.push(agent);
  return agent;
}

/** The reservation store: this node's keys in Consul. */
async function reservedKeys(): Promise<string[]> {
  const client = createConsulClient(consul.address);
  try {
    return (await client.kv.keys(`${node.prefix}/`)).sort();
  } catch (err) {
    if ((err as { statusCode?: number }).statusCode === 404) return [];
    throw err;
  } finally {
    client.destroy();
  }
}

/** A stand-in VMM in the slot's namespace, returned once it is in there. */
async function startVmm(namespace: string): Promise<ChildProcess> {
  const vmm = node.spawnIn(namespace, 'sleep', ['300']);
  const inode = (await stat(node.nsPath(namespace))).ino;
  await eventually(async () => (await readlink(`/proc/${vmm.pid}/ns/net`).catch(() => '')) === `net:[${inode}]`, {
    timeoutMs: 10_000,
    what: `a process in ${namespace}`,
  });
  return vmm;
}

function reconcileLog(agent: AgentProcess): Record<string, unknown> | undefined {
  return agent.logs
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((l) => l['msg'] === 'reconciled leftovers');
}

const byIdx = (a: number, b: number) => a - b;

beforeAll(async () => {
  if (!isRoot) return;
  peerBinary('consul');
  dir = await mkdtemp(join(tmpdir(), 'net-agent-pooled-'));
  node = await NodeNamespace.create('q');
  consul = await ConsulAgent.start({ unixSocket: join(dir, 'consul.sock') });
}, 1_800_000);

afterAll(async () => {
  for (const agent of agents) agent.kill();
  await consul?.close();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('net-agent: slots of pooled VMMs', () => {
  it('every process stopped at once (SIGTERM to all, as Nomad does): the pool slots are freed, the next agent holds none', async () => {
    const before = await node.snapshot();
    const first = await startAgent('all1', ['--pool-new-size', '2']);
    // The pool just refilled (handed out moments ago, as after a create): the hardest case.
    const pooled = [await first.acquire('vmm-pool-a', true), await first.acquire('vmm-pool-b', true)];
    const vmms = await Promise.all(pooled.map((s) => startVmm(s.namespace)));
    await first.waitFor((s) => s.readyNew === 2);
    expect(await reservedKeys()).toHaveLength(4);

    const stopped = first.stop();
    for (const vmm of vmms) vmm.kill('SIGTERM');
    expect(await stopped).toBe(0);
    expect(await node.slotNamespaces()).toEqual([]);
    expect(await reservedKeys()).toEqual([]);

    // Started alone afterwards (a drained node never starts an orchestrator again).
    const second = await startAgent('all2', ['--pool-new-size', '0']);
    expect(reconcileLog(second)?.['adopted']).toEqual([]);
    expect(await second.list()).toEqual([]);
    expect(await reservedKeys()).toEqual([]);
    expect(await second.stop()).toBe(0);
    expect(await node.snapshot()).toEqual(before);
  });

  it("a sandbox's slot from a pooled VMM, and one whose VMM is still starting, are kept across a restart and handed to nobody else", async () => {
    const before = await node.snapshot();
    const keep = ['--pool-new-size', '1', '--pooled-slot-grace-ms', '600000', '--pooled-slot-stop-wait-ms', '300'];
    const first = await startAgent('keep1', keep);
    const taken = await first.acquire('vmm-pool-taken', true);
    const vmm = await startVmm(taken.namespace);
    const starting = await first.acquire('vmm-pool-starting', true);
    expect(await first.stop()).toBe(0);
    const held = [taken, starting].map((s) => s.idx).sort(byIdx);
    expect(await node.slotNamespaces()).toEqual([taken.namespace, starting.namespace].sort());
    expect(await reservedKeys()).toEqual(held.map((i) => `${node.prefix}/${i}`).sort());

    const second = await startAgent('keep2', keep);
    expect(reconcileLog(second)?.['adopted']).toEqual(held);
    expect((await second.list()).map((s) => [s.idx, s.sandboxId])).toEqual(
      [taken, starting].sort((a, b) => a.idx - b.idx).map((s) => [s.idx, s.sandboxId]),
    );
    const other = await second.acquire('sbx-other');
    expect(held).not.toContain(other.idx);
    await second.release(other.idx, 'sbx-other');

    // The sandbox ends with the orchestrator down: nobody will release either slot. The next
    // agent (now past the grace) finds no process in them and removes both.
    vmm.kill('SIGKILL');
    await new Promise((resolve) => vmm.once('exit', resolve));
    expect(await second.stop()).toBe(0);
    const third = await startAgent('keep3', ['--pool-new-size', '0', '--pooled-slot-grace-ms', '0']);
    expect(reconcileLog(third)?.['adopted']).toEqual([]);
    expect(await reservedKeys()).toEqual([]);
    // A later Release from the pool (its orchestrator back) finds nothing: an error, no harm.
    await expect(third.release(taken.idx, 'vmm-pool-taken')).rejects.toThrow(/not in use/);
    expect(await third.stop()).toBe(0);
    expect(await node.snapshot()).toEqual(before);
  });
});
