/**
 * Density benchmark (issue 17): the whole node on local defaults (`./sbx node up`, the VMM
 * double) in a throwaway network namespace, 100 sandboxes with 128 MiB guests (mostly
 * untouched) created 10 at a time. Per service (orchestrator, uffd-server, block-server,
 * net-agent, dns, proxy): resident memory (RSS, PSS from smaps_rollup), fds and threads at 1
 * and at 100 running and the increment per sandbox; idle CPU of all services together with
 * 100 running (utime + stime from /proc/pid/stat); create p50/p99 with 1 vs with 100 running.
 * The VMM double's own cost per sandbox is printed apart (test tooling, not one of ours).
 * Everything is removed afterwards and checked (status: slots, devices, processes).
 *
 *   bash bench/density/run.sh [--sandboxes 100] [--batch 10] [--memory-mb 128] [--creates 60]
 *       [--idle-seconds 30] [--detail]   (--detail: fd kinds that grew, per service)
 *
 * Goals at 100: ≤ 2 MiB resident and ≤ 8 fds per sandbox per service, idle CPU of all services
 * ≤ 5 % of one core, create p99 at 100 running ≤ 2 × create p99 at 1 running.
 */
import { execFile, spawn } from 'node:child_process';
import { mkdtemp, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { dial, unary } from '#grpc';
import { SandboxServiceClient, type SandboxConfig } from '#proto/orchestrator';
import { AdmissionClient } from '#proto/sbx/admission';
import { logLine, sbx, ServiceProcess } from '#test-kit';

const exec = promisify(execFile);
const SERVICES = ['orchestrator', 'uffd-server', 'block-server', 'net-agent', 'dns', 'proxy'] as const;
const VMM = 'vmm double';
const TICKS = 100; // USER_HZ: /proc/pid/stat counts CPU in 1/100 s on Linux

interface ProcSample {
  rssKiB: number;
  pssKiB: number;
  fds: number;
  threads: number;
  cpuTicks: number;
  fdKinds: Map<string, number>;
}
type Sample = Map<string, ProcSample & { processes: number }>;

async function sh(cmd: string, args: string[], input?: string): Promise<string> {
  if (input === undefined) return (await exec(cmd, args, { maxBuffer: 64 << 20 })).stdout;
  return new Promise((ok, fail) => {
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d));
    child.stderr.on('data', (d: Buffer) => (err += d));
    child.once('close', (code) => (code === 0 ? ok(out) : fail(new Error(`${cmd} ${args.join(' ')}: ${err}`))));
    child.stdin.end(input);
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function pct(values: number[], p: number): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/** Which of ours a process of this node is (by its argv), or the VMM double, or undefined. */
function roleOf(argv: string[], dataDir: string): string | undefined {
  if (!argv.some((a) => a.includes(dataDir))) return undefined;
  if (argv.includes('--api-sock')) return VMM;
  const i = argv.findIndex((a) => a.endsWith('/sbx/src/main.js'));
  const command = i >= 0 ? argv[i + 1] : undefined;
  if (command && argv[i + 2] === 'serve' && (SERVICES as readonly string[]).includes(command)) return command;
  return undefined;
}

async function nodeProcesses(dataDir: string): Promise<{ pid: number; role: string }[]> {
  const out: { pid: number; role: string }[] = [];
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const argv = (await readFile(`/proc/${e}/cmdline`, 'utf8').catch(() => '')).split('\0');
    const role = roleOf(argv, dataDir);
    if (role) out.push({ pid: Number(e), role });
  }
  return out;
}

async function sampleProcess(pid: number): Promise<ProcSample | undefined> {
  try {
    const status = await readFile(`/proc/${pid}/status`, 'utf8');
    const field = (name: string) => Number(new RegExp(`^${name}:\\s+(\\d+)`, 'm').exec(status)?.[1] ?? 0);
    const rollup = await readFile(`/proc/${pid}/smaps_rollup`, 'utf8');
    const pss = Number(/^Pss:\s+(\d+)/m.exec(rollup)?.[1] ?? 0);
    // Fields after the command (which may hold spaces) in /proc/pid/stat: utime is 14th, stime 15th.
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const fdKinds = new Map<string, number>();
    const fds = await readdir(`/proc/${pid}/fd`);
    for (const fd of fds) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => 'gone');
      const kind = target
        .replace(/\[\d+\]$/, '')
        .replace(/\/[^/]*[0-9a-f]{8}[^/]*/g, '/*')
        .replace(/\d+/g, 'N');
      fdKinds.set(kind, (fdKinds.get(kind) ?? 0) + 1);
    }
    return {
      rssKiB: field('VmRSS'),
      pssKiB: pss,
      threads: field('Threads'),
      fds: fds.length,
      cpuTicks: Number(rest[11]) + Number(rest[12]),
      fdKinds,
    };
  } catch {
    return undefined; // gone while sampled
  }
}

async function sampleNode(dataDir: string): Promise<Sample> {
  const sample: Sample = new Map();
  for (const { pid, role } of await nodeProcesses(dataDir)) {
    const s = await sampleProcess(pid);
    if (!s) continue;
    const acc = sample.get(role) ?? {
      rssKiB: 0,
      pssKiB: 0,
      fds: 0,
      threads: 0,
      cpuTicks: 0,
      processes: 0,
      fdKinds: new Map<string, number>(),
    };
    acc.rssKiB += s.rssKiB;
    acc.pssKiB += s.pssKiB;
    acc.fds += s.fds;
    acc.threads += s.threads;
    acc.cpuTicks += s.cpuTicks;
    acc.processes += 1;
    for (const [k, n] of s.fdKinds) acc.fdKinds.set(k, (acc.fdKinds.get(k) ?? 0) + n);
    sample.set(role, acc);
  }
  return sample;
}

/** CPU ticks per pid, for an idle window: a pid that came or went in it is left out. */
async function cpuByPid(dataDir: string): Promise<Map<number, { role: string; ticks: number }>> {
  const out = new Map<number, { role: string; ticks: number }>();
  for (const { pid, role } of await nodeProcesses(dataDir)) {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8').catch(() => undefined);
    if (!stat) continue;
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    out.set(pid, { role, ticks: Number(rest[11]) + Number(rest[12]) });
  }
  return out;
}

async function idleCpu(dataDir: string, seconds: number): Promise<Map<string, number>> {
  const a = await cpuByPid(dataDir);
  const t0 = performance.now();
  await sleep(seconds * 1000);
  const b = await cpuByPid(dataDir);
  const elapsed = (performance.now() - t0) / 1000;
  const byRole = new Map<string, number>();
  for (const [pid, { role, ticks }] of b) {
    const before = a.get(pid);
    if (!before) continue;
    byRole.set(role, (byRole.get(role) ?? 0) + (100 * (ticks - before.ticks)) / TICKS / elapsed);
  }
  return byRole;
}

function config(sandboxId: string): SandboxConfig {
  return {
    templateId: 'base',
    buildId: '',
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId,
    envVars: {},
    metadata: {},
    envdVersion: '',
    vcpu: 1,
    ramMb: 0,
    teamId: 'bench',
    maxSandboxLength: 1,
    totalDiskSizeMb: 0,
    snapshot: false,
    baseTemplateId: 'base',
    executionId: '',
    volumeMounts: [],
    autoPause: false,
  };
}

const mib = (kib: number) => kib / 1024;

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      sandboxes: { type: 'string', default: '100' },
      batch: { type: 'string', default: '10' },
      'memory-mb': { type: 'string', default: '128' },
      creates: { type: 'string', default: '60' },
      'idle-seconds': { type: 'string', default: '30' },
      detail: { type: 'boolean', default: false },
    },
  });
  const count = Number(values.sandboxes);
  const batch = Number(values.batch);
  const creates = Number(values.creates);
  const idleSeconds = Number(values['idle-seconds']);
  if (!(count >= 2 && batch >= 1 && creates >= 1 && idleSeconds > 0))
    throw new Error('--sandboxes ≥ 2, --batch ≥ 1, --creates ≥ 1, --idle-seconds > 0');
  const tag = `dn${process.pid % 100000}`;
  const nodeNs = `${tag}node`;
  const inetNs = `${tag}inet`;
  const slotPrefix = `${tag}s-`;
  const dataDir = await mkdtemp(join(tmpdir(), `${tag}-`));
  console.log(
    `density bench: ./sbx node up (local defaults, VMM double) in netns ${nodeNs}, ${count} sandboxes of ` +
      `${values['memory-mb']} MiB, ${batch} at a time. Load: ${(await sh('uptime', [])).trim()}`,
  );

  // The limits a node needs for this many sandboxes, as an operator sets them (environment;
  // each service also takes them as flags): see bench/density/README.md.
  const limits: Record<string, string> = {
    SBX_ORCHESTRATOR_MAX_STARTING_SANDBOXES: String(batch),
    SBX_ORCHESTRATOR_MAX_SANDBOXES: String(Math.max(512, count + 8)),
    SBX_UFFD_SERVER_MAX_SANDBOXES: String(Math.max(512, count + 8)),
    // uffd-server's default (threads per sandbox) unless asked: with a shared pool of 2 serving
    // threads, create p99 at 100 running was 3-4x that at 1 in two runs (1.01x without the pool).
    SBX_UFFD_SERVER_SERVE_POOL_THREADS: process.env['SBX_UFFD_SERVER_SERVE_POOL_THREADS'] ?? '0',
    SBX_ORCHESTRATOR_SAMPLE_MEMORY_MB: values['memory-mb']!,
  };
  await sh('ip', ['netns', 'add', nodeNs]);
  await sh('ip', ['netns', 'add', inetNs]);
  let node: ServiceProcess | undefined;
  const clients: { close(): void }[] = [];
  let failed = false;
  try {
    await sh(
      'ip',
      ['-n', nodeNs, '-batch', '-'],
      [
        'link set lo up',
        `link add up0 type veth peer name wan0 netns ${inetNs}`,
        'addr add 198.51.100.2/24 dev up0',
        'link set up0 up',
        'route add default via 198.51.100.1',
        '',
      ].join('\n'),
    );
    const t0 = performance.now();
    node = await ServiceProcess.start({
      name: 'node up',
      args: ['node', 'up', '--data-dir', dataDir, '--grpc-port', '5008'],
      wrapper: ['ip', 'netns', 'exec', nodeNs],
      env: {
        ...limits,
        SBX_NET_AGENT_NAMESPACE_PREFIX: slotPrefix,
        SBX_NET_AGENT_UPLINK: 'up0',
        SBX_NET_AGENT_NODE_ID: tag,
      },
      detached: true,
      ready: logLine('serving on 127.0.0.1:5008'),
      readyTimeoutMs: 300_000,
    });
    console.log(`node up in ${((performance.now() - t0) / 1000).toFixed(1)} s (sample template built)`);
    const socket = join(dataDir, 'run', 'orchestrator.sock');
    const client = dial(SandboxServiceClient, socket);
    const admission = dial(AdmissionClient, socket);
    clients.push(client, admission);
    const create = async (id: string) => {
      const t = performance.now();
      await unary(
        client,
        client.create,
        { sandbox: config(id), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
        300_000,
      );
      return performance.now() - t;
    };
    const remove = (id: string) => unary(client, client.delete, { sandboxId: id }, 120_000);
    const poolFull = async () => {
      const deadline = Date.now() + 120_000;
      for (;;) {
        const s = await unary(admission, admission.status, {});
        if (s.vmmPoolWaiting >= s.vmmPoolSize) return;
        if (Date.now() > deadline) throw new Error('the VMM pool did not refill within 120 s');
        await sleep(100);
      }
    };
    /** Sequential creates of a sandbox that is deleted again, each with the pool full (as bench/orchestrator). */
    const timedCreates = async (label: string) => {
      const ms: number[] = [];
      for (let i = 0; i < creates; i++) {
        await poolFull();
        await sleep(200);
        ms.push(await create(`${label}-${i}`));
        await remove(`${label}-${i}`);
      }
      return ms;
    };

    const ids = Array.from({ length: count }, (_, i) => `d${String(i).padStart(3, '0')}`);
    await create(ids[0]!);
    const at1Ms = await timedCreates('one');
    await poolFull();
    await sleep(5000);
    const at1 = await sampleNode(dataDir);
    const idle1 = await idleCpu(dataDir, Math.min(idleSeconds, 15));

    const burstMs: number[] = [];
    const tBurst = performance.now();
    for (let i = 1; i < count; i += batch) {
      const group = ids.slice(i, i + batch);
      burstMs.push(...(await Promise.all(group.map((id) => create(id)))));
    }
    const burstS = (performance.now() - tBurst) / 1000;
    await poolFull();
    await sleep(10_000);
    const atN = await sampleNode(dataDir);
    const idleN = await idleCpu(dataDir, idleSeconds);
    const atNMs = await timedCreates('many');

    // ---- the figures
    const n = count - 1;
    console.log(
      `\ncreated ${count - 1} more in batches of ${batch}: ${burstS.toFixed(1)} s, per create p50 ` +
        `${pct(burstMs, 50).toFixed(0)} ms p99 ${pct(burstMs, 99).toFixed(0)} ms`,
    );
    console.log(`\nper service at 1 and at ${count} running; "per sbx" = (at ${count} − at 1) / ${n}`);
    console.log(
      `${'service'.padEnd(13)} ${'RSS MiB'.padStart(17)} ${'per sbx'.padStart(8)} ${'PSS MiB'.padStart(17)} ` +
        `${'per sbx'.padStart(8)} ${'fds'.padStart(11)} ${'per sbx'.padStart(7)} ${'threads'.padStart(9)} ${'per sbx'.padStart(7)}`,
    );
    const worst = { rss: 0, pss: 0, fds: 0, threads: 0 };
    const worstOf = { rss: '', pss: '', fds: '', threads: '' };
    const note = (k: keyof typeof worst, v: number, role: string) => {
      if (v > worst[k]) {
        worst[k] = v;
        worstOf[k] = role;
      }
    };
    for (const role of [...SERVICES, VMM]) {
      const a = at1.get(role);
      const b = atN.get(role);
      if (!a || !b) {
        console.log(`${role.padEnd(13)} not found (${a ? '' : 'at 1 '}${b ? '' : `at ${count}`})`);
        failed = true;
        continue;
      }
      // The VMM double: one process per sandbox (plus the pool's), so its cost is per process.
      const per = (x: number, y: number) => (role === VMM ? y / b.processes : (y - x) / n);
      const rss = per(mib(a.rssKiB), mib(b.rssKiB));
      const pss = per(mib(a.pssKiB), mib(b.pssKiB));
      const fds = per(a.fds, b.fds);
      const threads = per(a.threads, b.threads);
      if (role !== VMM) {
        note('rss', rss, role);
        note('pss', pss, role);
        note('fds', fds, role);
        note('threads', threads, role);
      }
      if (role === VMM)
        console.log(`-- the VMM double (test tooling; per process = per sandbox, ${b.processes} processes)`);
      console.log(
        `${role.padEnd(13)} ${`${mib(a.rssKiB).toFixed(1)} → ${mib(b.rssKiB).toFixed(1)}`.padStart(17)} ${rss.toFixed(2).padStart(8)} ` +
          `${`${mib(a.pssKiB).toFixed(1)} → ${mib(b.pssKiB).toFixed(1)}`.padStart(17)} ${pss.toFixed(2).padStart(8)} ` +
          `${`${a.fds} → ${b.fds}`.padStart(11)} ${fds.toFixed(2).padStart(7)} ` +
          `${`${a.threads} → ${b.threads}`.padStart(9)} ${threads.toFixed(2).padStart(7)}`,
      );
      if (values.detail) {
        const grew = [...b.fdKinds]
          .map(([k, v]) => [k, v - (a.fdKinds.get(k) ?? 0)] as const)
          .filter(([, d]) => d !== 0)
          .sort((x, y) => y[1] - x[1])
          .slice(0, 6);
        for (const [k, d] of grew) console.log(`    fds ${d > 0 ? '+' : ''}${d} ${k}`);
      }
    }
    const cpuTotal = (m: Map<string, number>) => SERVICES.reduce((s, r) => s + (m.get(r) ?? 0), 0);
    const idleLine = (m: Map<string, number>) =>
      SERVICES.map((r) => `${r} ${(m.get(r) ?? 0).toFixed(2)}`).join(', ') +
      `; VMM double all ${(m.get(VMM) ?? 0).toFixed(1)} %`;
    console.log(
      `\nidle CPU of all services, % of one core: at 1 ${cpuTotal(idle1).toFixed(2)} % (${Math.min(idleSeconds, 15)} s), ` +
        `at ${count} ${cpuTotal(idleN).toFixed(2)} % (${idleSeconds} s)`,
    );
    console.log(`  at ${count}: ${idleLine(idleN)}`);
    console.log(`  at 1: ${idleLine(idle1)}`);
    const p99a = pct(at1Ms, 99);
    const p99b = pct(atNMs, 99);
    console.log(
      `\ncreate (${creates}x, gRPC round trip, pool full): at 1 running p50 ${pct(at1Ms, 50).toFixed(1)} p99 ${p99a.toFixed(1)} ms; ` +
        `at ${count} running p50 ${pct(atNMs, 50).toFixed(1)} p99 ${p99b.toFixed(1)} ms; p99 ratio ${(p99b / p99a).toFixed(2)}`,
    );
    // Which steps grew (the orchestrator's own step timings of the timed creates, from its log).
    const log = await readFile(join(dataDir, 'logs', 'orchestrator.log'), 'utf8').catch(() => '');
    const stepsOf = (label: string) =>
      log
        .split('\n')
        .filter((l) => l.includes('"msg":"sandbox created"') && l.includes(`"sandboxId":"${label}-`))
        .map((l) => (JSON.parse(l) as { steps?: Record<string, number> }).steps ?? {});
    const [s1, sN] = [stepsOf('one'), stepsOf('many')];
    const names = [...new Set([...s1, ...sN].flatMap((s) => Object.keys(s)))];
    const p = (all: Record<string, number>[], name: string, q: number) =>
      pct(
        all.map((s) => s[name] ?? 0),
        q,
      );
    console.log(`  steps (orchestrator's log), p50 / p99 ms at 1 → at ${count}, by growth of p99:`);
    for (const name of names.sort((a, b) => p(sN, b, 99) - p(s1, b, 99) - (p(sN, a, 99) - p(s1, a, 99))))
      console.log(
        `    ${name.padEnd(22)} ${p(s1, name, 50).toFixed(1).padStart(7)} / ${p(s1, name, 99).toFixed(1).padStart(7)} → ` +
          `${p(sN, name, 50).toFixed(1).padStart(7)} / ${p(sN, name, 99).toFixed(1).padStart(7)}`,
      );
    const goal = (ok: boolean) => (ok ? 'met' : 'NOT met');
    // Resident memory is judged both ways: RSS counts a shared page once per process mapping it
    // (what `top` and a cgroup's per-process view show), PSS splits it among the processes.
    const by = (k: keyof typeof worst) => (worstOf[k] ? `, ${worstOf[k]}` : '');
    console.log(
      `\ngoals at ${count}: resident ≤ 2 MiB/sbx/service: by RSS (worst ${worst.rss.toFixed(2)}${by('rss')}) ` +
        `${goal(worst.rss <= 2)}, by PSS (worst ${worst.pss.toFixed(2)}${by('pss')}) ${goal(worst.pss <= 2)}; ` +
        `fds ≤ 8/sbx/service (worst ${worst.fds.toFixed(2)}${by('fds')}) ${goal(worst.fds <= 8)}; ` +
        `idle CPU ≤ 5 % (${cpuTotal(idleN).toFixed(2)}) ${goal(cpuTotal(idleN) <= 5)}; ` +
        `create p99 ratio ≤ 2 (${(p99b / p99a).toFixed(2)}) ${goal(p99b / p99a <= 2)}`,
    );
    console.log(
      `threads per service at ${count}: ` +
        SERVICES.map((r) => `${r} ${atN.get(r)?.threads ?? '?'}`).join(', ') +
        ` (per sbx worst ${worst.threads.toFixed(2)}${by('threads')}; no goal)`,
    );
    console.log(`load after: ${(await sh('uptime', [])).trim()}`);

    // ---- clean up, checked through the node's own status
    for (let i = 0; i < count; i += batch) await Promise.all(ids.slice(i, i + batch).map(remove));
    await poolFull();
    const status = JSON.parse(
      await sh(sbx, ['status', '--json', '--data-dir', dataDir, '--interval-ms', '100']),
    ) as Record<string, number>;
    const vmms = (await nodeProcesses(dataDir)).filter((p) => p.role === VMM).length;
    const left = {
      sandboxes: status['sandboxes'],
      slotsInUse: status['slotsInUse']! - status['vmmPoolSize']!,
      nbdDevices: status['nbdDevices'],
      memorySandboxes: status['memorySandboxes'],
      vmmProcesses: vmms - status['vmmPoolSize']!,
    };
    console.log(`after deleting all (status, the pool's own slots and VMMs subtracted): ${JSON.stringify(left)}`);
    if (Object.values(left).some((v) => v !== 0)) failed = true;
  } catch (err) {
    failed = true;
    console.error(err);
    if (node) console.error(node.logs.slice(-40).join('\n'));
  } finally {
    for (const c of clients) c.close();
    if (node) {
      process.kill(-node.child.pid!, 'SIGINT');
      // An unref'd bound: a pending timer would keep this process alive 2 minutes after the node stopped.
      const bound = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 120_000).unref());
      const code = await Promise.race([node.exited, bound]);
      if (code === 'timeout') {
        await node.kill();
        failed = true;
      }
    }
    const processes = await nodeProcesses(dataDir);
    const namespaces = (await sh('ip', ['netns', 'list'])).split('\n').filter((l) => l.startsWith(slotPrefix));
    console.log(
      `after node stop: ${processes.length} processes of the node, ${namespaces.length} slot namespaces left`,
    );
    if (processes.length || namespaces.length) failed = true;
    for (const { pid } of processes) process.kill(pid, 'SIGKILL');
    for (const ns of (await sh('ip', ['netns', 'list'])).split('\n')) {
      const name = ns.split(' ')[0];
      if (name?.startsWith(tag)) await sh('ip', ['netns', 'del', name]).catch(() => undefined);
    }
    if (failed) {
      // The services' own logs say why; the data directory goes with the rest.
      for (const f of await readdir(join(dataDir, 'logs')).catch(() => [] as string[])) {
        const text = await readFile(join(dataDir, 'logs', f), 'utf8').catch(() => '');
        console.error(`--- ${f} (last lines)\n${text.split('\n').slice(-15).join('\n')}`);
      }
    }
    await rm(dataDir, { recursive: true, force: true });
  }
  return failed ? 1 : 0;
}

main(process.argv.slice(2)).then(
  (code) => (process.exitCode = code),
  (err: unknown) => {
    console.error(err);
    process.exitCode = 1;
  },
);
