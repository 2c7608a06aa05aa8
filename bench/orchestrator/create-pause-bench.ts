/**
 * Orchestrator benchmark (issue 8): create-from-snapshot latency (p50, p99) and pause time of
 * 256 MiB and 1 GiB guests with 10% of memory written, with each step's share, driven through
 * SandboxService against the real services and the vmm-sim VMM double in a throwaway node
 * namespace. Goals: orchestration overhead (every step but the VMM's own: start vmm, load
 * snapshot, resume, mmds, envd init) ≤ 25 ms p50 per create with warm caches and a ready
 * slot; pause of a 1 GiB guest with 10% written ≤ 1 s.
 *
 *   bash bench/orchestrator/run.sh [--sizes 256,1024] [--creates 20] [--pauses 3] [--modes upstream-diff,...]
 *       [--read-percent 0]   (memory the guest also reads, past the written 10%, before each pause)
 *
 * Modes (how the pause knows the written pages; issue 18), each a fresh node:
 *   upstream-diff      the double as upstream Firecracker (no uffd write-protect): Firecracker's
 *                      Diff snapshot (KVM's dirty log) gives the written pages; prefetch on (default)
 *   upstream-diff-noprefetch  the same with uffd prefetch off, to see what prefetch buys
 *   upstream-present   upstream Firecracker, Full snapshot, every page the uffd-server
 *                      installed is exported (E2B's behaviour); prefetch off (it would land in the diff)
 *   wp-async           the double as E2B's Firecracker fork: uffd WP_ASYNC, PAGEMAP_SCAN
 */
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { NodeUnderTest } from '../../apps/orchestrator/test/node-under-test.js';

const VMM_STEPS = new Set([
  'start vmm',
  'load snapshot',
  'resume vm',
  'set mmds',
  'resume vm and set mmds',
  'init envd',
]);

function config(id: string, buildId = ''): SandboxConfig {
  return {
    templateId: 'base',
    buildId,
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId: id,
    envVars: {},
    metadata: {},
    envdVersion: '0.2.0',
    vcpu: 1,
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

function memoryDiffOf(
  node: NodeUnderTest,
  id: string,
): { tracking: string; pages: number; zeroPages: number; bytes: number } | undefined {
  for (const line of [...node.logs('orchestrator')].reverse()) {
    if (!line.includes('"msg":"sandbox paused"') || !line.includes(`"sandboxId":"${id}"`)) continue;
    return (JSON.parse(line) as { memoryDiff?: { tracking: string; pages: number; zeroPages: number; bytes: number } })
      .memoryDiff;
  }
  return undefined;
}

function pct(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/** The steps of the `msg` line about `id`, waited for: the orchestrator's logs come through a pipe. */
async function stepsOf(node: NodeUnderTest, msg: string, id: string): Promise<Record<string, number>> {
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    const lines = node
      .logs('orchestrator')
      .filter((l) => l.includes(`"msg":"${msg}"`) && l.includes(`"sandboxId":"${id}"`));
    // Each sandbox id is created and paused once per node: its line is the one.
    if (lines.length > 0) {
      const steps = (JSON.parse(lines[lines.length - 1]!) as { steps?: Record<string, number> }).steps;
      if (steps) return steps;
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  if (process.env['BENCH_DEBUG'])
    console.log(
      node
        .logs('orchestrator')
        .filter((l) => l.includes(msg))
        .slice(-3),
    );
  return {};
}

/**
 * The double's own step timings of the load that made `id` (its 'snapshot loaded' line, which
 * the orchestrator follows into its log as a vmm-stdout line). Waited for like stepsOf.
 */
async function vmmLoadStepsOf(node: NodeUnderTest, id: string): Promise<Record<string, number>> {
  const deadline = Date.now() + 5_000;
  while (Date.now() < deadline) {
    for (const line of node.logs('orchestrator')) {
      if (!line.includes('snapshot loaded') || !line.includes(`"sandboxId":"${id}"`)) continue;
      const outer = JSON.parse(line) as { msg?: string };
      try {
        const inner = JSON.parse(outer.msg ?? '') as { msg?: string; steps?: Record<string, number> };
        if (inner.msg === 'snapshot loaded' && inner.steps) return inner.steps;
      } catch {
        // Not the VMM's JSON line.
      }
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  return {};
}

function shares(all: Record<string, number>[]): string {
  const names = [...new Set(all.flatMap((s) => Object.keys(s)))].filter((n) => n !== 'total');
  const total = pct(
    all.map((s) => s['total'] ?? 0),
    50,
  );
  return names
    .map((n) => {
      const p50 = pct(
        all.map((s) => s[n] ?? 0),
        50,
      );
      return `    ${n.padEnd(22)} p50 ${p50.toFixed(2).padStart(8)} ms  ${((100 * p50) / total).toFixed(1).padStart(5)}%`;
    })
    .join('\n');
}

/** Environment of every service the node starts (they inherit the bench's), per mode. */
const MODES: Record<string, Record<string, string>> = {
  'upstream-diff': {},
  'upstream-diff-noprefetch': { SBX_UFFD_SERVER_PREFETCH_WITHOUT_TRACKING: 'false' },
  'upstream-present': {
    SBX_ORCHESTRATOR_PAUSE_MEMORY_DIFF: 'present',
    SBX_UFFD_SERVER_PREFETCH_WITHOUT_TRACKING: 'false',
  },
  'wp-async': { SBX_VMM_SIM_E2B_FORK_WRITE_PROTECT: 'async' },
};
const MODE_KEYS = [...new Set(Object.values(MODES).flatMap((m) => Object.keys(m)))];

async function benchSize(
  sizeMb: number,
  creates: number,
  pauses: number,
  mode: string,
  readPercent: number,
  vmmPool: number,
): Promise<void> {
  console.log(
    `\n== guest ${sizeMb} MiB, 10% written${readPercent ? `, ${readPercent}% more read` : ''}, mode ${mode} ==`,
  );
  for (const key of MODE_KEYS) delete process.env[key];
  Object.assign(process.env, MODES[mode]);
  // A node of its own per mode: nothing of the previous node's background work can meet it.
  const tag = `b${sizeMb}${Object.keys(MODES).indexOf(mode)}`;
  const node = await NodeUnderTest.start({ tag, sampleMemoryMb: sizeMb, sampleRootfsMb: 64, vmmPoolSize: vmmPool });
  // Between timed creates the pool refills (a VMM start takes hundreds of ms on this machine):
  // the figure is a create at a rate the pool keeps up with; a burst beyond it starts its own.
  const poolRefilled = async () => {
    const deadline = Date.now() + 60_000;
    // A waiting VMM has answered the pool's GET / (its log says so): the pool holds it.
    const answered = async () => {
      const dir = join(node.dataDir, 'vmm-pool');
      const logs = (await readdir(dir).catch(() => [] as string[])).filter((f) => f.endsWith('.stdout.log'));
      const texts = await Promise.all(logs.map((f) => readFile(join(dir, f), 'utf8').catch(() => '')));
      return texts.filter((t) => t.includes('"method":"GET","path":"/"')).length;
    };
    while ((await answered()) < vmmPool) {
      if (Date.now() > deadline) throw new Error('the VMM pool did not refill within 60 s');
      await new Promise((r) => setTimeout(r, 50));
    }
    await new Promise((r) => setTimeout(r, 100));
  };
  try {
    const client = node.client;
    const create = (id: string, buildId = '') =>
      unary(
        client,
        client.create,
        { sandbox: config(id, buildId), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
        300_000,
      );
    const ipOf = async (id: string) =>
      (await node.footprint())['dns']!.find((r) => r.startsWith(`${id}=`))!.split('=')[1]!;
    const written = Math.floor((sizeMb * 1024 * 1024) / 10 / 4096) * 4096;
    const fill = async (ip: string, seed: number) => {
      const chunk = 16 * 1024 * 1024;
      for (let off = 0; off < written; off += chunk) {
        await node.fillMemory(
          ip,
          off,
          Math.min(chunk, written - off),
          (seed & 0xff).toString(16).padStart(2, '0') + 'a5',
        );
      }
    };
    await create('seed');
    await fill(await ipOf('seed'), 1);
    const source = crypto.randomUUID();
    await unary(client, client.pause, { sandboxId: 'seed', templateId: 'base', buildId: source }, 300_000);

    // Warm: one create from the snapshot so caches and channels are hot.
    await create('warm', source);
    await unary(client, client.delete, { sandboxId: 'warm' }, 60_000);

    const createMs: number[] = [];
    const createSteps: Record<string, number>[] = [];
    const loadSteps: Record<string, number>[] = [];
    for (let i = 0; i < creates; i++) {
      const id = `c${i}`;
      await poolRefilled();
      const t0 = performance.now();
      await create(id, source);
      createMs.push(performance.now() - t0);
      createSteps.push(await stepsOf(node, 'sandbox created', id));
      loadSteps.push(await vmmLoadStepsOf(node, id));
      await unary(client, client.delete, { sandboxId: id }, 60_000);
    }
    const overhead = createSteps.map((s) =>
      Object.entries(s)
        .filter(([k]) => k !== 'total' && !VMM_STEPS.has(k) && !k.startsWith('(side by side)'))
        .reduce((a, [, v]) => a + v, 0),
    );
    console.log(
      `create from snapshot (${creates}x, gRPC round trip): p50 ${pct(createMs, 50).toFixed(1)} ms  p99 ${pct(createMs, 99).toFixed(1)} ms`,
    );
    console.log(
      `  orchestration overhead (all but the VMM's steps): p50 ${pct(overhead, 50).toFixed(2)} ms  p99 ${pct(overhead, 99).toFixed(2)} ms  (goal ≤ 10 ms p50)`,
    );
    const pooledMs = createMs.filter((_, i) =>
      Object.keys(createSteps[i]!).some((s) => s.startsWith('take pooled vmm')),
    );
    console.log(`  ${pooledMs.length} of ${creates} creates took a VMM from the pool (size ${vmmPool})`);
    if (pooledMs.length > 0 && pooledMs.length < creates)
      console.log(
        `  of these: p50 ${pct(pooledMs, 50).toFixed(1)} ms  p99 ${pct(pooledMs, 99).toFixed(1)} ms (the others started their own VMM)`,
      );
    console.log('  steps (orchestrator-side timings):\n' + shares(createSteps));
    if (loadSteps.some((s) => Object.keys(s).length > 0))
      console.log("  the VMM double's snapshot load (its own timings):\n" + shares(loadSteps));

    const pauseMs: number[] = [];
    const fillMs: number[] = [];
    const diffs: { tracking: string; pages: number; zeroPages: number; bytes: number }[] = [];
    const pauseSteps: Record<string, number>[] = [];
    for (let i = 0; i < pauses; i++) {
      const id = `p${i}`;
      await create(id, source);
      const f0 = performance.now();
      await fill(await ipOf(id), 2 + i);
      fillMs.push(performance.now() - f0);
      // Pages the guest only reads: present for the uffd-server, not in the dirty log.
      const read = Math.floor((sizeMb * 1024 * 1024 * readPercent) / 100 / 4096) * 4096;
      for (let off = 0; off < read; off += 64 << 20) {
        const length = Math.min(64 << 20, read - off);
        const r = await node.guest(
          await ipOf(id),
          'GET',
          `/_test/memory/hash?offset=${written + off}&length=${length}`,
        );
        if (r.status !== 200) throw new Error(`reading guest memory: ${r.status}`);
      }
      const t0 = performance.now();
      await unary(client, client.pause, { sandboxId: id, templateId: 'base', buildId: crypto.randomUUID() }, 300_000);
      pauseMs.push(performance.now() - t0);
      pauseSteps.push(await stepsOf(node, 'sandbox paused', id));
      const d = memoryDiffOf(node, id);
      if (d) diffs.push(d);
    }
    const diff = diffs[diffs.length - 1];
    console.log(
      `first write of ${(written / 1024 / 1024).toFixed(0)} MiB after resume (page faults served): p50 ${pct(fillMs, 50).toFixed(1)} ms`,
    );
    console.log(
      `memory diff per pause: p50 ${(
        pct(
          diffs.map((d) => d.bytes),
          50,
        ) /
        1024 /
        1024
      ).toFixed(
        1,
      )} MiB (last: ${diff?.pages ?? '?'} pages stored, ${diff?.zeroPages ?? '?'} zero pages, tracking ${diff?.tracking ?? '?'})`,
    );
    console.log(
      `pause with ${(written / 1024 / 1024).toFixed(0)} MiB written (${pauses}x): p50 ${pct(pauseMs, 50).toFixed(1)} ms  max ${Math.max(...pauseMs).toFixed(1)} ms${sizeMb >= 1024 ? '  (goal ≤ 300 ms p50, issue 17)' : ''}`,
    );
    console.log('  steps:\n' + shares(pauseSteps));
    // The uffd-server's side of 'export memory diff': the copy's own CPU time, apart from
    // waiting on a loaded machine (the wall time above includes the fdatasync and the wait).
    const exported = node
      .logs('uffd-server')
      .filter((l) => l.includes('"msg":"memory diff exported"') && /"sandboxId":"p\d+"/.test(l))
      .map((l) => JSON.parse(l) as { copyCpuMs?: number });
    const cpu = exported.map((e) => e.copyCpuMs).filter((v): v is number => typeof v === 'number');
    if (cpu.length > 0)
      console.log(
        `  memory diff copy, CPU time of its thread: p50 ${pct(cpu, 50).toFixed(1)} ms (${cpu.length} pauses)`,
      );
  } finally {
    // BENCH_LOG_DIR=<dir>: every service's log lines of this node, one file each (to study a run).
    const logDir = process.env['BENCH_LOG_DIR'];
    if (logDir) {
      await mkdir(logDir, { recursive: true });
      for (const name of ['orchestrator', 'uffd-server', 'block-server', 'net-agent', 'dns'])
        await writeFile(join(logDir, `${tag}-${name}.log`), node.logs(name).join('\n') + '\n');
    }
    await node.stop();
  }
}

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      sizes: { type: 'string', default: '256,1024' },
      creates: { type: 'string', default: '20' },
      pauses: { type: 'string', default: '3' },
      modes: { type: 'string', default: 'upstream-diff' },
      'read-percent': { type: 'string', default: '0' },
      'vmm-pool': { type: 'string', default: '2' },
    },
  });
  const modes = values.modes!.split(',');
  for (const m of modes) if (!MODES[m]) throw new Error(`unknown mode ${m}: one of ${Object.keys(MODES).join(', ')}`);
  console.log('orchestrator bench: real dns, net-agent, block-server, uffd-server; VMM = vmm-sim double.');
  console.log('Note: the machine is shared (2 cores, other engineers building and testing): numbers are noisy.');
  for (const mode of modes) {
    for (const size of values.sizes!.split(',').map(Number)) {
      await benchSize(
        size,
        Number(values.creates),
        Number(values.pauses),
        mode,
        Number(values['read-percent']),
        Number(values['vmm-pool']),
      );
    }
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
