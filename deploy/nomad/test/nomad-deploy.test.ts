/**
 * The five jobs of deploy/nomad run by a real Nomad agent (`nomad agent -dev`, raw_exec) with a
 * real Consul agent, in a throwaway machine: a network namespace of its own, and a private mount
 * namespace where the jobs' fixed paths /run/sbx and /var/lib/sbx are scratch directories. The
 * test talks to Nomad with the nomad CLI, to Consul over its HTTP API, and to the node only
 * through the orchestrator's gRPC port (forwarded from a Unix socket) and the services' sockets.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { dial, unary } from '#grpc';
import { eventually } from '#test-kit';
import { SandboxConfig, SandboxServiceClient } from '#proto/orchestrator';
import { DnsClient } from '#proto/sbx/dns';
import { ConsulAgent } from '../../../libs/test-peers/src/consul-agent.js';
import { hostState, MachineNamespace } from '../../../libs/test-peers/src/machine-namespace.js';
import { NomadAgent } from '../../../libs/test-peers/src/nomad-agent.js';
import { peerBinary } from '../../../libs/test-peers/src/peer-binary.js';
import { nomadDir, repoRoot, sharedVarFile } from './node-services.js';

const isRoot = process.getuid?.() === 0;
const built = existsSync(join(repoRoot, 'dist/tools/sbx/src/main.js'));
const skipReason = !isRoot ? 'needs root (namespaces, raw_exec)' : !built ? 'dist/ is not built (npm run build)' : '';
if (skipReason) console.warn(`nomad deployment test skipped: ${skipReason}`);

/** The order deploy/nomad/README.md runs them in: the orchestrator expects the others' sockets. */
const JOBS = ['dns', 'net-agent', 'block-server', 'uffd-server', 'orchestrator', 'proxy'] as const;
const prefix = `nd${process.pid % 100000}`;

let machine: MachineNamespace | undefined;
let consul: ConsulAgent | undefined;
let nomad: NomadAgent | undefined;
let root = '';
let client: SandboxServiceClient | undefined;
let before: Record<string, string[]> = {};

/** What the host looks like, limited to what this test could leave: its names, paths and binaries. */
function machineState(): Promise<Record<string, string[]>> {
  return hostState([prefix, root || `/tmp/${prefix}`], ['/run/sbx', '/var/lib/sbx']);
}

function jobArgs(job: (typeof JOBS)[number], extra: string[] = []): string[] {
  const vars = ['-var', `sbx_root=${repoRoot}`];
  if (job === 'net-agent') vars.push('-var', `consul_addr=${consul!.address}`);
  return ['job', 'run', `-var-file=${sharedVarFile}`, ...vars, ...extra, join(nomadDir, `${job}.nomad.hcl`)];
}

interface Alloc {
  ID: string;
  JobID: string;
  TaskGroup: string;
  ClientStatus: string;
  DesiredStatus: string;
  CreateIndex: number;
  TaskStates?: Record<string, { State: string; Restarts: number; Failed: boolean; StartedAt?: string }>;
}

async function allocations(): Promise<Alloc[]> {
  const all = await nomad!.api<Alloc[]>('/v1/allocations');
  return all.filter((a) => a.JobID.startsWith('sbx-') && a.DesiredStatus === 'run');
}

/**
 * Stops every sbx job and waits until Nomad reports each task dead: a raw_exec task outlives a
 * Nomad agent stopped under it, and `-purge` drops the allocations from the API at once.
 */
async function stopJobs(): Promise<void> {
  for (const job of [...JOBS].reverse()) await nomad!.cli(['job', 'stop', `sbx-${job}`]).catch(() => undefined);
  await eventually(
    async () => {
      const all = await nomad!.api<Alloc[]>('/v1/allocations');
      return all.every((a) => Object.values(a.TaskStates ?? {}).every((t) => t.State === 'dead'));
    },
    { what: 'every task dead', timeoutMs: 120_000 },
  );
}

/** Processes still in the Nomad agent's mount namespace (its tasks, their executors). */
async function processesOf(mountNamespace: string): Promise<string[]> {
  const out: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid)) continue;
    if ((await readlink(`/proc/${pid}/ns/mnt`).catch(() => '')) !== mountNamespace) continue;
    out.push((await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0').join(' ').trim());
  }
  return out;
}

/** Consul's view of every check of the sbx services: `service/check name` → status. */
async function consulChecks(): Promise<Record<string, string>> {
  const checks =
    await consulGet<Array<{ ServiceName: string; ServiceID: string; Name: string; Status: string }>>(
      '/v1/health/state/any',
    );
  const out: Record<string, string> = {};
  for (const c of checks) if (c.ServiceName.startsWith('sbx-')) out[`${c.ServiceID} ${c.Name}`] = c.Status;
  return out;
}

function consulGet<T>(path: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: join(root, 'consul.sock'), path, timeout: 5000 }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => (res.statusCode === 200 ? resolve(JSON.parse(body) as T) : reject(new Error(body))));
    });
    req.once('error', reject);
    req.end();
  });
}

/** Every sbx allocation running with every task running, and every sbx Consul check passing. */
async function waitHealthy(what: string, expectedChecks = 10, timeoutMs = 180_000): Promise<Alloc[]> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const allocs = await allocations().catch(() => []);
    const checks = await consulChecks().catch(() => ({}));
    const running =
      allocs.length === 8 &&
      allocs.every(
        (a) => a.ClientStatus === 'running' && Object.values(a.TaskStates ?? {}).every((t) => t.State === 'running'),
      );
    const passing =
      Object.keys(checks).length === expectedChecks && Object.values(checks).every((s) => s === 'passing');
    if (running && passing) return allocs;
    const last = JSON.stringify({
      allocs: allocs.map((a) => `${a.TaskGroup}:${a.ClientStatus}`),
      checks,
    });
    if (Date.now() > deadline) throw new Error(`${what}: not healthy in ${timeoutMs} ms: ${last}\n${nomad!.tail()}`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

function allocOf(allocs: Alloc[], group: string): Alloc {
  const found = allocs.find((a) => a.TaskGroup === group);
  if (!found) throw new Error(`no allocation of group ${group}`);
  return found;
}

async function renderedEnv(alloc: Alloc, task: string): Promise<string> {
  return nomad!.readFile(join(nomad!.dataDir, 'alloc', alloc.ID, task, 'secrets', 'sbx.env'));
}

/** The TTL of the resolver's answer for a record set for the question (dig in the node's namespace). */
async function answerTtl(server: string): Promise<number> {
  const dns = dial(DnsClient, join(root, 'run', 'dns.sock'));
  try {
    await unary(dns, dns.set, { name: 'ttl-probe', ip: '10.11.0.250' }, 5000);
    const answer = await machine!.exec('dig', [
      '+noall',
      '+answer',
      '+time=2',
      '+tries=1',
      `@${server}`,
      'ttl-probe',
      'A',
    ]);
    await unary(dns, dns.remove, { name: 'ttl-probe', ip: '10.11.0.250' }, 5000);
    const ttl = Number(answer.trim().split(/\s+/)[1]);
    if (!Number.isInteger(ttl)) throw new Error(`no answer from ${server}: ${answer}`);
    return ttl;
  } finally {
    dns.close();
  }
}

/** A value with quotes, a `#`, a backslash, a newline and an `=`, which must reach the service intact. */
const TRICKY = 'p"a#s s\\\nword=1';

/** An `env = true` file as Nomad reads it: KEY=value lines, blank and # lines skipped, "…" JSON-quoted. */
function parseEnvFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const eq = trimmed.indexOf('=');
    if (eq <= 0) throw new Error(`not KEY=value: ${JSON.stringify(line)}`);
    const value = trimmed.slice(eq + 1);
    env[trimmed.slice(0, eq)] = value.startsWith('"') ? (JSON.parse(value) as string) : value;
  }
  return env;
}

function sandbox(id: string, extra: Partial<SandboxConfig> = {}): SandboxConfig {
  return SandboxConfig.fromPartial({
    templateId: 'base',
    buildId: '',
    kernelVersion: 'vmlinux-6.1',
    firecrackerVersion: 'v1.10',
    hugePages: false,
    sandboxId: id,
    envVars: {},
    metadata: {},
    envdVersion: '0.2.0',
    // 0: the template's own size (a snapshot fixes vCPUs and memory).
    vcpu: 0,
    ramMb: 0,
    teamId: 'team-nomad',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: 'base',
    ...extra,
  });
}

async function create(id: string, extra: Partial<SandboxConfig> = {}): Promise<void> {
  await unary(
    client!,
    client!.create,
    { sandbox: sandbox(id, extra), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
    120_000,
  );
}

async function listed(): Promise<string[]> {
  const r = await unary(client!, client!.list, {}, 10_000);
  return r.sandboxes.map((s) => s.config?.sandboxId ?? '').sort();
}

async function dnsRecords(): Promise<string[]> {
  const dns = dial(DnsClient, join(root, 'run', 'dns.sock'));
  try {
    return (await unary(dns, dns.list, {}, 5000)).records.map((r) => r.name).sort();
  } finally {
    dns.close();
  }
}

/** Restarts one task through Nomad (`nomad alloc restart -task`) and waits until it runs again. */
async function restartTask(group: string, task: string): Promise<void> {
  const alloc = allocOf(await allocations(), group);
  const before = alloc.TaskStates?.[task]?.StartedAt ?? '';
  await nomad!.cli(['alloc', 'restart', '-task', task, alloc.ID]);
  await eventually(
    async () => {
      const now = allocOf(await allocations(), group).TaskStates?.[task];
      return now?.State === 'running' && (now.StartedAt ?? '') > before;
    },
    { what: `${group}/${task} restarted`, timeoutMs: 60_000 },
  );
}

beforeAll(async () => {
  if (skipReason) return;
  // Builds the peers on a machine that does not have them yet (minutes, once).
  peerBinary('consul');
  peerBinary('nomad');
  before = await machineState();
  root = await mkdtemp(join(tmpdir(), `${prefix}-`));
  machine = await MachineNamespace.create(prefix);
  consul = await ConsulAgent.start({ netns: prefix, unixSocket: join(root, 'consul.sock') });
  nomad = await NomadAgent.start({
    netns: prefix,
    consulAddress: consul.address,
    binds: { '/run/sbx': join(root, 'run'), '/var/lib/sbx': join(root, 'lib') },
  });
}, 1_800_000);

afterAll(async () => {
  client?.close();
  if (nomad) await stopJobs().catch(() => undefined);
  await nomad?.close();
  await consul?.close();
  await machine?.remove();
  if (root) await rm(root, { recursive: true, force: true });
}, 300_000);

describe.skipIf(skipReason !== '')(
  'the node deployed by a real Nomad agent with a real Consul agent',
  { timeout: 300_000 },
  () => {
    let deployMs = 0;

    it('renders an empty environment with no Nomad variables, and the variables put later after alloc restart', async () => {
      await nomad!.cli(jobArgs('dns'));
      const dns = await eventually(
        async () => {
          const alloc = (await allocations()).find((a) => a.TaskGroup === 'dns');
          return alloc?.TaskStates?.['dns']?.State === 'running' ? alloc : false;
        },
        { what: 'the dns task running', timeoutMs: 60_000 },
      );
      expect((await renderedEnv(dns, 'dns')).trim()).toBe('');
      // Both the shared and the job's own variable: the case whose template failed on Nomad's first
      // render pass ("range can't iterate over <nil>"), and whose restart left sbx.env empty.
      await nomad!.cli([
        'var',
        'put',
        '-force',
        'nomad/jobs',
        'bucket=/var/lib/sbx/bucket',
        'cache_dir=/var/lib/sbx/cache',
      ]);
      await nomad!.cli(['var', 'put', '-force', 'nomad/jobs/sbx-dns', 'ttl=30', `note=${TRICKY}`]);
      // noop: Nomad re-renders the file when the variables change but leaves the task alone; a
      // restart before that re-render starts the task with the old (here empty) environment.
      const env = await eventually(
        async () => {
          const rendered = parseEnvFile(await renderedEnv(allocOf(await allocations(), 'dns'), 'dns'));
          return rendered['SBX_DNS_TTL'] === '30' ? rendered : false;
        },
        { what: 'sbx.env re-rendered after nomad var put', timeoutMs: 30_000 },
      );
      await restartTask('dns', 'dns');
      // What a client of the restarted resolver sees: answers carry the TTL from the variable.
      expect(await eventually(() => answerTtl('127.0.0.4'), { timeoutMs: 30_000 })).toBe(30);
      expect(env).toEqual({
        SBX_BUCKET: '/var/lib/sbx/bucket',
        SBX_CACHE_DIR: '/var/lib/sbx/cache',
        SBX_DNS_TTL: '30',
        SBX_DNS_NOTE: TRICKY,
      });
    });

    it('deploys the other jobs with the var file and the Nomad variables; every allocation and check passes', async () => {
      await nomad!.cli([
        'var',
        'put',
        '-force',
        'nomad/jobs/sbx-net-agent',
        'uplink=up0',
        `namespace_prefix=${prefix}s-`,
        'pool_new_size=2',
      ]);
      await nomad!.cli([
        'var',
        'put',
        '-force',
        'nomad/jobs/sbx-orchestrator',
        'sample_rootfs_mb=8',
        'sample_memory_mb=16',
        'health_interval_ms=2000',
        // The orchestrator's VMM pool at its default size: its slots are acquired `pooled`, so the
        // stop of every job at once below must leave no reservation key or namespace of theirs.
      ]);
      const started = Date.now();
      for (const job of JOBS.filter((j) => j !== 'dns')) await nomad!.cli(jobArgs(job));
      const allocs = await waitHealthy('first deployment');
      deployMs = Date.now() - started;
      console.info(`nomad: job run (5 jobs) → 8 allocations running and 10 Consul checks passing in ${deployMs} ms`);
      expect(allocs.map((a) => a.TaskGroup).sort()).toEqual(
        [
          'block-server-0',
          'block-server-1',
          'dns',
          'net-agent',
          'orchestrator',
          'proxy',
          'uffd-server-0',
          'uffd-server-1',
        ].sort(),
      );
      // Nomad's own template rendering: the shared and the job's own items, JSON-quoted.
      expect(parseEnvFile(await renderedEnv(allocOf(allocs, 'net-agent'), 'net-agent'))).toEqual({
        SBX_BUCKET: '/var/lib/sbx/bucket',
        SBX_CACHE_DIR: '/var/lib/sbx/cache',
        SBX_NET_AGENT_UPLINK: 'up0',
        SBX_NET_AGENT_NAMESPACE_PREFIX: `${prefix}s-`,
        SBX_NET_AGENT_POOL_NEW_SIZE: '2',
      });
      // Instances with no variable of their own get the shared ones only.
      expect(parseEnvFile(await renderedEnv(allocOf(allocs, 'uffd-server-1'), 'uffd-server'))).toEqual({
        SBX_BUCKET: '/var/lib/sbx/bucket',
        SBX_CACHE_DIR: '/var/lib/sbx/cache',
      });
      // Every service registered in Consul with its check, as the README's table says.
      const services = await consulGet<Record<string, string[]>>('/v1/catalog/services');
      expect(
        Object.keys(services)
          .filter((s) => s.startsWith('sbx-'))
          .sort(),
      ).toEqual([
        'sbx-block-server',
        'sbx-dns',
        'sbx-net-agent',
        'sbx-orchestrator',
        'sbx-orchestrator-metrics',
        'sbx-proxy',
        'sbx-proxy-http',
        'sbx-uffd-server',
      ]);
      // The net-agent reserved its ready slots in Consul KV under the Nomad node id.
      const nodeId = (await nomad!.api<Array<{ ID: string }>>('/v1/nodes'))[0]!.ID;
      const keys = await consulGet<string[]>(`/v1/kv/${nodeId}/?keys`);
      expect(keys.length).toBeGreaterThanOrEqual(2);
    });

    it('creates, pauses and resumes a sandbox through the orchestrator gRPC port Nomad started', async () => {
      await machine!.forward(join(root, 'grpc.sock'), '127.0.0.1', 5008);
      client = dial(SandboxServiceClient, join(root, 'grpc.sock'));
      await create('nomad-sbx');
      expect(await listed()).toEqual(['nomad-sbx']);
      const buildId = randomUUID();
      await unary(client, client.pause, { sandboxId: 'nomad-sbx', templateId: 'base', buildId }, 120_000);
      expect(await listed()).toEqual([]);
      await create('nomad-sbx', { snapshot: true, buildId });
      expect(await listed()).toEqual(['nomad-sbx']);
      expect(await dnsRecords()).toContain('nomad-sbx');
    });

    it('restarting dns through Nomad: the sandbox keeps running and its name comes back', async () => {
      await restartTask('dns', 'dns');
      expect(await listed()).toEqual(['nomad-sbx']);
      await eventually(async () => (await dnsRecords()).includes('nomad-sbx'), {
        what: 'the DNS record back',
        timeoutMs: 30_000,
      });
      await waitHealthy('after the dns restart');
    });

    it('restarting each block-server instance: the sandbox keeps running', async () => {
      await restartTask('block-server-0', 'block-server');
      await restartTask('block-server-1', 'block-server');
      await waitHealthy('after the block-server restarts');
      expect(await listed()).toEqual(['nomad-sbx']);
    });

    it('restarting the uffd-server instances: the sandbox keeps running (the new process takes its memory back)', async () => {
      await restartTask('uffd-server-0', 'uffd-server');
      await restartTask('uffd-server-1', 'uffd-server');
      await waitHealthy('after the uffd-server restarts');
      expect(await listed()).toEqual(['nomad-sbx']);
      expect(await dnsRecords()).toContain('nomad-sbx');
      // It pauses and resumes as before, and is then deleted: the next restarts need no sandbox.
      const buildId = randomUUID();
      await unary(client!, client!.pause, { sandboxId: 'nomad-sbx', templateId: 'base', buildId }, 120_000);
      await create('nomad-sbx', { snapshot: true, buildId });
      expect(await listed()).toEqual(['nomad-sbx']);
      await unary(client!, client!.delete, { sandboxId: 'nomad-sbx' }, 60_000);
      expect(await listed()).toEqual([]);
    });

    it('restarting net-agent (no sandboxes), the orchestrator and the proxy: each serves again', async () => {
      await restartTask('net-agent', 'net-agent');
      await restartTask('orchestrator', 'orchestrator');
      await restartTask('proxy', 'proxy');
      await waitHealthy('after the net-agent and orchestrator restarts');
      await create('after-orch');
      expect(await listed()).toEqual(['after-orch']);
      await unary(client!, client!.delete, { sandboxId: 'after-orch' }, 60_000);
    });

    it('a changed Nomad variable reaches the service on alloc restart; a job update moves dns', async () => {
      await nomad!.cli(['var', 'put', '-force', 'nomad/jobs/sbx-dns', 'ttl=45']);
      await eventually(
        async () => parseEnvFile(await renderedEnv(allocOf(await allocations(), 'dns'), 'dns'))['SBX_DNS_TTL'] === '45',
        { what: 'sbx.env re-rendered with ttl=45', timeoutMs: 30_000 },
      );
      await restartTask('dns', 'dns');
      expect(await eventually(() => answerTtl('127.0.0.4'), { timeoutMs: 30_000 })).toBe(45);

      const old = allocOf(await allocations(), 'dns');
      await nomad!.cli(jobArgs('dns', ['-var', 'dns_listen=127.0.0.5:53']));
      const allocs = await eventually(
        async () => {
          const now = await allocations();
          const dns = now.find((a) => a.TaskGroup === 'dns');
          return dns && dns.ID !== old.ID && dns.ClientStatus === 'running' ? now : false;
        },
        { what: 'a new dns allocation', timeoutMs: 120_000 },
      );
      expect(allocOf(allocs, 'dns').ID).not.toBe(old.ID);
      await waitHealthy('after the dns job update');
      const listening = await machine!.exec('ss', ['-Hlun']);
      expect(listening).toContain('127.0.0.5:53');
      expect(listening).not.toContain('127.0.0.4:53');
    });

    it('stopping the jobs leaves the machine as it was', async () => {
      await stopJobs();
      await eventually(
        async () => {
          const services = await consulGet<Record<string, string[]>>('/v1/catalog/services');
          return Object.keys(services).every((s) => !s.startsWith('sbx-'));
        },
        { what: 'every sbx service gone from Consul', timeoutMs: 60_000 },
      );
      // net-agent released its slots: no reservation key and no slot namespace is left.
      const nodeId = (await nomad!.api<Array<{ ID: string }>>('/v1/nodes'))[0]!.ID;
      const left = await consulGet<Array<{ Key: string; Value: string }>>(`/v1/kv/${nodeId}/?recurse`).catch(() => []);
      expect(left.map((p) => `${p.Key} ${Buffer.from(p.Value ?? '', 'base64').toString()}`)).toEqual([]);
      const mountNamespace = nomad!.mountNamespace;
      await nomad!.close();
      nomad = undefined;
      expect(await processesOf(mountNamespace)).toEqual([]);
      await consul!.close();
      consul = undefined;
      await machine!.remove();
      machine = undefined;
      await rm(root, { recursive: true, force: true });
      expect(await machineState()).toEqual(before);
    });
  },
);
