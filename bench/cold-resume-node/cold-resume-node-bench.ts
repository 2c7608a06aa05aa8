/**
 * Cold resume of a whole node (issue 17): a sandbox with 1 GiB of memory, every page written, is
 * paused into a build in the bucket; a node with an empty cache (all five services as processes,
 * the vmm-sim VMM double) resumes it through the orchestrator's gRPC API (Create from the
 * build), its bucket answering each request after 5 or 50 ms: a local-directory bucket read
 * through the services' SBX_BUCKET_REQUEST_DELAY_MS, or fake-gcs-server behind a TCP proxy in
 * the node's namespace that holds each request. The guest faults a 100 MiB working set in before
 * envd answers /init (the double's SBX_SIM_START_TOUCH: runs of 256 KiB-4 MiB spread over
 * memory), so the create returns once that start is done: call to return = time to envd ready.
 *
 * Per delay: the first resume (the build's recorded prefetch set removed: a build never resumed),
 * a pause into a second build (which stores the set that resume recorded), and on another empty
 * node the resume of that second build (its set fetched and copied in first).
 * Bytes fetched = what the node's chunk caches hold on disk afterwards (sparse files: only what
 * came from the bucket); bytes touched = what the guest's start touched.
 *
 *   bash bench/cold-resume-node/run.sh [--bucket local,gcs] [--delays 5,50] [--size-mib 1024]
 *       [--touch-mib 100] [--run-kib 256-4096]
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { parseArgs } from 'node:util';
import { dial, unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { DnsClient } from '#proto/sbx/dns';
import { UffdServerClient } from '#proto/sbx/uffd';
import { GcsBackend, PREFETCH_FILE } from '#storage';
import { freeTcpPort } from '#test-kit';
import { NodeUnderTest } from '../../apps/orchestrator/test/node-under-test.js';
import { DelayProxy } from '../../libs/test-peers/src/delay-proxy.js';
import { FakeGcsServer } from '../../libs/test-peers/src/fake-gcs-server.js';

const execFileAsync = promisify(execFile);
const MiB = 1024 * 1024;
const GCS_BUCKET = 'cold-resume';
const SANDBOX = 'cr';

/** Where the node's builds live, and how a node reaches them with a given delay per request. */
interface Bucket {
  name: string;
  storage(delayMs: number): (node: NodeUnderTest) => Promise<{ bucket: string; env: Record<string, string> }>;
  /** Requests seen at the bucket so far (undefined where they cannot be seen from outside). */
  requests(): number | undefined;
  has(buildId: string, file: string): Promise<boolean>;
  remove(buildId: string, file: string): Promise<void>;
  stop(): Promise<void>;
}

async function localBucket(dir: string): Promise<Bucket> {
  await mkdir(dir, { recursive: true });
  return {
    name: 'local directory, SBX_BUCKET_REQUEST_DELAY_MS',
    storage: (delayMs) => async () => ({
      bucket: dir,
      env: { SBX_BUCKET_REQUEST_DELAY_MS: String(delayMs) },
    }),
    requests: () => undefined,
    has: async (id, file) => existsSync(join(dir, id, file)),
    remove: (id, file) => rm(join(dir, id, file), { force: true }),
    stop: async () => undefined,
  };
}

/** fake-gcs-server holding a copy of the local bucket `from` (uploaded directly, not through a proxy). */
async function gcsBucket(from: string): Promise<Bucket> {
  // Every node's proxy listens on this port in its own namespace: fake-gcs-server's upload
  // sessions point at its external URL, which must reach it from any node.
  const port = await freeTcpPort();
  const external = `http://127.0.0.1:${port}`;
  const server = await FakeGcsServer.start({ externalUrl: external });
  await server.createBucket(GCS_BUCKET);
  const direct = new GcsBackend({ bucket: GCS_BUCKET, apiEndpoint: server.endpoint });
  try {
    for (const id of await readdir(from))
      for (const name of await readdir(join(from, id))) await direct.upload(`${id}/${name}`, join(from, id, name));
  } finally {
    await direct.close();
  }
  const target = new URL(server.endpoint);
  const proxies: DelayProxy[] = [];
  return {
    name: 'fake-gcs-server behind a delaying TCP proxy in the node',
    storage: (delayMs) => async (node) => {
      const proxy = await DelayProxy.start({ host: target.hostname, port: Number(target.port) }, delayMs, {
        netns: `/run/netns/${node.nodeNs}`,
        port,
      });
      proxies.push(proxy);
      return { bucket: `gs://${GCS_BUCKET}`, env: { SBX_GCS_ENDPOINT: external } };
    },
    requests: () => proxies.at(-1)?.counters.requests,
    has: async (id, file) => (await server.list(GCS_BUCKET, `${id}/`)).includes(`${id}/${file}`),
    remove: async (id, file) => {
      const r = await fetch(`${server.endpoint}/storage/v1/b/${GCS_BUCKET}/o/${encodeURIComponent(`${id}/${file}`)}`, {
        method: 'DELETE',
      });
      if (!r.ok && r.status !== 404) throw new Error(`delete ${id}/${file}: ${r.status}`);
    },
    stop: async () => {
      for (const p of proxies.splice(0)) await p.stop();
      await server.stop();
    },
  };
}

function config(buildId: string, envVars: Record<string, string>): SandboxConfig {
  return {
    templateId: 'base',
    buildId,
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId: SANDBOX,
    envVars,
    metadata: {},
    envdVersion: '0.2.0',
    vcpu: 0,
    ramMb: 0,
    teamId: 'bench',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: buildId !== '',
    baseTemplateId: 'base',
    executionId: '',
    volumeMounts: [],
  };
}

async function guestIp(node: NodeUnderTest): Promise<string> {
  const dns = dial(DnsClient, node.sockets.dns);
  try {
    const record = (await unary(dns, dns.list, {}, 5000)).records.find((r) => r.name === SANDBOX);
    if (!record) throw new Error(`no DNS record for ${SANDBOX}`);
    return record.ip;
  } finally {
    dns.close();
  }
}

/** Bytes a service's chunk caches hold on disk (sparse files: what it fetched from the bucket). */
async function fetchedBytes(node: NodeUnderTest, owner: string): Promise<number> {
  const dir = join(node.cacheDir, 'remote', owner);
  if (!existsSync(dir)) return 0;
  const { stdout } = await execFileAsync('du', ['-sB1', dir]);
  return Number(stdout.split(/\s/)[0]);
}

async function waitFor(what: string, check: () => Promise<boolean>, timeoutMs = 300_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Steps of the orchestrator's 'sandbox created' line for a start from `buildId`. */
async function stepsOf(node: NodeUnderTest, buildId: string): Promise<Record<string, number>> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    for (const line of [...node.logs('orchestrator')].reverse())
      if (line.includes('"msg":"sandbox created"') && line.includes(`"buildId":"${buildId}"`))
        return (JSON.parse(line) as { steps?: Record<string, number> }).steps ?? {};
    if (Date.now() > deadline) return {};
    await new Promise((r) => setTimeout(r, 50));
  }
}

interface Resume {
  ms: number;
  /** The orchestrator's create steps (ms), for where the time outside the guest's start goes. */
  steps: Record<string, number>;
  initEnvdMs: number;
  requests: number | undefined;
  /** Memory (uffd-server) and everything (all services) fetched, at envd ready and 2 s later. */
  memoryAtReady: number;
  memory: number;
  all: number;
  touched: number;
  touchMs: number;
  faults: number;
  passPages: number;
  setBlocks: number;
}

class Bench {
  private readonly rootfsDir = `/run/crn${process.pid % 100000}fc`;
  private nodes = 0;

  constructor(
    private readonly bucket: Bucket,
    private readonly sizeMib: number,
    private readonly touchSpec: string,
  ) {}

  /** A node on the bucket; `template` false: no sample template of its own (a resume node needs none). */
  private start(delayMs: number, sampleMemoryMb: number, template = true): Promise<NodeUnderTest> {
    const storage = this.bucket.storage(delayMs);
    return NodeUnderTest.start({
      tag: `crn${this.nodes++}`,
      sampleMemoryMb,
      sampleRootfsMb: 64,
      envdTimeoutMs: 300_000,
      vmRootfsDir: this.rootfsDir,
      vmmPoolSize: 1,
      // Without a template of its own, nothing of the resume node's start is still uploading
      // (or competing for the bucket) while it resumes.
      storage: async (node) => {
        const s = await storage(node);
        return template ? s : { ...s, env: { ...s.env, SBX_ORCHESTRATOR_SAMPLE_TEMPLATE: 'false' } };
      },
    });
  }

  private async create(node: NodeUnderTest, buildId: string, envVars: Record<string, string>): Promise<number> {
    const t0 = performance.now();
    await unary(
      node.client,
      node.client.create,
      { sandbox: config(buildId, envVars), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
      600_000,
    );
    return performance.now() - t0;
  }

  private async pause(node: NodeUnderTest): Promise<string> {
    const buildId = crypto.randomUUID();
    await unary(node.client, node.client.pause, { sandboxId: SANDBOX, templateId: 'base', buildId }, 600_000);
    // The upload runs behind the pause; the snapfile goes last.
    await waitFor(`build ${buildId} in the bucket`, () => this.bucket.has(buildId, 'snapfile'));
    return buildId;
  }

  /** A sandbox whose whole memory is written (every page in the build, none zero), paused into a build. */
  async build(): Promise<string> {
    const node = await this.start(0, this.sizeMib);
    try {
      await this.create(node, '', {});
      const ip = await guestIp(node);
      const piece = 64 * MiB;
      for (let at = 0; at < this.sizeMib * MiB; at += piece)
        await node.fillMemory(ip, at, piece, `c0ffee${(at / piece).toString(16).padStart(2, '0')}5a`);
      return await this.pause(node);
    } finally {
      await node.stop();
    }
  }

  /** Resumes `buildId` on a node with an empty cache; with `then`, pauses it into a new build. */
  async resume(delayMs: number, buildId: string, pauseAfter: boolean): Promise<{ r: Resume; next?: string }> {
    const node = await this.start(delayMs, 16, false);
    const uffd = dial(UffdServerClient, node.sockets.uffd);
    try {
      // Let the node settle: the VMM pool filled.
      await new Promise((r) => setTimeout(r, 3000));
      const requestsBefore = this.bucket.requests();
      const ms = await this.create(node, buildId, { SBX_SIM_START_TOUCH: this.touchSpec });
      const memoryAtReady = await fetchedBytes(node, 'uffd-server');
      const requests = this.bucket.requests();
      const steps = await stepsOf(node, buildId);
      const ip = await guestIp(node);
      const start = JSON.parse((await node.guest(ip, 'GET', '/_test/start')).body.toString()) as {
        touch: { bytes: number; ms: number } | null;
      };
      if (!start.touch) throw new Error('the guest did not touch its working set at start');
      const st = await unary(uffd, uffd.stopRecording, { sandboxId: SANDBOX });
      await new Promise((r) => setTimeout(r, 2000));
      const memory = await fetchedBytes(node, 'uffd-server');
      const all = memory + (await fetchedBytes(node, 'block-server')) + (await fetchedBytes(node, 'orchestrator'));
      const r: Resume = {
        ms,
        steps,
        initEnvdMs: steps['init envd'] ?? NaN,
        requests: requests === undefined ? undefined : requests - (requestsBefore ?? 0),
        memoryAtReady,
        memory,
        all,
        touched: start.touch.bytes,
        touchMs: start.touch.ms,
        faults: st.faults,
        passPages: st.recordedPrefetchPages,
        setBlocks: st.prefetchSetBlocks,
      };
      return pauseAfter ? { r, next: await this.pause(node) } : { r };
    } finally {
      uffd.close();
      await node.stop();
    }
  }
}

const HEAD =
  `${'resume'.padEnd(30)}${'envd ready'.padStart(11)}${'init envd'.padStart(10)}${'touch'.padStart(8)}` +
  `${'requests'.padStart(9)}${'fetched MiB'.padStart(12)}${'at ready'.padStart(9)}${'touched'.padStart(8)}` +
  `${'ratio'.padStart(7)}${'all MiB'.padStart(8)}${'faults'.padStart(7)}${'set MiB'.padStart(8)}`;

function row(name: string, r: Resume): string {
  const mib = (b: number) => (b / MiB).toFixed(1);
  return (
    `${name.padEnd(30)}${`${r.ms.toFixed(0)} ms`.padStart(11)}${`${r.initEnvdMs.toFixed(0)}`.padStart(10)}` +
    `${r.touchMs.toFixed(0).padStart(8)}${(r.requests === undefined ? '-' : String(r.requests)).padStart(9)}` +
    `${mib(r.memory).padStart(12)}${mib(r.memoryAtReady).padStart(9)}${mib(r.touched).padStart(8)}` +
    `${(r.memory / r.touched).toFixed(2).padStart(7)}${mib(r.all).padStart(8)}${String(r.faults).padStart(7)}` +
    `${mib(r.passPages * 4096).padStart(8)}`
  );
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      bucket: { type: 'string', default: 'local,gcs' },
      delays: { type: 'string', default: '5,50' },
      'size-mib': { type: 'string', default: '1024' },
      'touch-mib': { type: 'string', default: '100' },
      'run-kib': { type: 'string', default: '256-4096' },
    },
  });
  const sizeMib = Number(values['size-mib']);
  const touchMib = Number(values['touch-mib']);
  if (!(sizeMib >= 64 && touchMib > 0 && touchMib * 2 <= sizeMib))
    throw new Error('--size-mib ≥ 64 and 0 < --touch-mib ≤ half of it');
  if (!/^\d+-\d+$/.test(values['run-kib']!)) throw new Error('--run-kib <min>-<max>');
  const touchSpec = `${touchMib}:${values['run-kib']}`;
  const delays = values.delays!.split(',').map(Number);
  console.log(
    `cold resume, whole node: real dns, net-agent, block-server, uffd-server, orchestrator (gRPC Create from a build); ` +
      `VMM = vmm-sim double; ${sizeMib} MiB guest, every page written; its start touches ${touchMib} MiB ` +
      `(runs ${values['run-kib']} KiB, SBX_SIM_START_TOUCH) before envd answers; each resume on a node with an empty cache.`,
  );
  console.log(
    'envd ready = Create call to return; init envd = the orchestrator step from VM resume to /init answered; touch = the guest start (ms);',
  );
  console.log(
    'fetched = memory the uffd-server fetched (2 s after ready; "at ready" = when Create returned); all = every service; set = recorded prefetch copied in.',
  );
  console.log('Note: the machine is shared (2 cores, other engineers building and testing): numbers are noisy.');
  const kinds = values.bucket!.split(',');
  for (const kind of kinds) if (kind !== 'local' && kind !== 'gcs') throw new Error(`--bucket ${kind}: local or gcs`);
  const work = `/tmp/sbx-crn-${process.pid}`;
  const local = await localBucket(join(work, 'bucket'));
  try {
    // Built once, into the local bucket; fake-gcs-server gets a copy of it.
    const t0 = performance.now();
    const built = await new Bench(local, sizeMib, touchSpec).build();
    console.log(
      `build ${built}: ${sizeMib} MiB written and paused into the bucket (${((performance.now() - t0) / 1000).toFixed(1)} s)`,
    );
    for (const kind of kinds) {
      const bucket = kind === 'local' ? local : await gcsBucket(join(work, 'bucket'));
      try {
        const bench = new Bench(bucket, sizeMib, touchSpec);
        console.log(`\n== bucket: ${bucket.name} ==`);
        for (const delay of delays) {
          // A build never resumed: no recorded set.
          await bucket.remove(built, PREFETCH_FILE);
          const first = await bench.resume(delay, built, true);
          const second = await bench.resume(delay, first.next!, false);
          console.log(`\n-- ${delay} ms per bucket request (load: ${(await execFileAsync('uptime')).stdout.trim()})`);
          console.log(HEAD);
          console.log(row('without recorded set', first.r));
          console.log(row(`with recorded set (${second.r.setBlocks} blk)`, second.r));
          for (const [name, r] of [
            ['without', first.r],
            ['with', second.r],
          ] as const)
            console.log(
              `  steps ${name} set (ms): ${Object.entries(r.steps)
                .filter(([, v]) => v >= 1)
                .map(([k, v]) => `${k} ${v.toFixed(0)}`)
                .join(', ')}`,
            );
          if (delay === 50)
            for (const [name, r] of [
              ['without', first.r],
              ['with', second.r],
            ] as const)
              console.log(
                `goal (50 ms): envd ready ≤ 1500 ms, fetched ≤ 1.5 × touched — ${name} set: ` +
                  `${r.ms <= 1500 ? 'met' : 'MISSED'} (${r.ms.toFixed(0)} ms), ${r.memory <= 1.5 * r.touched ? 'met' : 'MISSED'} (${(r.memory / r.touched).toFixed(2)}x)`,
              );
        }
      } finally {
        if (bucket !== local) await bucket.stop();
      }
    }
  } finally {
    await rm(work, { recursive: true, force: true });
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
