/**
 * Domain rules end to end: the real net-agent in a throwaway node namespace, a guest namespace
 * behind a slot, and an "internet" namespace serving HTTP (80) and TLS (443, one self-signed
 * certificate for several names) on every address. The agent resolves names through a hosts file
 * of this test (--egress-hosts-file), so the names live only here. Each check is a real client in
 * the guest's network namespace (curl, openssl s_client, a Python socket).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import type { NetEgressPolicy, NetSlot } from '#proto/sbx/net';
import { ECHO_SERVER_PY, NAMED_CLIENT_PY, WEB_SERVER_PY, eventually, openFds, selfSignedCertArgs } from '#test-kit';
import { AgentProcess } from './agent-process.js';
import { METADATA_IP, NodeNamespace, PRIVATE_IP, UPLINK_NODE_IP } from './node-namespace.js';

const isRoot = process.getuid?.() === 0;

/** .1 comes with the node namespace; .2 and .3 are added here. */
const HOST_A = '198.18.0.1';
const HOST_B = '198.18.0.2';
const HOST_C = '198.18.0.3';
const PROXY_PORT = 15001;

/** What the agent's resolver knows (and nothing else does). */
const HOSTS = `
${HOST_A} a.test b.test w.test x.w.test
${HOST_B} c.test
${PRIVATE_IP} rebind.test
${METADATA_IP} meta.test
`;

let node: NodeNamespace;
let dir: string;
let stateDir: string;
let agent: AgentProcess;
const clients = new Set<ChildProcess>();

const none: NetEgressPolicy = { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };

function agentArgs(tunnelThreads = 1): string[] {
  return [
    // The end of each tunneled connection (bytes each way) is logged at debug.
    '--log-level',
    'debug',
    '--egress-tunnel-threads',
    String(tunnelThreads),
    '--pool-new-size',
    '2',
    '--egress-hosts-file',
    join(dir, 'hosts'),
    '--egress-state-dir',
    stateDir,
    '--egress-proxy-port',
    String(PROXY_PORT),
    // A client that sends nothing is refused after this (a server-first protocol to a refused address).
    '--egress-head-timeout-ms',
    '1000',
  ];
}

async function guestFor(
  sandboxId: string,
  egress: Partial<NetEgressPolicy>,
): Promise<{ slot: NetSlot; guest: string }> {
  const slot = await unary(agent.client, agent.client.acquire, { sandboxId, egress: { ...none, ...egress } }, 10_000);
  return { slot, guest: await node.attachGuest(slot) };
}

function setEgress(slot: NetSlot, egress: Partial<NetEgressPolicy>): Promise<unknown> {
  return unary(
    agent.client,
    agent.client.setEgress,
    { idx: slot.idx, sandboxId: slot.sandboxId, egress: { ...none, ...egress } },
    10_000,
  );
}

/**
 * curl from the guest to `url`, with the guest's own idea of where `name` lives (its
 * /etc/hosts, as --resolve): the body, or `refused (<exit code>)`.
 */
async function curl(guest: string, url: string, resolve?: { name: string; address: string }): Promise<string> {
  const port = url.startsWith('https:') ? 443 : 80;
  const args = ['-sS', '--max-time', '4', '--cacert', join(dir, 'cert.pem')];
  if (resolve) args.push('--resolve', `${resolve.name}:${port}:${resolve.address}`);
  const out = await node.exec(guest, 'curl', [...args, url]);
  return out.code === 0 ? out.stdout.trim() : `refused (${out.code})`;
}

/** A TLS handshake from the guest to `address` naming `name`: the verified subject, or `refused`. */
async function tlsHandshake(guest: string, address: string, name: string): Promise<string> {
  const out = await node.exec(guest, 'timeout', [
    '5',
    'openssl',
    's_client',
    '-connect',
    `${address}:443`,
    '-servername',
    name,
    '-verify_hostname',
    name,
    '-CAfile',
    join(dir, 'cert.pem'),
    '-verify_return_error',
    '-brief',
  ]);
  if (out.code !== 0) return 'refused';
  return /Verification: OK/.test(out.stderr + out.stdout) ? 'verified' : `unverified: ${out.stderr}`;
}

function namedClient(guest: string, address: string, port: number, name: string) {
  const client = spawn('nsenter', [
    `--net=${node.nsPath(guest)}`,
    'python3',
    '-c',
    NAMED_CLIENT_PY,
    address,
    String(port),
    name,
  ]);
  clients.add(client);
  const lines = createInterface({ input: client.stdout })[Symbol.asyncIterator]();
  const next = async () => ((await lines.next()).value as string | undefined) ?? 'exited';
  return {
    next,
    echo: async () => {
      client.stdin.write('again\n');
      return next();
    },
    kill: () => client.kill('SIGKILL'),
  };
}

beforeAll(async () => {
  if (!isRoot) return;
  dir = await mkdtemp(join(tmpdir(), 'net-agent-domains-'));
  stateDir = join(dir, 'state');
  await writeFile(join(dir, 'hosts'), HOSTS);
  node = await NodeNamespace.create('d');
  await node.mustExec(
    node.internet,
    'ip',
    ['-batch', '-'],
    `addr add ${HOST_B}/32 dev lo\naddr add ${HOST_C}/32 dev lo\n`,
  );
  // One self-signed certificate for several names on one address (its own CA for the clients).
  await node.mustExec(
    node.internet,
    'openssl',
    selfSignedCertArgs(
      ['a.test', 'b.test', 'w.test', '*.w.test', 'c.test', 'rebind.test', 'meta.test'],
      join(dir, 'cert.pem'),
      join(dir, 'key.pem'),
    ),
  );
  const web = spawn(
    'nsenter',
    [
      `--net=${node.nsPath(node.internet)}`,
      'python3',
      '-c',
      WEB_SERVER_PY,
      join(dir, 'cert.pem'),
      join(dir, 'key.pem'),
    ],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  clients.add(web);
  await new Promise<void>((resolve, reject) => {
    createInterface({ input: web.stdout }).once('line', () => resolve());
    web.once('exit', (code) => reject(new Error(`web server exited ${code}`)));
  });
  await node.startServer(node.internet, '0.0.0.0', 9100, 'raw');
  node.spawnIn(node.internet, 'python3', ['-c', ECHO_SERVER_PY, '9200']);
  await eventually(async () => {
    if ((await node.probe(node.node, HOST_A, 9100)) === undefined) throw new Error('raw server not up');
  });
  agent = await AgentProcess.start(node, join(dir, 'net.sock'), agentArgs());
}, 120_000);

afterAll(async () => {
  for (const c of clients) c.kill('SIGKILL');
  if (agent) await agent.stop();
  if (node) await node.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe.skipIf(!isRoot)('egress domain rules', () => {
  it('an allowed name is reachable; another name on the same address is refused; *. covers names below', async () => {
    const { guest } = await guestFor('sbx-names', { denyInternet: true, allowedDomains: ['a.test', '*.w.test'] });
    const at = (name: string) => ({ name, address: HOST_A });
    expect(await curl(guest, 'http://a.test/', at('a.test'))).toBe(`${HOST_A} a.test`);
    expect(await curl(guest, 'https://a.test/', at('a.test'))).toBe(`${HOST_A} a.test`);
    expect(await tlsHandshake(guest, HOST_A, 'a.test')).toBe('verified');
    // Same address, same certificate: only the name differs.
    expect(await curl(guest, 'http://b.test/', at('b.test'))).toMatch(/^refused/);
    expect(await curl(guest, 'https://b.test/', at('b.test'))).toMatch(/^refused/);
    expect(await tlsHandshake(guest, HOST_A, 'b.test')).toBe('refused');
    // The wildcard: names below w.test, not w.test itself.
    expect(await curl(guest, 'https://x.w.test/', at('x.w.test'))).toBe(`${HOST_A} x.w.test`);
    expect(await tlsHandshake(guest, HOST_A, 'x.w.test')).toBe('verified');
    expect(await curl(guest, 'https://w.test/', at('w.test'))).toMatch(/^refused/);
    // No name (an address in the URL): judged by address only, and internet access is off.
    expect(await curl(guest, `http://${HOST_A}/`)).toMatch(/^refused/);
  });

  it('`*` allows any name; a name does not widen what a denied address reaches without one', async () => {
    const { guest } = await guestFor('sbx-any', { deniedCidrs: [`${HOST_A}`], allowedDomains: ['*'] });
    expect(await curl(guest, 'https://b.test/', { name: 'b.test', address: HOST_A })).toBe(`${HOST_A} b.test`);
    expect(await curl(guest, `http://${HOST_A}/`)).toMatch(/^refused/); // denied address, no name
    expect(await curl(guest, `http://${HOST_B}/`)).toBe(`${HOST_B} ${HOST_B}`); // not denied
  });

  it("the guest's /etc/hosts gains nothing: an allowed name is dialed where the node resolves it", async () => {
    const { guest } = await guestFor('sbx-hosts', { denyInternet: true, allowedDomains: ['a.test'] });
    // The guest says a.test is at C (which the policy refuses): the answer still comes from A.
    expect(await curl(guest, 'http://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
    expect(await curl(guest, 'https://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
    // Nor does pointing it at the metadata address.
    expect(await curl(guest, 'http://a.test/', { name: 'a.test', address: METADATA_IP })).toBe(`${HOST_A} a.test`);
    expect(await curl(guest, `http://${HOST_C}/`)).toMatch(/^refused/);
  });

  it('a name that resolves into an always-denied range is refused (DNS rebinding)', async () => {
    const { guest } = await guestFor('sbx-rebind', {
      denyInternet: true,
      allowedDomains: ['rebind.test', 'meta.test', 'c.test'],
    });
    expect(await curl(guest, 'http://rebind.test/', { name: 'rebind.test', address: HOST_A })).toMatch(/^refused/);
    expect(await curl(guest, 'https://meta.test/', { name: 'meta.test', address: HOST_A })).toMatch(/^refused/);
    expect(await tlsHandshake(guest, HOST_A, 'rebind.test')).toBe('refused');
    // The same policy's ordinary name still works: only the rebinding names are refused.
    expect(await curl(guest, 'http://c.test/', { name: 'c.test', address: HOST_A })).toBe(`${HOST_B} c.test`);
  });

  it('a connection without a name is judged by its address and port only', async () => {
    const { guest } = await guestFor('sbx-noname', {
      denyInternet: true,
      allowedDomains: ['a.test'],
      allowedCidrs: [`${HOST_B}:9100`, `${HOST_B}:80`],
    });
    // A server-first protocol (nothing to read a name from) to an allowed address and port.
    expect(await node.probe(guest, HOST_B, 9100)).toBe(`raw saw ${UPLINK_NODE_IP}`);
    expect(await curl(guest, `http://${HOST_B}/`)).toBe(`${HOST_B} ${HOST_B}`);
    expect(await node.probe(guest, HOST_A, 9100)).toBeUndefined();
    expect(await curl(guest, `http://${HOST_C}/`)).toMatch(/^refused/);
    // Refused by the proxy (which waited for a name that never came), not by the packet filter.
    await eventually(() => {
      const refusal = agent.logs.find((l) => l.includes('sbx-noname') && l.includes(`${HOST_A}:9100`));
      expect(refusal).toContain('no TLS hello or HTTP request');
    });
  });

  it('a live update applies at once and cuts an open proxied connection it now forbids', async () => {
    const { slot, guest } = await guestFor('sbx-live', { denyInternet: true, allowedDomains: ['a.test'] });
    const conn = namedClient(guest, HOST_C, 9200, 'a.test'); // proxied by name to A
    expect(await conn.next()).toBe('open');
    expect(await conn.echo()).toBe('echo y');
    // A new policy that still allows the connection leaves it alone.
    await setEgress(slot, { denyInternet: true, allowedDomains: ['a.test', 'b.test'] });
    expect(await conn.echo()).toBe('echo y');
    expect(await curl(guest, 'http://b.test/', { name: 'b.test', address: HOST_A })).toBe(`${HOST_A} b.test`);
    // One that forbids it cuts it (reset), and refuses new ones.
    await setEgress(slot, { denyInternet: true, allowedDomains: ['b.test'] });
    expect(await conn.echo()).toMatch(/^(cut|closed)/);
    expect(await curl(guest, 'http://a.test/', { name: 'a.test', address: HOST_A })).toMatch(/^refused/);
    // Back to open: the redirect is gone, connections go straight out again.
    await setEgress(slot, {});
    expect(await curl(guest, 'http://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_C} a.test`);
    conn.kill();
  });

  it('proxied and refused connections, a cut and a release leave no descriptor behind in the agent', async () => {
    const fds = () =>
      openFds(agent.service.pid)
        .map((t) => t.replace(/\[\d+\]$/, '[]'))
        .sort();
    // One slot through the whole cycle first, so lazily opened things (the resolver, the netns
    // handle) are there before the baseline.
    const warm = await guestFor('sbx-warm', { denyInternet: true, allowedDomains: ['a.test'] });
    expect(await curl(warm.guest, 'http://a.test/', { name: 'a.test', address: HOST_A })).toBe(`${HOST_A} a.test`);
    await agent.release(warm.slot.idx, 'sbx-warm', true);
    const before = fds();
    const { slot, guest } = await guestFor('sbx-leak', { denyInternet: true, allowedDomains: ['a.test'] });
    for (let i = 0; i < 10; i++) {
      expect(await curl(guest, 'https://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
      expect(await curl(guest, 'http://b.test/', { name: 'b.test', address: HOST_A })).toMatch(/^refused/);
    }
    const conn = namedClient(guest, HOST_A, 9200, 'a.test');
    expect(await conn.next()).toBe('open');
    await setEgress(slot, { denyInternet: true, allowedDomains: ['b.test'] });
    expect(await conn.echo()).toMatch(/^(cut|closed)/);
    const held = namedClient(guest, HOST_A, 9200, 'b.test');
    expect(await held.next()).toBe('open');
    await agent.release(slot.idx, 'sbx-leak', true); // resets the held connection
    expect(await held.echo()).toMatch(/^(cut|closed)/);
    await eventually(() => expect(fds()).toEqual(before));
    conn.kill();
    held.kill();
  });

  it('release closes the listener and forgets the policy; a restarted agent serves the policies of kept slots', async () => {
    const listening = async (ns: string) =>
      (await node.mustExec(ns, 'ss', ['-Htln', `sport = :${PROXY_PORT}`])).trim() !== '';
    const gone = await guestFor('sbx-gone', { denyInternet: true, allowedDomains: ['a.test'] });
    expect(await listening(gone.slot.namespace)).toBe(true);
    const kept = await guestFor('sbx-kept', { denyInternet: true, allowedDomains: ['a.test'] });
    const conn = namedClient(kept.guest, HOST_A, 9200, 'a.test');
    expect(await conn.next()).toBe('open');
    await agent.release(gone.slot.idx, 'sbx-gone', true);
    expect(await listening(gone.slot.namespace)).toBe(false);
    expect(await node.mustExec(gone.slot.namespace, 'nft', ['list', 'tables'])).not.toContain('sbx_egress');
    expect(await readdir(stateDir)).not.toContain(`${gone.slot.namespace}.json`);

    // SIGTERM and start again (as Nomad does): proxied connections end with the process, the
    // policy does not.
    await agent.stop();
    expect(await conn.echo()).toMatch(/^(cut|closed)/);
    agent = await AgentProcess.start(node, join(dir, 'net.sock'), agentArgs());
    expect(await listening(kept.slot.namespace)).toBe(true);
    expect(await curl(kept.guest, 'https://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
    expect(await curl(kept.guest, 'http://b.test/', { name: 'b.test', address: HOST_A })).toMatch(/^refused/);
    conn.kill();
  });

  it('allowed connections are carried by the native tunnel engine, which logs the bytes of each', async () => {
    const { guest } = await guestFor('sbx-tunnel', { denyInternet: true, allowedDomains: ['a.test'] });
    const from = agent.logs.length;
    expect(await curl(guest, 'https://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
    const ended = await eventually(() => {
      const line = agent.logs
        .slice(from)
        .find((l) => l.includes('egress connection ended') && l.includes('sbx-tunnel'));
      if (!line) throw new Error('no end log yet');
      return JSON.parse(line) as { bytesUp: number; bytesDown: number; end: string; name: string };
    });
    expect(ended).toMatchObject({ end: 'done', name: 'a.test' });
    // A TLS hello and request up, a certificate and the answer down.
    expect(ended.bytesUp).toBeGreaterThan(300);
    expect(ended.bytesDown).toBeGreaterThan(500);
  });

  it('without the engine (--egress-tunnel-threads 0) Node pipes the same connections, and a live update still cuts', async () => {
    await agent.stop();
    agent = await AgentProcess.start(node, join(dir, 'net.sock'), agentArgs(0));
    try {
      const { slot, guest } = await guestFor('sbx-piped', { denyInternet: true, allowedDomains: ['a.test'] });
      const from = agent.logs.length;
      expect(await curl(guest, 'https://a.test/', { name: 'a.test', address: HOST_C })).toBe(`${HOST_A} a.test`);
      expect(await curl(guest, 'http://b.test/', { name: 'b.test', address: HOST_A })).toMatch(/^refused/);
      const conn = namedClient(guest, HOST_C, 9200, 'a.test');
      expect(await conn.next()).toBe('open');
      expect(await conn.echo()).toBe('echo y');
      await setEgress(slot, { denyInternet: true, allowedDomains: ['b.test'] });
      expect(await conn.echo()).toMatch(/^(cut|closed)/);
      conn.kill();
      expect(agent.logs.slice(from).some((l) => l.includes('egress connection ended'))).toBe(false);
    } finally {
      await agent.stop();
      agent = await AgentProcess.start(node, join(dir, 'net.sock'), agentArgs());
    }
  });
});
