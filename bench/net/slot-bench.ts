/**
 * Network slot benchmark, inside throwaway namespaces (this machine's network is never touched):
 * slot creation time, ours (SlotNetwork: batched ip/nft, namespaces configured in parallel)
 * against the naive sequence E2B runs (one process per ip/iptables step, network_linux.go and
 * blocking_rules.go), same run, ratio printed; then Acquire latency from a ready pool, in process
 * and over the agent's control socket.
 *
 *   bash scripts/build.sh && node dist/bench/net/slot-bench.js [--slots 100] [--batch 50] [--acquires 2000]
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { createLogger } from '#logging';
import { dial, unary } from '#grpc';
import { NetAgentClient } from '#proto/sbx/net';
import { eventually, grpcServing, ServiceProcess } from '#test-kit';
import { MemorySlotReservation } from '../../apps/net-agent/src/memory-slot-reservation.js';
import { netAgentConfigSchema } from '../../apps/net-agent/src/net-agent-config.js';
import { SlotLayout, type SlotSpec } from '../../apps/net-agent/src/slot-layout.js';
import { SlotNetwork } from '../../apps/net-agent/src/slot-network.js';
import { SlotPool } from '../../apps/net-agent/src/slot-pool.js';

/** How long a pool of 32 may take to fill on a loaded machine, polled often: the wait is not measured. */
const POOL_FULL = { timeoutMs: 120_000, intervalMs: 20 };
const PREFIX = `natb${process.pid}`;
const NODE = `${PREFIX}node`;
const INET = `${PREFIX}inet`;

interface Options {
  slots: number;
  batch: number;
  acquires: number;
}

function run(
  file: string,
  args: string[],
  input = '',
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout, stderr }));
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

async function must(file: string, args: string[], input = ''): Promise<string> {
  const r = await run(file, args, input);
  if (r.code !== 0) throw new Error(`${file} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

function percentile(sorted: number[], p: number): number {
  return sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? NaN;
}

/** The naive sequence: every step its own process, the way go-iptables and one netlink call per step behave. */
function naiveScript(slots: SlotSpec[], uplink: string): { create: string; remove: string } {
  const create: string[] = ['set -e'];
  const remove: string[] = [];
  for (const s of slots) {
    const ns = s.namespace;
    const inNs = `nsenter --net=/run/netns/${ns}`;
    create.push(
      `ip netns add ${ns}`,
      `ip link add ${s.hostVeth} type veth peer name ${s.nsVeth} netns ${ns}`,
      `${inNs} ip link set ${s.nsVeth} up`,
      `${inNs} ip addr add ${s.nsVethIp}/31 dev ${s.nsVeth}`,
      `ip link set ${s.hostVeth} up`,
      `ip addr add ${s.hostVethIp}/31 dev ${s.hostVeth}`,
      `${inNs} ip tuntap add dev ${s.tapName} mode tap`,
      `${inNs} ip link set ${s.tapName} up`,
      `${inNs} ip addr add ${s.tapIp}/${s.tapPrefix} dev ${s.tapName}`,
      `${inNs} ip link set lo up`,
      `${inNs} ip route add default via ${s.hostVethIp}`,
      `${inNs} iptables -t nat -A POSTROUTING -o ${s.nsVeth} -s ${s.guestIp} -j SNAT --to ${s.hostIp}`,
      `${inNs} iptables -t nat -A PREROUTING -i ${s.nsVeth} -d ${s.hostIp} -j DNAT --to ${s.guestIp}`,
      ...['10.0.0.0/8', '169.254.0.0/16', '192.168.0.0/16', '172.16.0.0/12'].map(
        (r) => `${inNs} iptables -A FORWARD -p all -i ${s.tapName} -d ${r} -j DROP`,
      ),
      `${inNs} iptables -I FORWARD 1 -p tcp -i ${s.tapName} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT`,
      `ip route add ${s.hostIp}/32 via ${s.nsVethIp}`,
      `iptables -A FORWARD -i ${s.hostVeth} -o ${uplink} -j ACCEPT`,
      `iptables -A FORWARD -i ${uplink} -o ${s.hostVeth} -j ACCEPT`,
      `iptables -t nat -A POSTROUTING -s ${s.hostIp}/32 -o ${uplink} -j MASQUERADE`,
    );
    remove.push(
      `iptables -D FORWARD -i ${s.hostVeth} -o ${uplink} -j ACCEPT`,
      `iptables -D FORWARD -i ${uplink} -o ${s.hostVeth} -j ACCEPT`,
      `iptables -t nat -D POSTROUTING -s ${s.hostIp}/32 -o ${uplink} -j MASQUERADE`,
      `ip route del ${s.hostIp}/32 via ${s.nsVethIp}`,
      `ip link del ${s.hostVeth}`,
      `ip netns del ${ns}`,
    );
  }
  return { create: create.join('\n') + '\n', remove: remove.join('\n') + '\n' };
}

async function setUpNode(): Promise<void> {
  await must('ip', ['netns', 'add', NODE]);
  await must('ip', ['netns', 'add', INET]);
  await must(
    'nsenter',
    [`--net=/run/netns/${NODE}`, 'ip', '-batch', '-'],
    `link add up0 type veth peer name wan0 netns ${INET}\naddr add 198.51.100.2/24 dev up0\nlink set up0 up\nlink set lo up\nroute add default via 198.51.100.1\n`,
  );
  await must(
    'nsenter',
    [`--net=/run/netns/${INET}`, 'ip', '-batch', '-'],
    'addr add 198.51.100.1/24 dev wan0\nlink set wan0 up\n',
  );
}

async function tearDown(): Promise<void> {
  const mine = (await readdir('/run/netns').catch(() => [] as string[])).filter((n) => n.startsWith(PREFIX));
  if (mine.length) await run('ip', ['-force', '-batch', '-'], mine.map((n) => `netns del ${n}\n`).join(''));
}

/** Runs inside the node namespace (started with nsenter by the outer process). */
async function inner(opts: Options): Promise<void> {
  const logger = createLogger({ service: 'net-bench', level: 'warn' });
  const config = netAgentConfigSchema.parse({ namespacePrefix: `${PREFIX}o-`, uplink: 'up0' });
  const layout = new SlotLayout(config);
  const network = new SlotNetwork({
    layout,
    rules: {
      slotTable: config.slotTable,
      blockedRanges: config.blockedRanges,
      metadataAddress: config.metadataAddress,
    },
    hostTable: config.hostTable,
    uplink: 'up0',
    removalGroup: config.removalGroup,
    namespaceSetup: config.namespaceSetup,
    nftMode: config.nftMode,
    logger,
  });
  await network.init([], true);
  const result: Record<string, number> = {};

  // Ours: batches of `batch` slots, two batches in flight (what the pool's refill does).
  const specs = Array.from({ length: opts.slots }, (_, i) => layout.slot(i + 1));
  const batches: SlotSpec[][] = [];
  for (let i = 0; i < specs.length; i += opts.batch) batches.push(specs.slice(i, i + opts.batch));
  let t = performance.now();
  await Promise.all(batches.map((b) => network.createMany(b)));
  result['oursCreateMs'] = performance.now() - t;
  t = performance.now();
  await network.removeMany(specs);
  result['oursRemoveMs'] = performance.now() - t;

  // One slot alone: latency, not throughput.
  const single: number[] = [];
  for (let i = 0; i < 5; i++) {
    t = performance.now();
    await network.createMany([layout.slot(1000 + i)]);
    single.push(performance.now() - t);
  }
  await network.removeMany(Array.from({ length: 5 }, (_, i) => layout.slot(1000 + i)));
  result['oursSingleMs'] = single.sort((a, b) => a - b)[2]!;

  // Acquire from a ready pool, in process.
  const pool = new SlotPool({
    network,
    reservation: new MemorySlotReservation(layout.first, config.slotCount),
    layout,
    newSize: 32,
    reusedSize: 32,
    batch: 32,
    backoffMinMs: 100,
    backoffMaxMs: 1000,
    acquireTimeoutMs: 5000,
    logger,
  });
  pool.start();
  await eventually(() => pool.stats().readyNew >= 32, POOL_FULL);
  const lat: number[] = [];
  for (let i = 0; i < opts.acquires; i++) {
    const t0 = performance.now();
    const slot = await pool.acquire(`bench-${i}`);
    lat.push(performance.now() - t0);
    await pool.release(slot.spec.idx, `bench-${i}`, true);
  }
  lat.sort((a, b) => a - b);
  result['acquireP50Ms'] = percentile(lat, 50);
  result['acquireP99Ms'] = percentile(lat, 99);
  await pool.shutdown();
  await network.removeHostTable();
  network.close();
  process.stdout.write(JSON.stringify(result) + '\n');
}

async function outer(opts: Options): Promise<void> {
  await tearDown();
  await setUpNode();
  const dir = await mkdtemp(join(tmpdir(), 'net-bench-'));
  try {
    const config = netAgentConfigSchema.parse({ namespacePrefix: `${PREFIX}n-`, uplink: 'up0' });
    const layout = new SlotLayout(config);
    const specs = Array.from({ length: opts.slots }, (_, i) => layout.slot(i + 1));
    const naive = naiveScript(specs, 'up0');
    let t = performance.now();
    await must('nsenter', [`--net=/run/netns/${NODE}`, 'bash', '-s'], naive.create);
    const naiveCreateMs = performance.now() - t;
    t = performance.now();
    await must('nsenter', [`--net=/run/netns/${NODE}`, 'bash', '-s'], naive.remove);
    const naiveRemoveMs = performance.now() - t;
    // Naive leaves iptables chains' policies only; the namespace goes away at tearDown.

    const innerOut = await must('nsenter', [
      `--net=/run/netns/${NODE}`,
      process.execPath,
      '--enable-source-maps',
      fileURLToPath(import.meta.url),
      '--inner',
      '--slots',
      String(opts.slots),
      '--batch',
      String(opts.batch),
      '--acquires',
      String(opts.acquires),
    ]);
    const ours = JSON.parse(innerOut.trim().split('\n').pop()!) as Record<string, number>;

    // Acquire over the control socket: the real agent process in the node namespace.
    const socket = join(dir, 'net.sock');
    const agent = await ServiceProcess.start({
      args: [
        'net-agent',
        'serve',
        '--control-socket',
        socket,
        '--metrics-port',
        '0',
        '--namespace-prefix',
        `${PREFIX}a-`,
        '--pool-new-size',
        '32',
        '--log-level',
        'warn',
      ],
      wrapper: ['nsenter', `--net=/run/netns/${NODE}`],
      ready: grpcServing(socket),
      stopTimeoutMs: 60_000,
    });
    const rpc: number[] = [];
    const baseline: number[] = [];
    try {
      const client = dial(NetAgentClient, socket);
      await eventually(async () => (await unary(client, client.stats, {})).readyNew >= 32, POOL_FULL);
      for (let i = 0; i < opts.acquires; i++) {
        const t0 = performance.now();
        const slot = await unary(client, client.acquire, { sandboxId: `rpc-${i}` });
        rpc.push(performance.now() - t0);
        await unary(client, client.release, { idx: slot.idx, sandboxId: `rpc-${i}`, reuse: true });
        // The same round trip doing no work: what the socket and scheduling cost by themselves.
        const t1 = performance.now();
        await unary(client, client.stats, {});
        baseline.push(performance.now() - t1);
      }
      client.close();
    } finally {
      await agent.stop();
    }
    rpc.sort((a, b) => a - b);
    baseline.sort((a, b) => a - b);

    const n = opts.slots;
    const naivePer = naiveCreateMs / n;
    const oursPer = ours['oursCreateMs']! / n;
    const f = (x: number) => x.toFixed(2);
    console.log(`net slot bench (${n} slots, batch ${opts.batch}; machine shared and loaded, see report)`);
    console.log(`  create  naive E2B sequence: ${f(naivePer)} ms/slot (${f(naiveCreateMs)} ms total)`);
    console.log(`  create  ours:               ${f(oursPer)} ms/slot (${f(ours['oursCreateMs']!)} ms total)`);
    console.log(`  create  ratio naive/ours:   ${f(naivePer / oursPer)}x   (goal ≤10 ms/slot)`);
    console.log(`  create  ours, one slot alone: ${f(ours['oursSingleMs']!)} ms (latency, median of 5)`);
    console.log(
      `  remove  naive: ${f(naiveRemoveMs / n)} ms/slot   ours: ${f(ours['oursRemoveMs']! / n)} ms/slot   ratio ${f(naiveRemoveMs / ours['oursRemoveMs']!)}x`,
    );
    console.log(
      `  acquire in process  (${opts.acquires}): p50 ${f(ours['acquireP50Ms']!)} ms  p99 ${f(ours['acquireP99Ms']!)} ms`,
    );
    console.log(
      `  acquire over socket (${opts.acquires}): p50 ${f(percentile(rpc, 50))} ms  p99 ${f(percentile(rpc, 99))} ms   (goal p99 ≤1 ms)`,
    );
    console.log(
      `  empty Stats RPC, same socket:  p50 ${f(percentile(baseline, 50))} ms  p99 ${f(percentile(baseline, 99))} ms   (the gRPC round trip alone)`,
    );
  } finally {
    await tearDown();
    await rm(dir, { recursive: true, force: true });
  }
}

const { values } = parseArgs({
  options: {
    inner: { type: 'boolean', default: false },
    slots: { type: 'string', default: '100' },
    batch: { type: 'string', default: '50' },
    acquires: { type: 'string', default: '2000' },
  },
});
const opts: Options = { slots: Number(values.slots), batch: Number(values.batch), acquires: Number(values.acquires) };
(values.inner ? inner(opts) : outer(opts)).catch((err: unknown) => {
  console.error(err);
  process.exit(1);
});
