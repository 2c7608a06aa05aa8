/**
 * A whole node (apps/orchestrator/test/node-under-test.ts: every service as a real process in a
 * throwaway network namespace) plus the ingress proxy, and the helpers the proxy tests use:
 * real clients (curl, a Python WebSocket client) run inside the node's namespace and reach the
 * proxy on its loopback; test servers run inside a sandbox's guest network (the VMM double's
 * guest namespace), so traffic crosses the slot's real NAT exactly as it would to a VM.
 */
import { createHash } from 'node:crypto';
import { readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { grpcServing, logLine, repoRoot, ServiceProcess, type Readiness } from '#test-kit';
import { NodeUnderTest, run, runRaw, type Output } from '../../orchestrator/test/node-under-test.js';

export const PROXY_PORT = 5007;
export const HTTP_PORT = 8080;
export const H2C_PORT = 8081;
export const WS_PORT = 8082;
const PYTHON = '/usr/bin/python3';
const TEST_DIR = join(repoRoot, 'apps/proxy/test');

/** Byte n of every guest download (guest-servers.mjs has the same function). */
export function pattern(offset: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) {
    const n = offset + i;
    out[i] = (n * 131 + (n >>> 8) * 7 + (n >>> 16)) & 0xff;
  }
  return out;
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

/** A client or server program inside network namespace `netns`, in its own process group. */
function startIn(netns: string, name: string, command: string[], ready?: Readiness): Promise<ServiceProcess> {
  return ServiceProcess.start({
    name,
    launcher: ['nsenter', `--net=${netns}`, ...command],
    args: [],
    detached: true,
    ready,
  });
}

export class ProxyNode {
  proxy: ServiceProcess | undefined;
  private readonly proxies: ServiceProcess[] = [];
  private readonly guests: ServiceProcess[] = [];

  private constructor(
    readonly node: NodeUnderTest,
    /** More `proxy serve` flags (the bench's --workers). */
    private readonly proxyArgs: string[],
  ) {}

  static async start(tag: string, proxyArgs: string[] = []): Promise<ProxyNode> {
    const node = await NodeUnderTest.start({ tag, envdTimeoutMs: 20_000 });
    const p = new ProxyNode(node, proxyArgs);
    try {
      await p.startProxy();
    } catch (err) {
      await p.stop();
      throw err;
    }
    return p;
  }

  get proxySocket(): string {
    return join(this.node.root, 'r', 'proxy.sock');
  }

  /** Starts the proxy; `args` replaces the `proxy serve` flags given at start (the bench's --workers). */
  async startProxy(args: string[] = this.proxyArgs): Promise<void> {
    this.proxy = await ServiceProcess.start({
      args: [
        'proxy',
        'serve',
        '--listen',
        `127.0.0.1:${PROXY_PORT}`,
        '--orchestrator-socket',
        this.node.sockets.orchestrator,
        '--control-socket',
        this.proxySocket,
        '--metrics-port',
        '9465',
        '--domain',
        'sbx.test',
        '--resume-timeout-ms',
        '60000',
        ...args,
      ],
      wrapper: ['nsenter', `--net=/run/netns/${this.node.nodeNs}`],
      detached: true,
      ready: grpcServing(this.proxySocket),
      readyTimeoutMs: 20_000,
    });
    this.proxies.push(this.proxy);
  }

  /**
   * One more proxy beside the main one (the bench's other data path): its own client port, no
   * metrics, its control socket under the node's run directory; stopped with the node.
   */
  async startSecondProxy(port: number, args: string[]): Promise<ServiceProcess> {
    const controlSocket = join(this.node.root, 'r', `proxy-${port}.sock`);
    const proxy = await ServiceProcess.start({
      args: [
        'proxy',
        'serve',
        '--listen',
        `127.0.0.1:${port}`,
        '--orchestrator-socket',
        this.node.sockets.orchestrator,
        '--control-socket',
        controlSocket,
        '--metrics-port',
        '0',
        '--domain',
        'sbx.test',
        ...args,
      ],
      wrapper: ['nsenter', `--net=/run/netns/${this.node.nodeNs}`],
      detached: true,
      ready: grpcServing(controlSocket),
      readyTimeoutMs: 20_000,
    });
    this.proxies.push(proxy);
    return proxy;
  }

  /** Log lines of every proxy process this node ran, in order (restarts included). */
  get proxyLogs(): string[] {
    return this.proxies.flatMap((p) => p.logs);
  }

  stopProxy(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    return this.proxy!.stop(signal);
  }

  /** curl inside the node, through the proxy: `--connect-to` keeps the URL's Host as written. */
  curl(args: string[], input = ''): Promise<Output> {
    return run(
      'nsenter',
      [`--net=/run/netns/${this.node.nodeNs}`, 'curl', '-sS', '--connect-to', `::127.0.0.1:${PROXY_PORT}`, ...args],
      input,
    );
  }

  curlRaw(args: string[]): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
    return runRaw('nsenter', [
      `--net=/run/netns/${this.node.nodeNs}`,
      'curl',
      '-sS',
      '--connect-to',
      `::127.0.0.1:${PROXY_PORT}`,
      ...args,
    ]);
  }

  /** A curl started now and left running (a long download), with its exit awaited later. */
  curlInFlight(args: string[]): Promise<ServiceProcess> {
    const curl = ['curl', '-sS', '--connect-to', `::127.0.0.1:${PROXY_PORT}`, ...args];
    return startIn(`/run/netns/${this.node.nodeNs}`, 'curl', curl);
  }

  /** `ws` client inside the node: connects to the proxy, sends `count` messages, checks each echo. */
  webSocketEcho(url: string, count: number): Promise<Output> {
    return run('nsenter', [
      `--net=/run/netns/${this.node.nodeNs}`,
      PYTHON,
      join(TEST_DIR, 'websocket-peers.py'),
      'echo',
      '127.0.0.1',
      String(PROXY_PORT),
      url,
      String(count),
    ]);
  }

  /** The guest network namespace of a sandbox: the VMM double holds it by an fd of its own. */
  async guestNetns(sandboxId: string): Promise<string> {
    const tag = createHash('sha256').update(sandboxId).digest('hex').slice(0, 16);
    const api = join(this.node.dataDir, 's', `${tag}.api.sock`);
    const vmm = (await this.node.vmmPids()).find((p) => p.socket === api);
    if (!vmm) throw new Error(`no VMM process for ${sandboxId}`);
    const own = await readlink(`/proc/${vmm.pid}/ns/net`);
    for (const fd of await readdir(`/proc/${vmm.pid}/fd`)) {
      const target = await readlink(`/proc/${vmm.pid}/fd/${fd}`).catch(() => '');
      if (target.startsWith('net:[') && target !== own) return `/proc/${vmm.pid}/fd/${fd}`;
    }
    throw new Error(`VMM ${vmm.pid} of ${sandboxId} holds no guest network namespace`);
  }

  /** Starts the test servers (HTTP/1.1, h2c, WebSocket echo) in the sandbox's guest network. */
  async startGuestServers(sandboxId: string): Promise<void> {
    const netns = await this.guestNetns(sandboxId);
    const ready = logLine('ready');
    const guestServers = [process.execPath, join(TEST_DIR, 'guest-servers.mjs'), String(HTTP_PORT), String(H2C_PORT)];
    const webSocketPeer = [PYTHON, join(TEST_DIR, 'websocket-peers.py'), 'serve', String(WS_PORT)];
    this.guests.push(
      ...(await Promise.all([
        startIn(netns, 'guest-servers', guestServers, ready),
        startIn(netns, 'websocket-peers', webSocketPeer, ready),
      ])),
    );
  }

  async stopGuestServers(): Promise<void> {
    await Promise.all(this.guests.splice(0).map((g) => g.stop()));
  }

  async stop(): Promise<void> {
    await this.stopGuestServers();
    // Every proxy started (a stopped one's stop is a no-op).
    for (const p of this.proxies) await p.stop();
    await this.node.stop();
  }
}
