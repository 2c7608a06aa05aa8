/**
 * The whole node for end-to-end tests: dns, net-agent, block-server, uffd-server and the
 * orchestrator as real processes (`./sbx <service> serve`), all inside a throwaway "node"
 * network namespace this test creates (nsenter --net, so `ip netns add` still registers in
 * the host's /run/netns), with a dummy uplink. Every name starts with a unique prefix; the
 * test drives the orchestrator only through its gRPC API on its control socket, and reaches
 * guests (the vmm-sim double's envd and test endpoints) at their host IPs inside the node.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { dial, unary } from '#grpc';
import { SandboxServiceClient } from '#proto/orchestrator';
import { BlockServerClient } from '#proto/sbx/block';
import { DnsClient } from '#proto/sbx/dns';
import { NetAgentClient } from '#proto/sbx/net';
import { UffdServerClient } from '#proto/sbx/uffd';
import { grpcServing, repoRoot, ServiceProcess } from '#test-kit';

export interface Output {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function run(file: string, args: string[], input = ''): Promise<Output> {
  return runRaw(file, args, input).then((o) => ({ ...o, stdout: o.stdout.toString('utf8') }));
}

/** Like run, with stdout kept as bytes (guest memory and disk reads are binary). */
export function runRaw(
  file: string,
  args: string[],
  input = '',
): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    child.once('error', reject);
    child.once('close', (code) => resolve({ code, stdout: Buffer.concat(out), stderr }));
    child.stdin.on('error', () => undefined);
    child.stdin.end(input);
  });
}

async function mustRun(file: string, args: string[], input = ''): Promise<string> {
  const out = await run(file, args, input);
  if (out.code !== 0) throw new Error(`${file} ${args.join(' ')} failed (${out.code}): ${out.stderr}`);
  return out.stdout;
}

/** What is missing for the end-to-end suite, or undefined when everything is built. */
export function missingPieces(): string | undefined {
  const missing: string[] = [];
  for (const m of [
    'apps/orchestrator/src/main',
    'apps/uffd-server/src/main',
    'apps/block-server/src/main',
    'apps/net-agent/src/main',
    'apps/dns/src/main',
    'tools/vmm-sim/src/main',
  ]) {
    if (!existsSync(join(repoRoot, 'dist', `${m}.js`))) missing.push(`dist/${m}.js (run npm run build)`);
  }
  if (process.getuid?.() !== 0) missing.push('root (network namespaces)');
  return missing.length ? missing.join(', ') : undefined;
}

export interface NodeOptions {
  tag: string;
  generationCap?: number;
  redisUrl?: string;
  envdTimeoutMs?: number;
  pauseParallelism?: number;
  sampleMemoryMb?: number;
  sampleRootfsMb?: number;
  /** uffd-server / block-server instances (default one each): services `uffd-server`, `uffd-server#1`, … */
  uffdInstances?: number;
  blockInstances?: number;
  /**
   * The bucket of the node's services, set up once the node's namespace exists (a gs:// bucket
   * behind a fault-injecting proxy that listens inside it); default a local directory.
   */
  storage?: (node: NodeUnderTest) => Promise<{ bucket: string; env: Record<string, string> }>;
  /** Run in this existing namespace (a machine several nodes share) instead of one of its own. */
  machineNs?: string;
  /** DNS listen address (default 127.0.0.4:53): nodes sharing a machine need one each. */
  dnsListen?: string;
  /** More net-agent flags, after the defaults (Consul reservation, slot range, names of a shared machine). */
  netAgentArgs?: string[];
  /**
   * Where snapfiles record the rootfs (`--vm-rootfs-dir`): nodes that resume each other's
   * snapshots must use the same path, as every node of a cluster does (default /run/sbx/fc-rootfs).
   */
  vmRootfsDir?: string;
  /** VMMs started ahead (default 0: the suites that count processes and slots see only sandboxes'). */
  vmmPoolSize?: number;
  /**
   * Sandboxes starting at once (default 64: suites create many in parallel; the admission limit
   * itself, default 3, has its own tests).
   */
  maxStartingSandboxes?: number;
}

export class NodeUnderTest {
  readonly root: string;
  readonly nodeNs: string;
  readonly slotPrefix: string;
  readonly sockets: { orchestrator: string; dns: string; net: string; block: string; uffd: string };
  /** Every instance's control socket; the first is `sockets.uffd` / `sockets.block`. */
  readonly uffdSockets: string[];
  readonly blockSockets: string[];
  /** By the harness's name (`uffd-server#1` for a second instance); a stopped one stays until started again. */
  readonly services = new Map<string, ServiceProcess>();
  client!: SandboxServiceClient;

  private constructor(
    readonly prefix: string,
    readonly options: NodeOptions,
  ) {
    this.root = `/tmp/${prefix}`;
    this.nodeNs = options.machineNs ?? `${prefix}node`;
    this.slotPrefix = `${prefix}s-`;
    const r = join(this.root, 'r');
    this.sockets = {
      orchestrator: join(r, 'o.sock'),
      dns: join(r, 'dns.sock'),
      net: join(r, 'net.sock'),
      block: join(r, 'block.sock'),
      uffd: join(r, 'uffd.sock'),
    };
    const more = (n: number | undefined, first: string, base: string) => [
      first,
      ...Array.from({ length: Math.max(0, (n ?? 1) - 1) }, (_, i) => join(r, `${base}${i + 1}.sock`)),
    ];
    this.uffdSockets = more(options.uffdInstances, this.sockets.uffd, 'uffd');
    this.blockSockets = more(options.blockInstances, this.sockets.block, 'block');
  }

  /** The harness's name for instance `i` of a service (the first keeps the plain name). */
  static instanceName(service: 'uffd-server' | 'block-server', i: number): string {
    return i === 0 ? service : `${service}#${i}`;
  }

  get dataDir(): string {
    return join(this.root, 'orch');
  }
  private storageSetUp: { bucket: string; env: Record<string, string> } | undefined;

  get bucket(): string {
    return this.storageSetUp?.bucket ?? join(this.root, 'bucket');
  }
  get cacheDir(): string {
    return join(this.root, 'cache');
  }
  get vmRootfsDir(): string {
    return this.options.vmRootfsDir ?? `/run/${this.prefix}fc`;
  }

  static async start(options: NodeOptions): Promise<NodeUnderTest> {
    const node = new NodeUnderTest(`oe${process.pid % 100000}${options.tag}`, options);
    try {
      await node.setUp();
    } catch (err) {
      const logs = [...node.services.values()].map((s) => `--- ${s.name}\n${s.logs.slice(-30).join('\n')}`).join('\n');
      await node.stop();
      throw new Error(`${(err as Error).message}\n${logs}`, { cause: err });
    }
    return node;
  }

  private async setUp(): Promise<void> {
    await this.cleanupNamespaces();
    await rm(this.root, { recursive: true, force: true });
    await mkdir(join(this.root, 'r'), { recursive: true });
    if (!this.options.machineNs) await this.createNodeNamespace();
    this.storageSetUp = await this.options.storage?.(this);
    await this.setUpServices();
  }

  private async createNodeNamespace(): Promise<void> {
    await mustRun('ip', ['netns', 'add', this.nodeNs]);
    await mustRun('ip', ['netns', 'add', `${this.prefix}inet`]);
    // The uplink: a veth whose peer sits in an "internet" namespace this test also owns.
    await this.inNode(
      'ip',
      ['-batch', '-'],
      [
        'link set lo up',
        `link add up0 type veth peer name wan0 netns ${this.prefix}inet`,
        'addr add 198.51.100.2/24 dev up0',
        'link set up0 up',
        'route add default via 198.51.100.1',
        '',
      ].join('\n'),
    );
  }

  private async setUpServices(): Promise<void> {
    const storage = { SBX_BUCKET: this.bucket, SBX_CACHE_DIR: this.cacheDir, ...this.storageSetUp?.env };
    await Promise.all([
      this.spawnService(
        'dns',
        [
          'serve',
          '--listen',
          this.options.dnsListen ?? '127.0.0.4:53',
          '--control-socket',
          this.sockets.dns,
          '--metrics-port',
          '0',
        ],
        this.sockets.dns,
      ),
      this.spawnService(
        'net-agent',
        [
          'serve',
          '--control-socket',
          this.sockets.net,
          '--metrics-port',
          '0',
          '--namespace-prefix',
          this.slotPrefix,
          '--node-id',
          this.prefix,
          '--uplink',
          'up0',
          '--reservation',
          'memory',
          '--pool-new-size',
          '4',
          '--pool-reused-size',
          '8',
          ...(this.options.netAgentArgs ?? []),
        ],
        this.sockets.net,
      ),
      ...this.blockSockets.map((socket, i) =>
        this.spawnService(
          NodeUnderTest.instanceName('block-server', i),
          [
            'serve',
            '--control-socket',
            socket,
            '--data-dir',
            join(this.root, i === 0 ? 'block' : `block${i}`),
            '--bucket',
            this.bucket,
            '--metrics-port',
            '0',
            '--kernel-attach',
            'off',
          ],
          socket,
          storage,
        ),
      ),
      ...this.uffdSockets.map((socket, i) =>
        this.spawnService(
          NodeUnderTest.instanceName('uffd-server', i),
          [
            'serve',
            '--control-socket',
            socket,
            '--bucket',
            this.bucket,
            '--cache-dir',
            this.cacheDir,
            '--metrics-port',
            '0',
          ],
          socket,
          storage,
        ),
      ),
    ]);
    await this.startOrchestrator();
  }

  orchestratorArgs(): string[] {
    const o = this.options;
    return [
      'serve',
      '--grpc-host',
      '127.0.0.1',
      '--grpc-port',
      '0',
      '--control-socket',
      this.sockets.orchestrator,
      '--data-dir',
      this.dataDir,
      '--bucket',
      this.bucket,
      '--cache-dir',
      this.cacheDir,
      ...this.uffdSockets.flatMap((socket) => ['--uffd-server-sockets', socket]),
      ...this.blockSockets.flatMap((socket) => ['--block-server-sockets', socket]),
      '--net-agent-socket',
      this.sockets.net,
      '--dns-socket',
      this.sockets.dns,
      '--vm-rootfs-dir',
      this.vmRootfsDir,
      '--metrics-port',
      '0',
      '--health-interval-ms',
      '2000',
      '--generation-cap',
      String(o.generationCap ?? 10),
      '--envd-timeout-ms',
      String(o.envdTimeoutMs ?? 10_000),
      '--pause-parallelism',
      String(o.pauseParallelism ?? 8),
      '--shutdown-sandboxes',
      'kill',
      '--sample-rootfs-mb',
      String(o.sampleRootfsMb ?? 8),
      '--sample-memory-mb',
      String(o.sampleMemoryMb ?? 16),
      '--vmm-pool-size',
      String(o.vmmPoolSize ?? 0),
      '--max-starting-sandboxes',
      String(o.maxStartingSandboxes ?? 64),
      ...(o.redisUrl ? ['--redis-url', o.redisUrl] : []),
    ];
  }

  async startOrchestrator(): Promise<void> {
    this.client?.close();
    const env = this.storageSetUp?.env ?? {};
    await this.spawnService('orchestrator', this.orchestratorArgs(), this.sockets.orchestrator, env, 90_000);
    this.client = dial(SandboxServiceClient, this.sockets.orchestrator);
  }

  /** SIGKILL: the orchestrator dies with sandboxes running, as in a crash. */
  async killOrchestrator(): Promise<void> {
    await this.services.get('orchestrator')?.kill();
    this.services.delete('orchestrator');
  }

  /**
   * Stops one service with `signal` (as Nomad would, or a crash with SIGKILL) and, unless
   * `startAgain` is false, starts it again with the same arguments; resolves once it serves.
   */
  async restartService(name: string, signal: 'SIGTERM' | 'SIGKILL', startAgain = true): Promise<void> {
    const s = this.services.get(name);
    if (!s) throw new Error(`no service ${name} to restart`);
    await s.stop(signal);
    if (startAgain) await this.startService(name);
  }

  /** Starts a service stopped by restartService(name, signal, false) again, with the same arguments. */
  async startService(name: string): Promise<void> {
    const s = this.services.get(name);
    if (!s) throw new Error(`no service ${name} to start`);
    this.services.set(name, await s.restart());
  }

  private async spawnService(
    name: string,
    args: string[],
    socket: string,
    env: Record<string, string> = {},
    timeoutMs = 30_000,
  ): Promise<void> {
    const service = await ServiceProcess.start({
      name,
      // `uffd-server#1` is a second instance of the `uffd-server` command.
      args: [name.split('#')[0]!, ...args],
      wrapper: ['nsenter', `--net=/run/netns/${this.nodeNs}`],
      env: { ...env, LOG_LEVEL: 'info' },
      // Its own process group: a stop that times out takes down what the service left running.
      detached: true,
      ready: grpcServing(socket),
      readyTimeoutMs: timeoutMs,
      stopTimeoutMs: 15_000,
    });
    this.services.set(name, service);
  }

  logs(name: string): string[] {
    return this.services.get(name)?.logs ?? [];
  }

  inNode(file: string, args: string[], input = ''): Promise<string> {
    return mustRun('nsenter', [`--net=/run/netns/${this.nodeNs}`, file, ...args], input);
  }

  /** An HTTP request to a guest's envd at its host IP, from inside the node (curl). */
  async guest(
    hostIp: string,
    method: 'GET' | 'POST',
    path: string,
    body?: unknown,
  ): Promise<{ status: number; body: Buffer }> {
    const args = ['-s', '-m', '20', '-X', method, '-o', '-', '-w', '\n%{http_code}', `http://${hostIp}:49983${path}`];
    if (body !== undefined) args.push('-H', 'content-type: application/json', '--data-binary', '@-');
    const out = await runRaw(
      'nsenter',
      [`--net=/run/netns/${this.nodeNs}`, 'curl', ...args],
      body === undefined ? '' : JSON.stringify(body),
    );
    const cut = out.stdout.lastIndexOf(0x0a);
    return { status: Number(out.stdout.subarray(cut + 1).toString()), body: out.stdout.subarray(0, cut) };
  }

  async writeMemory(hostIp: string, offset: number, data: Buffer): Promise<void> {
    const r = await this.guest(hostIp, 'POST', '/_test/memory/write', { offset, dataBase64: data.toString('base64') });
    if (r.status !== 204) throw new Error(`memory write → ${r.status} ${r.body.toString()}`);
  }

  async readMemory(hostIp: string, offset: number, length: number): Promise<Buffer> {
    const r = await this.guest(hostIp, 'GET', `/_test/memory/read?offset=${offset}&length=${length}`);
    if (r.status !== 200) throw new Error(`memory read → ${r.status} ${r.body.toString()}`);
    return r.body;
  }

  /** Fills `length` bytes of guest memory with a repeated hex pattern (no data over the wire). */
  async fillMemory(hostIp: string, offset: number, length: number, pattern: string): Promise<void> {
    const r = await this.guest(hostIp, 'POST', '/_test/memory/write', { offset, length, pattern });
    if (r.status !== 204) throw new Error(`memory fill → ${r.status} ${r.body.toString()}`);
  }

  async writeDisk(hostIp: string, offset: number, data: Buffer): Promise<void> {
    const r = await this.guest(hostIp, 'POST', '/_test/disk/write', { offset, dataBase64: data.toString('base64') });
    if (r.status !== 204) throw new Error(`disk write → ${r.status} ${r.body.toString()}`);
    const f = await this.guest(hostIp, 'POST', '/_test/disk/flush');
    if (f.status !== 204) throw new Error(`disk flush → ${f.status}`);
  }

  async readDisk(hostIp: string, offset: number, length: number): Promise<Buffer> {
    const r = await this.guest(hostIp, 'GET', `/_test/disk/read?offset=${offset}&length=${length}`);
    if (r.status !== 200) throw new Error(`disk read → ${r.status} ${r.body.toString()}`);
    return r.body;
  }

  /** Everything a sandbox could leave behind, to compare before and after. */
  async footprint(): Promise<Record<string, string[]>> {
    const net = dial(NetAgentClient, this.sockets.net);
    const blocks = this.blockSockets.map((s) => dial(BlockServerClient, s));
    const uffds = this.uffdSockets.map((s) => dial(UffdServerClient, s));
    const dns = dial(DnsClient, this.sockets.dns);
    try {
      const slots = (await unary(net, net.list, {}, 5000)).slots.filter((s) => s.sandboxId);
      const stats = await unary(net, net.stats, {}, 5000);
      const links = JSON.parse(await this.inNode('ip', ['-j', 'link', 'show'])) as { ifname: string }[];
      const routes = (await this.inNode('ip', ['route', 'show', 'table', 'all'])).split('\n').filter(Boolean);
      const rules = (await this.inNode('nft', ['list', 'ruleset'])).split('\n').filter(Boolean);
      return {
        slotsInUse: slots.map((s) => `${s.idx}:${s.sandboxId}`).sort(),
        devices: (await Promise.all(blocks.map((c) => unary(c, c.list, {}, 5000))))
          .flatMap((r) => r.devices.map((d) => d.sandboxId))
          .sort(),
        uffd: (await Promise.all(uffds.map((c) => unary(c, c.list, {}, 5000))))
          .flatMap((r) => r.sandboxes.map((s) => s.sandboxId))
          .sort(),
        dns: (await unary(dns, dns.list, {}, 5000)).records.map((r) => `${r.name}=${r.ip}`).sort(),
        vmmProcesses: await this.vmmProcesses(),
        sandboxDirs: (await readdir(join(this.dataDir, 'sandboxes')).catch(() => [] as string[])).sort(),
        sockets: (await readdir(join(this.dataDir, 's')).catch(() => [] as string[])).sort(),
        namespaces: (await readdir('/run/netns')).filter((n) => n.startsWith(this.slotPrefix)).sort(),
        /** Slots net-agent accounts for (ready new, ready reused, in use): one namespace each. */
        agentSlots: [String(stats.readyNew + stats.readyReused + stats.inUse)],
        links: links.map((l) => l.ifname).sort(),
        routes: routes.sort(),
        rules,
        orchestratorFds: await this.orchestratorFds(),
      };
    } finally {
      for (const c of [net, ...blocks, ...uffds, dns]) c.close();
    }
  }

  async vmmProcesses(): Promise<string[]> {
    return (await this.vmmPids()).map((p) => p.socket);
  }

  /** VMM processes whose API socket is under this node's directory. */
  async vmmPids(): Promise<{ pid: number; socket: string }[]> {
    const out: { pid: number; socket: string }[] = [];
    for (const e of await readdir('/proc')) {
      if (!/^\d+$/.test(e)) continue;
      const argv = readFile(`/proc/${e}/cmdline`, 'utf8').catch(() => '');
      const parts = (await argv).split('\0');
      const i = parts.indexOf('--api-sock');
      if (i >= 0 && parts[i + 1]?.startsWith(this.root)) out.push({ pid: Number(e), socket: parts[i + 1]! });
    }
    return out.sort((a, b) => a.socket.localeCompare(b.socket));
  }

  /** The orchestrator's open fds, by kind (socket/pipe/anon/file path), as a count per kind. */
  async orchestratorFds(): Promise<string[]> {
    const pid = await this.orchestratorPid();
    if (!pid) return [];
    const kinds = new Map<string, number>();
    for (const fd of await readdir(`/proc/${pid}/fd`).catch(() => [] as string[])) {
      const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => 'gone');
      const kind = target.replace(/\[\d+\]/, '').replace(/^\/tmp\/[^/]+\/.*\/(sandboxes|s)\/.*/, '$1/*');
      kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
    }
    return [...kinds].map(([k, n]) => `${k} x${n}`).sort();
  }

  /** The node process behind `nsenter … ./sbx orchestrator` (nsenter and the script exec into it). */
  async orchestratorPid(): Promise<number | undefined> {
    return this.services.get('orchestrator')?.pid;
  }

  async stop(): Promise<void> {
    this.client?.close();
    const rank = ['orchestrator', 'uffd-server', 'block-server', 'net-agent', 'dns'];
    const order = [...this.services.keys()].sort(
      (a, b) => rank.indexOf(a.split('#')[0]!) - rank.indexOf(b.split('#')[0]!),
    );
    for (const name of order) {
      await this.services.get(name)?.stop();
      this.services.delete(name);
    }
    // VMMs a crashed orchestrator left (its own shutdown kills the rest), by pid.
    for (const { pid } of await this.vmmPids()) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // already gone
      }
    }
    await this.cleanupNamespaces();
    await rm(this.root, { recursive: true, force: true });
    await run('umount', [this.vmRootfsDir]).catch(() => undefined);
    await rm(this.vmRootfsDir, { recursive: true, force: true });
  }

  private async cleanupNamespaces(): Promise<void> {
    const mine = (await readdir('/run/netns').catch(() => [] as string[])).filter((n) => n.startsWith(this.prefix));
    if (mine.length) await run('ip', ['-force', '-batch', '-'], mine.map((n) => `netns del ${n}\n`).join(''));
  }
}
