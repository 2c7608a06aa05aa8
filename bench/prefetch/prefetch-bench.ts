/**
 * Recorded prefetch (issue 15): faults and time to envd ready of a resume without a recorded set
 * (the first resume of a build) and with one (the next resume: the set the first recorded, stored
 * with the build it paused into, copied in by the uffd-server's prefetch pass), on one node with
 * the real services and the vmm-sim VMM double. The double's /init reads a working set (env
 * SBX_SIM_START_READ) before it answers, as a guest's processes fault theirs in while it starts.
 *
 * Each round: pause into build A and remove A's memfile.prefetch (a build never resumed, or one
 * from before the feature), resume A (first: every page of the start is a fault), pause into B
 * (B gets the set recorded during that start), resume B (second). The same guest, the same start.
 *
 *   bash bench/prefetch/run.sh [--size-mib 1024] [--touch-mib 100] [--rounds 3]
 */
import { rm } from 'node:fs/promises';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { dial, unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import { UffdServerClient, type UffdSandboxStats } from '#proto/sbx/uffd';
import { PREFETCH_FILE } from '#storage';
import { NodeUnderTest } from '../../apps/orchestrator/test/node-under-test.js';

const RANGE = 64 * 1024;

function config(id: string, buildId: string, startRead: string): SandboxConfig {
  return {
    templateId: 'base',
    buildId,
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId: id,
    envVars: { SBX_SIM_START_READ: startRead },
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

/**
 * The working set: `touchMib` in 64 KiB ranges spread over guest memory in a fixed pseudo-random
 * order (a start reads code and data all over memory, not one run).
 */
function workingSet(sizeMib: number, touchMib: number): string {
  const slots = (sizeMib * 1024 * 1024) / RANGE;
  const count = Math.min(slots, Math.round((touchMib * 1024 * 1024) / RANGE));
  const picked = new Set<number>();
  let x = 0x9e3779b9;
  while (picked.size < count) {
    x = (Math.imul(x ^ (x >>> 15), 0x2c1b3c6d) + 0x6b43a9b5) >>> 0;
    picked.add(x % slots);
  }
  return [...picked].map((s) => `${s * RANGE}:${RANGE}`).join(',');
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
}

interface Resume {
  ms: number;
  /** The orchestrator's own 'init envd' step: from resume until /init answered (the start's reads). */
  initEnvdMs: number;
  /** Every step of the orchestrator's create, for where the rest of the time goes. */
  steps: Record<string, number>;
  faults: number;
  startFaults: number;
  passPages: number;
  setBlocks: number;
}

/** Steps of the orchestrator's 'sandbox created' line for a start from `buildId` (logs come through a pipe: waits). */
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

export async function main(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      'size-mib': { type: 'string', default: '1024' },
      'touch-mib': { type: 'string', default: '100' },
      rounds: { type: 'string', default: '3' },
      'window-kib': { type: 'string' },
    },
  });
  // The uffd-server's fault window (--prefetch-bytes, default 2 MiB), through its environment.
  if (values['window-kib'] !== undefined)
    process.env['SBX_UFFD_SERVER_PREFETCH_BYTES'] = String(Number(values['window-kib']) * 1024);
  const window = values['window-kib'] !== undefined ? `${values['window-kib']} KiB` : '2 MiB, its default';
  const sizeMib = Number(values['size-mib']);
  const touchMib = Number(values['touch-mib']);
  const rounds = Number(values.rounds);
  const startRead = workingSet(sizeMib, touchMib);
  console.log(
    `prefetch bench: real dns, net-agent, block-server, uffd-server; VMM = vmm-sim double; ${sizeMib} MiB guest, ` +
      `its start reads ${touchMib} MiB in 64 KiB ranges spread over memory (uffd-server fault window ${window}).`,
  );
  console.log('Note: the machine is shared (2 cores, other engineers building and testing): numbers are noisy.');
  // A start reading 100 MiB through faults takes seconds on a loaded machine: envd is given time.
  const node = await NodeUnderTest.start({
    tag: 'bpf',
    sampleMemoryMb: sizeMib,
    sampleRootfsMb: 64,
    envdTimeoutMs: 120_000,
  });
  const uffd = dial(UffdServerClient, node.sockets.uffd);
  try {
    const client = node.client;
    const id = 'pf';
    const create = async (buildId: string): Promise<Resume> => {
      const t0 = performance.now();
      await unary(
        client,
        client.create,
        { sandbox: config(id, buildId, startRead), startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
        300_000,
      );
      const ms = performance.now() - t0;
      const steps = buildId ? await stepsOf(node, buildId) : {};
      const st: UffdSandboxStats = await unary(uffd, uffd.stopRecording, { sandboxId: id });
      return {
        ms,
        initEnvdMs: steps['init envd'] ?? NaN,
        steps,
        faults: st.faults,
        startFaults: st.startFaults,
        passPages: st.recordedPrefetchPages,
        setBlocks: st.prefetchSetBlocks,
      };
    };
    const pause = async (): Promise<string> => {
      const buildId = crypto.randomUUID();
      await unary(client, client.pause, { sandboxId: id, templateId: 'base', buildId }, 300_000);
      return buildId;
    };
    await create('');
    const first: Resume[] = [];
    const second: Resume[] = [];
    const mib = (pages: number) => ((pages * 4096) / 2 ** 20).toFixed(1);
    const describe = (r: Resume) =>
      `${r.ms.toFixed(0)} ms (init envd ${r.initEnvdMs.toFixed(0)} ms), ${r.faults} faults, prefetched ${mib(r.passPages)} MiB`;
    for (let i = 0; i < rounds; i++) {
      const a = await pause();
      await rm(join(node.cacheDir, 'builds', a, PREFETCH_FILE), { force: true });
      const f = await create(a);
      first.push(f);
      const b = await pause();
      const s = await create(b);
      second.push(s);
      console.log(`  round ${i + 1}: first ${describe(f)} | second ${describe(s)}, set ${s.setBlocks} blocks`);
    }
    await unary(client, client.delete, { sandboxId: id }, 60_000);
    const med = (rs: Resume[], f: (r: Resume) => number) => median(rs.map(f));
    console.log(`\n== resume to envd ready (Create with snapshot, call to return), medians of ${rounds} ==`);
    console.log(
      `${'resume'.padEnd(34)}${'envd ready'.padStart(11)}${'init envd'.padStart(11)}${'faults'.padStart(8)}${'prefetched'.padStart(13)}`,
    );
    for (const [name, rs] of [
      ['first (no recorded set)', first],
      ['second (recorded set copied in)', second],
    ] as const)
      console.log(
        `${name.padEnd(34)}${`${med(rs, (r) => r.ms).toFixed(0)} ms`.padStart(11)}${`${med(rs, (r) => r.initEnvdMs).toFixed(0)} ms`.padStart(11)}` +
          `${med(rs, (r) => r.faults)
            .toFixed(0)
            .padStart(8)}${`${mib(med(rs, (r) => r.passPages))} MiB`.padStart(13)}`,
      );
    const ratio = (f: (r: Resume) => number) => med(first, f) / Math.max(1e-9, med(second, f));
    console.log(
      `second vs first: envd ready ${ratio((r) => r.ms).toFixed(2)}x, init envd ${ratio((r) => r.initEnvdMs).toFixed(2)}x faster; ` +
        `faults ${med(first, (r) => r.faults)} → ${med(second, (r) => r.faults)}`,
    );
    console.log('orchestrator steps (medians, ms), first → second:');
    const names = [...new Set([...first, ...second].flatMap((r) => Object.keys(r.steps)))];
    for (const n of names)
      console.log(
        `    ${n.padEnd(22)} ${med(first, (r) => r.steps[n] ?? 0)
          .toFixed(1)
          .padStart(8)} → ${med(second, (r) => r.steps[n] ?? 0)
          .toFixed(1)
          .padStart(8)}`,
      );
  } finally {
    uffd.close();
    await node.stop();
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
