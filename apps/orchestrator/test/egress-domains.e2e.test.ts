import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readlink, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { unary } from '#grpc';
import { ECHO_SERVER_PY, NAMED_CLIENT_PY, WEB_SERVER_PY, eventually, selfSignedCertArgs } from '#test-kit';
import { NodeDriver } from './node-driver.js';
import { missingPieces, run } from './node-under-test.js';

/*
 * Domain egress rules over a whole node (real orchestrator, net-agent, dns, block/uffd-server, the
 * VMM double): a sandbox created through SandboxService with `network.egress.allowed_domains` and
 * internet access off reaches an allowed name and is refused another name on the same address;
 * Update (egress, field 100) changes it live and cuts an open connection the new policy forbids;
 * Delete leaves nothing. The "internet" is the node's uplink namespace (this test's), serving
 * HTTP, TLS (one self-signed certificate for both names) and an echo port on two addresses; the
 * node resolves the names from this test's hosts file (net-agent --egress-hosts-file). Clients
 * run in the guest's own network namespace, the one the VMM double holds behind its tap.
 */

const missing = missingPieces();

const HOST_A = '198.18.0.1';
const HOST_B = '198.18.0.2';
const ECHO_PORT = 9200;
const HOSTS = `${HOST_A} a.test b.test\n${HOST_B} c.test\n`;

const noEgress = { allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };

describe.skipIf(missing !== undefined)('Domain egress through SandboxService', () => {
  let d: NodeDriver;
  let dir: string;
  let stateDir: string;
  let inet: string;
  const processes = new Set<ChildProcess>();

  /** Starts `script` in the internet namespace; resolves once it prints its first line. */
  async function serve(script: string, args: string[]): Promise<void> {
    const p = spawn('nsenter', [`--net=/run/netns/${inet}`, 'python3', '-c', script, ...args], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    processes.add(p);
    await new Promise<void>((resolve, reject) => {
      createInterface({ input: p.stdout }).once('line', () => resolve());
      p.once('exit', (code) => reject(new Error(`server exited ${code}`)));
    });
  }

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'orch-egress-domains-'));
    stateDir = join(dir, 'state');
    await writeFile(join(dir, 'hosts'), HOSTS);
    d = await NodeDriver.start({
      tag: 'egd',
      netAgentArgs: ['--egress-hosts-file', join(dir, 'hosts'), '--egress-state-dir', stateDir],
    });
    inet = `${d.node.prefix}inet`;
    // The far end of the node's uplink, with two "internet" hosts behind it.
    const plumb = await run(
      'ip',
      ['-n', inet, '-batch', '-'],
      [
        'link set lo up',
        'addr add 198.51.100.1/24 dev wan0',
        'link set wan0 up',
        `addr add ${HOST_A}/32 dev lo`,
        `addr add ${HOST_B}/32 dev lo`,
        '',
      ].join('\n'),
    );
    if (plumb.code !== 0) throw new Error(`internet namespace: ${plumb.stderr}`);
    const cert = await run(
      'openssl',
      selfSignedCertArgs(['a.test', 'b.test', 'c.test'], join(dir, 'cert.pem'), join(dir, 'key.pem')),
    );
    if (cert.code !== 0) throw new Error(`openssl req: ${cert.stderr}`);
    await serve(WEB_SERVER_PY, [join(dir, 'cert.pem'), join(dir, 'key.pem')]);
    await serve(ECHO_SERVER_PY, [String(ECHO_PORT)]);
  }, 240_000);

  afterAll(async () => {
    for (const p of processes) p.kill('SIGKILL');
    await d?.stop();
    if (dir) await rm(dir, { recursive: true, force: true });
  }, 120_000);

  /**
   * The guest's network namespace as a path: the VMM double holds it by an fd (a `net:` link
   * other than the namespace the VMM itself runs in, its slot's).
   */
  async function guestNetns(vmmPid: number): Promise<string> {
    const own = await readlink(`/proc/${vmmPid}/ns/net`);
    for (const fd of await readdir(`/proc/${vmmPid}/fd`)) {
      const target = await readlink(`/proc/${vmmPid}/fd/${fd}`).catch(() => '');
      if (target.startsWith('net:') && target !== own) return `/proc/${vmmPid}/fd/${fd}`;
    }
    throw new Error(`VMM ${vmmPid} holds no guest network namespace`);
  }

  /** Creates the sandbox and returns the path of its guest's network namespace. */
  async function createGuest(id: string, extra: Parameters<NodeDriver['create']>[1]): Promise<string> {
    const before = new Set((await d.node.vmmPids()).map((p) => p.pid));
    await d.create(id, extra);
    const started = (await d.node.vmmPids()).filter((p) => !before.has(p.pid));
    expect(started).toHaveLength(1);
    return guestNetns(started[0]!.pid);
  }

  /** curl from the guest, the name pinned to `address` (the guest's own /etc/hosts): body or `refused`. */
  async function curl(netns: string, url: string, name: string, address: string): Promise<string> {
    const port = url.startsWith('https:') ? 443 : 80;
    const out = await run('nsenter', [
      `--net=${netns}`,
      'curl',
      '-sS',
      '--max-time',
      '5',
      '--cacert',
      join(dir, 'cert.pem'),
      '--resolve',
      `${name}:${port}:${address}`,
      url,
    ]);
    return out.code === 0 ? out.stdout.trim() : `refused (${out.code})`;
  }

  /** A TLS handshake from the guest to `address` naming `name`: `verified` or `refused`. */
  async function tlsHandshake(netns: string, address: string, name: string): Promise<string> {
    const out = await run('nsenter', [
      `--net=${netns}`,
      'timeout',
      '6',
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

  /** A long-lived connection from the guest naming `name`, echoing once per call. */
  function namedConnection(netns: string, address: string, port: number, name: string) {
    const client = spawn('nsenter', [`--net=${netns}`, 'python3', '-c', NAMED_CLIENT_PY, address, String(port), name]);
    processes.add(client);
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

  const updateEgress = (sandboxId: string, allowedDomains: string[]) =>
    unary(
      d.node.client,
      d.node.client.update,
      { sandboxId, endTime: undefined, egress: { ...noEgress, allowedDomains } },
      30_000,
    );

  it('an allowed name answers, another name on the same address is refused; Update cuts live; Delete leaves nothing', async () => {
    const guest = await createGuest('eg-1', {
      allowInternetAccess: false,
      network: { egress: { ...noEgress, allowedDomains: ['a.test'] } },
    });

    // Allowed by name: HTTP (Host), HTTPS and a verified handshake (SNI).
    expect(await curl(guest, 'http://a.test/', 'a.test', HOST_A)).toBe(`${HOST_A} a.test`);
    expect(await curl(guest, 'https://a.test/', 'a.test', HOST_A)).toBe(`${HOST_A} a.test`);
    expect(await tlsHandshake(guest, HOST_A, 'a.test')).toBe('verified');
    // Same address, same certificate, another name: refused.
    expect(await curl(guest, 'http://b.test/', 'b.test', HOST_A)).toMatch(/^refused/);
    expect(await curl(guest, 'https://b.test/', 'b.test', HOST_A)).toMatch(/^refused/);
    expect(await tlsHandshake(guest, HOST_A, 'b.test')).toBe('refused');
    // No name, only an address: internet access is off.
    expect(await curl(guest, `http://${HOST_B}/`, 'c.test', HOST_B)).toMatch(/^refused/);
    expect(d.node.logs('net-agent').join('\n')).toMatch(/b\.test/);

    // A connection open under the old policy, and one to a name that stays allowed.
    const cut = namedConnection(guest, HOST_A, ECHO_PORT, 'a.test');
    expect(await cut.next()).toBe('open');
    expect(await cut.echo()).toBe('echo y');
    const early = namedConnection(guest, HOST_B, ECHO_PORT, 'c.test');
    expect(await early.next()).toMatch(/^refused/); // c.test is not allowed yet

    await updateEgress('eg-1', ['b.test', 'c.test']);
    expect(await cut.echo()).toMatch(/^(cut|closed)/);
    const open = namedConnection(guest, HOST_B, ECHO_PORT, 'c.test');
    expect(await open.next()).toBe('open');
    expect(await open.echo()).toBe('echo y');
    expect(await curl(guest, 'https://b.test/', 'b.test', HOST_A)).toBe(`${HOST_A} b.test`);
    expect(await curl(guest, 'https://a.test/', 'a.test', HOST_A)).toMatch(/^refused/);
    for (const c of [cut, early, open]) c.kill();

    await d.remove('eg-1');
    await d.expectFootprintBack();
    // The agent keeps no policy for the released slot.
    await eventually(async () => expect(await readdir(stateDir).catch(() => [])).toEqual([]), {
      timeoutMs: 30_000,
      intervalMs: 250,
    });
  }, 300_000);
});
