/**
 * Egress proxy cost, inside throwaway namespaces (this machine's network is never touched): the
 * real net-agent in a "node" namespace, an "internet" namespace with a Python server, and three
 * guests behind slots: one with no policy (straight through the packet filter), one whose policy
 * allows the server's address while domain rules are on (proxied, dialed to the address without
 * reading the first bytes), one allowed only by name (proxied, HTTP Host read, name resolved).
 * Measured from the guest with a Python client: connect + first answer latency (p50/p99 over
 * --connects connections) and one download of --mib MiB, with the agent's CPU time over the case.
 * Run once per way the agent moves proxied bytes (--variants): `pipe` (Node pipes them on the
 * event loop), `splice` (native tunnel threads, splice(2)), `copy` (tunnel threads, read/write).
 *
 *   bash scripts/build.sh && node dist/bench/net/egress-proxy-bench.js [--connects 300] [--mib 512] [--variants pipe,splice,copy]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';
import { dial, unary } from '#grpc';
import { NetAgentClient, type NetEgressPolicy, type NetSlot } from '#proto/sbx/net';
import { eventually, grpcServing, ServiceProcess } from '#test-kit';

const PREFIX = `nate${process.pid}`;
const NODE = `${PREFIX}node`;
const INET = `${PREFIX}inet`;
const SERVER = '198.18.0.1';

/** 9300: answers each request head with a short reply (latency); 9301: sends argv[1] MiB then closes. */
const SERVER_PY = `
import socket, sys, threading
MIB = int(sys.argv[1])
def head(c):
    got = b""
    while b"\\r\\n\\r\\n" not in got:
        d = c.recv(4096)
        if not d: return False
        got += d
    return True
def short(c):
    with c:
        if head(c): c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
def bulk(c):
    with c:
        if not head(c): return
        block = b"\\0" * (1 << 20)
        for _ in range(MIB): c.sendall(block)
def serve(port, fn):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen(128)
    while True:
        c, _ = s.accept(); threading.Thread(target=fn, args=(c,), daemon=True).start()
threading.Thread(target=serve, args=(9300, short), daemon=True).start()
print("ready", flush=True)
serve(9301, bulk)
`;

/** Prints one JSON line: connect+answer latencies (ms) and the download rate. */
const CLIENT_PY = `
import json, socket, sys, time
host, connects = sys.argv[1], int(sys.argv[2])
head = b"GET / HTTP/1.1\\r\\nHost: bench.test\\r\\n\\r\\n"
lat = []
for _ in range(connects):
    t = time.perf_counter()
    c = socket.create_connection((host, 9300), timeout=10)
    c.sendall(head)
    if not c.recv(64): raise SystemExit("no answer")
    lat.append((time.perf_counter() - t) * 1000)
    c.close()
c = socket.create_connection((host, 9301), timeout=30)
c.sendall(head)
total = 0
t = time.perf_counter()
buf = bytearray(1 << 20)
while True:
    n = c.recv_into(buf)
    if not n: break
    total += n
secs = time.perf_counter() - t
lat.sort()
print(json.dumps({"p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, len(lat) * 99 // 100)],
                  "mib": total / (1 << 20), "mibps": total / (1 << 20) / secs}))
`;

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

const inNs = (ns: string, file: string, args: string[], input = '') =>
  must('nsenter', [`--net=/run/netns/${ns}`, file, ...args], input);

async function tearDown(): Promise<void> {
  const mine = (await readdir('/run/netns').catch(() => [] as string[])).filter((n) => n.startsWith(PREFIX));
  if (mine.length) await run('ip', ['-force', '-batch', '-'], mine.map((n) => `netns del ${n}\n`).join(''));
}

async function setUp(): Promise<void> {
  await must('ip', ['netns', 'add', NODE]);
  await must('ip', ['netns', 'add', INET]);
  await inNs(
    NODE,
    'ip',
    ['-batch', '-'],
    `link add up0 type veth peer name wan0 netns ${INET}\naddr add 198.51.100.2/24 dev up0\nlink set up0 up\nlink set lo up\nroute add default via 198.51.100.1\n`,
  );
  await inNs(
    INET,
    'ip',
    ['-batch', '-'],
    `addr add 198.51.100.1/24 dev wan0\nlink set wan0 up\nlink set lo up\naddr add ${SERVER}/32 dev lo\n`,
  );
}

/** The slot's tap replaced by a veth to a new "guest" namespace (as the tests do, DESIGN §8). */
async function attachGuest(slot: NetSlot, name: string): Promise<string> {
  const guest = `${PREFIX}${name}`;
  await must('ip', ['netns', 'add', guest]);
  await inNs(
    slot.namespace,
    'ip',
    ['-batch', '-'],
    `link del ${slot.tapName}\nlink add ${slot.tapName} type veth peer name eth0 netns ${guest}\naddr add ${slot.tapIp}/${slot.tapPrefix} dev ${slot.tapName}\nlink set ${slot.tapName} up\n`,
  );
  await inNs(
    guest,
    'ip',
    ['-batch', '-'],
    `addr add ${slot.guestIp}/${slot.tapPrefix} dev eth0\nlink set eth0 up\nlink set lo up\nroute add default via ${slot.tapIp}\n`,
  );
  return guest;
}

/** CPU time (user + system, ms) a process has used so far. */
async function cpuMs(pid: number): Promise<number> {
  const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  // utime and stime are fields 14 and 15 of stat(5): 11 and 12 after the ") " cut.
  return ((Number(fields[11]) + Number(fields[12])) * 1000) / 100;
}

const VARIANT_ARGS: Record<string, string[]> = {
  pipe: ['--egress-tunnel-threads', '0'],
  splice: ['--egress-tunnel-threads', '1', '--egress-tunnel-mode', 'splice'],
  copy: ['--egress-tunnel-threads', '1', '--egress-tunnel-mode', 'copy'],
};

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      connects: { type: 'string', default: '300' },
      mib: { type: 'string', default: '512' },
      variants: { type: 'string', default: 'pipe,splice,copy' },
    },
  });
  const connects = Number(values.connects);
  const mib = Number(values.mib);
  const variants = values.variants.split(',');
  for (const v of variants) if (!VARIANT_ARGS[v]) throw new Error(`--variants: unknown ${v} (pipe, splice, copy)`);
  const rows: string[] = [];
  for (const variant of variants) rows.push(...(await measure(variant, connects, mib)));
  const load = loadavg()
    .map((l) => l.toFixed(2))
    .join(' ');
  console.log(`egress proxy bench (${connects} connections, ${mib} MiB download per case; load average ${load})`);
  for (const row of rows) console.log(row);
}

/** One agent moving proxied bytes the variant's way: a row per case. */
async function measure(variant: string, connects: number, mib: number): Promise<string[]> {
  await tearDown();
  await setUp();
  const dir = await mkdtemp(join(tmpdir(), 'egress-bench-'));
  let server: ChildProcess | undefined;
  let agent: ServiceProcess | undefined;
  try {
    await writeFile(join(dir, 'hosts'), `${SERVER} bench.test\n`);
    server = spawn('nsenter', [`--net=/run/netns/${INET}`, 'python3', '-c', SERVER_PY, String(mib)], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    await new Promise<void>((resolve) => createInterface({ input: server!.stdout! }).once('line', () => resolve()));
    const socket = join(dir, 'net.sock');
    agent = await ServiceProcess.start({
      args: [
        'net-agent',
        'serve',
        '--control-socket',
        socket,
        '--metrics-port',
        '0',
        '--namespace-prefix',
        `${PREFIX}s-`,
        '--pool-new-size',
        '4',
        '--log-level',
        'warn',
        '--egress-hosts-file',
        join(dir, 'hosts'),
        '--egress-state-dir',
        join(dir, 'state'),
        ...VARIANT_ARGS[variant]!,
      ],
      wrapper: ['nsenter', `--net=/run/netns/${NODE}`],
      ready: grpcServing(socket),
      stopTimeoutMs: 60_000,
    });
    const client = dial(NetAgentClient, socket);
    const none: NetEgressPolicy = { denyInternet: false, allowedCidrs: [], deniedCidrs: [], allowedDomains: [] };
    const cases: Array<[string, NetEgressPolicy | undefined]> = [
      ['direct (no policy, packet filter only)', undefined],
      [
        'proxied, allowed by address',
        { ...none, denyInternet: true, allowedCidrs: [SERVER], allowedDomains: ['bench.test'] },
      ],
      ['proxied, allowed by name (Host read)', { ...none, denyInternet: true, allowedDomains: ['bench.test'] }],
    ];
    const rows: string[] = [];
    let i = 0;
    for (const [label, egress] of cases) {
      const slot = await unary(client, client.acquire, { sandboxId: `bench-${i}`, egress }, 20_000);
      const guest = await attachGuest(slot, `g${i++}`);
      await eventually(async () => {
        await inNs(guest, 'python3', ['-c', CLIENT_PY, SERVER, '1']);
      });
      const cpuBefore = await cpuMs(agent.pid);
      const r = JSON.parse((await inNs(guest, 'python3', ['-c', CLIENT_PY, SERVER, String(connects)])).trim()) as {
        p50: number;
        p99: number;
        mibps: number;
      };
      const cpu = (await cpuMs(agent.pid)) - cpuBefore;
      rows.push(
        `  ${variant.padEnd(7)} ${label.padEnd(40)} connect+answer p50 ${r.p50.toFixed(2)} ms  p99 ${r.p99.toFixed(2)} ms   download ${r.mibps.toFixed(0)} MiB/s   agent CPU ${cpu.toFixed(0)} ms`,
      );
    }
    client.close();
    return rows;
  } finally {
    await agent?.stop();
    server?.kill('SIGKILL');
    await tearDown();
    await rm(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
