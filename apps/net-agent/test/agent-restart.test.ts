/**
 * net-agent restarted under running sandboxes (a SIGTERM then a start, as Nomad does, or a
 * crash): the slots sandboxes hold keep working, and the next run adopts them, puts back what
 * they lost and gives back only the slots no sandbox holds. The real process in a throwaway
 * node namespace (node-namespace.ts); traffic goes only to addresses this test creates.
 */
import { spawn, type ChildProcess, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface, type Interface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { NetSlot } from '#proto/sbx/net';
import { AgentProcess } from './agent-process.js';
import { INTERNET_IP, NodeNamespace, UPLINK_NODE_IP } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn('net-agent restart tests need root (network namespaces): skipped');

const SLOT_TABLE = 'sbx_slot';

/** Echoes each line back with the address it came from, on every connection, for as long as it stays open. */
const PY_ECHO = `
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("ready", flush=True)
def serve(c, a):
    f = c.makefile("rwb")
    for line in f:
        f.write(line.strip() + b" from " + a[0].encode() + b"\\n"); f.flush()
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()
`;

/** One TCP connection held open: sends each stdin line over it and prints the answer; exits when it breaks. */
const PY_HOLD = `
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
f = c.makefile("rwb")
print("connected", flush=True)
for line in sys.stdin:
    f.write(line.encode()); f.flush()
    answer = f.readline()
    if not answer: print("closed", flush=True); sys.exit(1)
    print(answer.decode().strip(), flush=True)
`;

class HeldConnection {
  private readonly lines: Interface;
  private constructor(readonly child: ChildProcessWithoutNullStreams) {
    this.lines = createInterface({ input: child.stdout });
  }

  static async open(node: NodeNamespace, ns: string, host: string, port: number): Promise<HeldConnection> {
    const child = spawn('nsenter', [`--net=${node.nsPath(ns)}`, 'python3', '-c', PY_HOLD, host, String(port)]);
    const conn = new HeldConnection(child);
    expect(await conn.next()).toBe('connected');
    return conn;
  }

  private next(): Promise<string> {
    return new Promise((resolve, reject) => {
      const onExit = (code: number | null) => reject(new Error(`connection holder exited ${code}`));
      this.child.once('exit', onExit);
      this.lines.once('line', (line) => {
        this.child.off('exit', onExit);
        resolve(line);
      });
    });
  }

  /** Sends `word` over the held connection; the echo, or the reason it failed. */
  say(word: string): Promise<string> {
    this.child.stdin.write(`${word}\n`);
    return this.next().catch((err: Error) => err.message);
  }

  close(): void {
    this.child.kill('SIGKILL');
  }
}

let node: NodeNamespace;
let dir: string;
const agents: AgentProcess[] = [];
const held: HeldConnection[] = [];
const servers: ChildProcess[] = [];

async function startAgent(name: string, args: string[]): Promise<AgentProcess> {
  const agent = await AgentProcess.start(node, join(dir, `${name}.sock`), args);
  agents.push(agent);
  return agent;
}

function reconcileLog(agent: AgentProcess): Record<string, unknown> | undefined {
  return agent.logs
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .find((l) => l['msg'] === 'reconciled leftovers');
}

async function hasTap(slot: NetSlot): Promise<boolean> {
  return (await node.namespaceState(slot.namespace)).addresses.includes(
    `${slot.tapName} ${slot.tapIp}/${slot.tapPrefix}`,
  );
}

beforeAll(async () => {
  if (!isRoot) return;
  dir = await mkdtemp(join(tmpdir(), 'net-agent-restart-'));
  node = await NodeNamespace.create('r');
});

afterAll(async () => {
  for (const c of held) c.close();
  for (const s of servers) s.kill('SIGKILL');
  for (const agent of agents) agent.kill();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('net-agent restart under running sandboxes', () => {
  it("keeps a sandbox's TCP connection to the outside working across a SIGTERM and a restart", async () => {
    const before = await node.snapshot();
    await startEcho(8081);
    const first = await startAgent('term1', ['--pool-new-size', '2']);
    const slot = await first.acquire('keeper');
    const vmm = node.spawnIn(slot.namespace, 'sleep', ['300']);
    const guest = await node.attachGuest(slot);
    const conn = await HeldConnection.open(node, guest, INTERNET_IP, 8081);
    held.push(conn);
    expect(await conn.say('one')).toBe(`one from ${UPLINK_NODE_IP}`);

    await first.waitFor((s) => s.readyNew === 2);
    expect(await first.stop()).toBe(0);
    // The ready slots went; the one a sandbox holds stayed, and carries traffic with no agent.
    expect(await node.slotNamespaces()).toEqual([slot.namespace]);
    expect(await conn.say('two')).toBe(`two from ${UPLINK_NODE_IP}`);

    const second = await startAgent('term2', ['--pool-new-size', '2']);
    expect(reconcileLog(second)?.['adopted']).toEqual([slot.idx]);
    expect((await second.list()).map((s) => [s.idx, s.sandboxId])).toEqual([[slot.idx, 'keeper']]);
    // The same connection, never re-opened: the holder exits when it breaks.
    expect(await conn.say('three')).toBe(`three from ${UPLINK_NODE_IP}`);

    conn.close();
    vmm.kill('SIGKILL');
    await second.release(slot.idx, 'keeper');
    expect(await second.stop()).toBe(0);
    expect(await node.snapshot()).toEqual(before);
  });

  it('after a crash adopts the slots handed out (with or without a VMM yet), puts back what they lost, removes only the ready ones', async () => {
    const before = await node.snapshot();
    const first = await startAgent('crash1', ['--pool-new-size', '3']);
    const running = await first.acquire('running');
    const starting = await first.acquire('starting');
    const vmm = node.spawnIn(running.namespace, 'sleep', ['300']);
    await first.waitFor((s) => s.readyNew === 3);
    await first.crash();
    // Half-done pieces: the tap gone with a killed VMM, the namespace's rules gone, a host route gone.
    await node.mustExec(running.namespace, 'ip', ['link', 'del', running.tapName]);
    await node.mustExec(running.namespace, 'nft', ['delete', 'table', 'ip', SLOT_TABLE]);
    await node.mustExec(node.node, 'ip', ['route', 'del', `${starting.hostIp}/32`]);

    const second = await startAgent('crash2', ['--pool-new-size', '1']);
    const reconciled = reconcileLog(second);
    expect(reconciled?.['adopted']).toEqual([running.idx, starting.idx].sort((a, b) => a - b));
    expect(reconciled?.['repaired']).toEqual([running.idx, starting.idx].sort((a, b) => a - b));
    expect(reconciled?.['removed']).toBe(3);
    const listed = (await second.list()).map((s) => [s.idx, s.sandboxId]);
    expect(listed).toEqual(
      [
        [running.idx, 'running'],
        [starting.idx, 'starting'],
      ].sort((a, b) => Number(a[0]) - Number(b[0])),
    );
    expect(await hasTap(running)).toBe(true);
    await node.mustExec(running.namespace, 'nft', ['list', 'table', 'ip', SLOT_TABLE]);

    // Both carry traffic again: the node reaches each guest at its host IP, the guests reach out.
    await startEcho(8082);
    for (const [slot, tag] of [
      [running, 'running'],
      [starting, 'starting'],
    ] as const) {
      const guest = await node.attachGuest(slot);
      await node.startServer(guest, slot.guestIp, 49983, tag);
      expect(await node.probe(node.node, slot.hostIp, 49983)).toBe(`${tag} saw ${slot.hostVethIp}`);
      const conn = await HeldConnection.open(node, guest, INTERNET_IP, 8082);
      held.push(conn);
      expect(await conn.say(tag)).toBe(`${tag} from ${UPLINK_NODE_IP}`);
      conn.close();
    }

    vmm.kill('SIGKILL');
    await second.release(running.idx, 'running');
    await second.release(starting.idx, 'starting');
    expect(await second.stop()).toBe(0);
    expect(await node.snapshot()).toEqual(before);
  });

  it('a slot given back for reuse without its tap (its VMM was killed) is repaired before it is handed out again', async () => {
    const agent = await startAgent('reuse', ['--pool-new-size', '1', '--pool-reused-size', '2']);
    const slot = await agent.acquire('first');
    await node.mustExec(slot.namespace, 'ip', ['link', 'del', slot.tapName]);
    await agent.release(slot.idx, 'first', true);
    const again = await agent.acquire('second');
    expect(again.idx).toBe(slot.idx);
    expect(await hasTap(again)).toBe(true);
    await agent.release(again.idx, 'second');
    expect(await agent.stop()).toBe(0);
  });
});

async function startEcho(port: number): Promise<void> {
  const child = spawn('nsenter', [
    `--net=${node.nsPath(node.internet)}`,
    'python3',
    '-c',
    PY_ECHO,
    '0.0.0.0',
    String(port),
  ]);
  const lines = createInterface({ input: child.stdout });
  await new Promise<void>((resolve, reject) => {
    lines.once('line', () => resolve());
    child.once('exit', (code) => reject(new Error(`echo server exited ${code}`)));
  });
  servers.push(child);
}
