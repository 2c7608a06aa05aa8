/**
 * Egress policies end to end: the real net-agent in a throwaway node namespace, a guest namespace
 * behind a slot, and an "internet" namespace with HTTP servers on several addresses. Each check
 * is a real client (curl, a TCP socket) in the guest's network namespace.
 */
import { spawn, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { status, type ServiceError } from '@grpc/grpc-js';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import type { NetEgressPolicy, NetSlot } from '#proto/sbx/net';
import { ECHO_SERVER_PY, eventually } from '#test-kit';
import { AgentProcess } from './agent-process.js';
import { NodeNamespace, PRIVATE_IP } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;

/** Three "internet" hosts: .1 comes with the node namespace, .2 and .3 are added here. */
const HOST_A = '198.18.0.1';
const HOST_B = '198.18.0.2';
const HOST_C = '198.18.0.3';

let node: NodeNamespace;
let dir: string;
let agent: AgentProcess;
const clients = new Set<ChildProcessWithoutNullStreams>();

/** Connects, echoes once, then echoes again each time it reads a line on stdin. */
const LONG_CLIENT = `
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
c.sendall(b"x"); print("echo " + c.recv(10).decode(), flush=True)
for _ in sys.stdin:
    try:
        c.sendall(b"y"); d = c.recv(10)
        print("echo " + d.decode() if d else "closed", flush=True)
    except Exception as e:
        print("cut " + type(e).__name__, flush=True)
`;

const none: NetEgressPolicy = { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };

function acquire(sandboxId: string, egress?: Partial<NetEgressPolicy>): Promise<NetSlot> {
  return unary(agent.client, agent.client.acquire, { sandboxId, egress: egress && { ...none, ...egress } }, 10_000);
}

function setEgress(slot: NetSlot, egress: Partial<NetEgressPolicy>): Promise<unknown> {
  return unary(
    agent.client,
    agent.client.setEgress,
    { idx: slot.idx, sandboxId: slot.sandboxId, egress: { ...none, ...egress } },
    10_000,
  );
}

/** curl from the guest: the body, or `refused (<exit code>)`. */
async function curl(guest: string, host: string, port: number): Promise<string> {
  const out = await node.exec(guest, 'curl', ['-sS', '--max-time', '3', `http://${host}:${port}/hello.txt`]);
  return out.code === 0 ? out.stdout.trim() : `refused (${out.code})`;
}

async function startHttp(port: number): Promise<void> {
  node.spawnIn(node.internet, 'python3', ['-m', 'http.server', '--bind', '0.0.0.0', '--directory', dir, String(port)]);
  await eventually(
    async () => {
      const out = await node.exec(node.internet, 'curl', ['-sS', `http://${HOST_A}:${port}/hello.txt`]);
      if (out.code !== 0) throw new Error(`http server on ${port} not up: ${out.stderr}`);
    },
    { timeoutMs: 10_000 },
  );
}

async function guestFor(
  sandboxId: string,
  egress?: Partial<NetEgressPolicy>,
): Promise<{ slot: NetSlot; guest: string }> {
  const slot = await acquire(sandboxId, egress);
  return { slot, guest: await node.attachGuest(slot) };
}

beforeAll(async () => {
  if (!isRoot) return;
  dir = await mkdtemp(join(tmpdir(), 'net-agent-egress-'));
  await writeFile(join(dir, 'hello.txt'), 'hello from the internet\n');
  node = await NodeNamespace.create('e');
  await node.mustExec(
    node.internet,
    'ip',
    ['-batch', '-'],
    `addr add ${HOST_B}/32 dev lo\naddr add ${HOST_C}/32 dev lo\n`,
  );
  await node.startServer(node.internet, '0.0.0.0', 9100, 'raw');
  node.spawnIn(node.internet, 'python3', ['-c', ECHO_SERVER_PY, '9200']);
  for (const port of [8080, 8081, 9000]) await startHttp(port);
  agent = await AgentProcess.start(node, join(dir, 'net.sock'), ['--pool-new-size', '2']);
}, 120_000);

afterAll(async () => {
  for (const c of clients) c.kill('SIGKILL');
  if (agent) await agent.stop();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('egress policy per sandbox', () => {
  it('allowed and denied CIDRs with ports: an allow match wins, then a deny match, else allowed', async () => {
    const { guest } = await guestFor('sbx-cidrs', {
      allowedCidrs: [`${HOST_B}:8080`, '10.99.0.0/24'],
      deniedCidrs: ['198.18.0.0/24:8080-8081', HOST_C],
    });
    const body = 'hello from the internet';
    expect(await curl(guest, HOST_B, 8080)).toBe(body); // allowed entry beats the denied range
    expect(await curl(guest, HOST_B, 8081)).toBe('refused (7)'); // in the denied port range
    expect(await curl(guest, HOST_A, 8080)).toBe('refused (7)');
    expect(await curl(guest, HOST_A, 9000)).toBe(body); // port outside the denied range
    expect(await curl(guest, HOST_C, 9000)).toBe('refused (7)'); // denied address, every port
    // Always-denied ranges stay denied even when an entry allows them.
    expect(await curl(guest, PRIVATE_IP, 8080)).toMatch(/^refused/);
  });

  it('allow_internet_access=false refuses everything not allowed; the node still reaches the guest', async () => {
    const { slot, guest } = await guestFor('sbx-offline', { denyInternet: true, allowedCidrs: [`${HOST_B}/32`] });
    expect(await curl(guest, HOST_A, 8080)).toBe('refused (7)');
    expect(await curl(guest, HOST_C, 9000)).toBe('refused (7)');
    expect(await node.probe(guest, HOST_A, 9100, 0.7)).toBeUndefined();
    expect(await curl(guest, HOST_B, 9000)).toBe('hello from the internet');
    // Replies to connections the node opens are not egress.
    await node.startServer(guest, slot.guestIp, 49983, 'guest');
    expect(await node.probe(node.node, slot.hostIp, 49983)).toBe(`guest saw ${slot.hostVethIp}`);
  });

  it('a live update applies at once and cuts an open connection it now forbids', async () => {
    const { slot, guest } = await guestFor('sbx-live');
    const client = spawn('nsenter', [`--net=${node.nsPath(guest)}`, 'python3', '-c', LONG_CLIENT, HOST_A, '9200']);
    clients.add(client);
    const lines = createInterface({ input: client.stdout })[Symbol.asyncIterator]();
    const next = async () => ((await lines.next()).value as string | undefined) ?? 'exited';
    expect(await next()).toBe('echo x');
    client.stdin.write('again\n');
    expect(await next()).toBe('echo y');

    await setEgress(slot, { deniedCidrs: [`${HOST_A}:9200`] });
    client.stdin.write('again\n');
    expect(await next()).toMatch(/^cut /);
    expect(await curl(guest, HOST_A, 8080)).toBe('hello from the internet'); // other ports untouched
    expect(await node.probe(guest, HOST_A, 9200, 0.7)).toBeUndefined();

    // Back to open: new connections pass again.
    await setEgress(slot, {});
    expect(await curl(guest, HOST_A, 9000)).toBe('hello from the internet');
    client.kill('SIGKILL');
  });

  it('a reused slot does not carry its last policy', async () => {
    const slot = await acquire('sbx-first', { denyInternet: true });
    const tables = () => node.mustExec(slot.namespace, 'nft', ['list', 'tables']);
    expect(await tables()).toContain('sbx_egress');
    await agent.release(slot.idx, 'sbx-first', true);
    expect(await tables()).not.toContain('sbx_egress');
  });

  it('bad entries are refused naming the field, and no slot is taken', async () => {
    const before = (await agent.stats()).inUse;
    const err = (await acquire('sbx-bad', { deniedCidrs: ['1.2.3.4', '1.2.3.4/24:80'] }).catch(
      (e: unknown) => e,
    )) as ServiceError;
    expect(err.code).toBe(status.INVALID_ARGUMENT);
    expect(err.details).toContain('egress.denied_cidrs[1]');
    const slot = await acquire('sbx-good');
    const err2 = (await setEgress(slot, { allowedCidrs: ['1.2.3.4:99999'] }).catch((e: unknown) => e)) as ServiceError;
    expect(err2.code).toBe(status.INVALID_ARGUMENT);
    expect(err2.details).toContain('ports are 1-65535');
    expect((await agent.stats()).inUse).toBe(before + 1);
  });
});
