/**
 * A whole node (apps/orchestrator/test/node-under-test.ts: every service as a real process in a
 * throwaway network namespace) plus the ingress proxy, and the helpers the proxy tests use:
 * real clients (curl, a Python WebSocket client) run inside the node's namespace and reach the
 * proxy on its loopback; test servers run inside a sandbox's guest network (the VMM double's
 * guest namespace), so traffic crosses the slot's real NAT exactly as it would to a VM.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readdir, readlink } from 'node:fs/promises';
import { join } from 'node:path';
import { waitForServing } from '#grpc';
import { NodeUnderTest, REPO, run, runRaw, type Output } from '../../orchestrator/test/node-under-test.js';

export const PROXY_PORT = 5007;
export const HTTP_PORT = 8080;
export const H2C_PORT = 8081;
export const WS_PORT = 8082;
const PYTHON = '/usr/bin/python3';
const TEST_DIR = join(REPO, 'apps/proxy/test');

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

interface Proc {
  child: ChildProcess;
  logs: string[];
  exited: Promise<number | null>;
}

function spawnLogged(file: string, args: string[]): Proc {
  const child = spawn(file, args, { stdio: ['ignore', 'pipe', 'pipe'], cwd: REPO, detached: true });
  const logs: string[] = [];
  let partial = '';
  const collect = (d: Buffer) => {
    const lines = (partial + d.toString()).split('\n');
    partial = lines.pop() ?? '';
    logs.push(...lines.filter(Boolean));
    if (logs.length > 4000) logs.splice(0, 2000);
  };
  child.stdout!.on('data', collect);
  child.stderr!.on('data', collect);
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, logs, exited };
}

async function stopProc(p: Proc, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (p.child.exitCode !== null || p.child.signalCode !== null) return;
  try {
    process.kill(-p.child.pid!, signal);
  } catch {
    return;
  }
  const done = await Promise.race([p.exited.then(() => true), new Promise((r) => setTimeout(() => r(false), 10_000))]);
  if (!done) {
    try {
      process.kill(-p.child.pid!, 'SIGKILL');
    } catch {
      // gone
    }
    await p.exited;
  }
}

export class ProxyNode {
  proxy: Proc | undefined;
  /** Log lines of every proxy process this node ran, in order (restarts included). */
  readonly proxyLogs: string[] = [];
  private readonly guests: Proc[] = [];

  private constructor(readonly node: NodeUnderTest) {}

  static async start(tag: string): Promise<ProxyNode> {
    const node = await NodeUnderTest.start({ tag, envdTimeoutMs: 20_000 });
    const p = new ProxyNode(node);
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

  async startProxy(): Promise<void> {
    const proc = spawnLogged('nsenter', [
      `--net=/run/netns/${this.node.nodeNs}`,
      join(REPO, 'sbx'),
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
    ]);
    this.proxy = proc;
    const mirror = setInterval(() => this.flushLogs(proc), 200);
    void proc.exited.then(() => {
      clearInterval(mirror);
      this.flushLogs(proc);
    });
    await Promise.race([
      waitForServing(this.proxySocket, 20_000),
      proc.exited.then((code) => {
        throw new Error(`proxy exited ${code} while starting:\n${proc.logs.slice(-30).join('\n')}`);
      }),
    ]);
  }

  private flushed = new WeakMap<Proc, number>();
  private flushLogs(proc: Proc): void {
    const from = this.flushed.get(proc) ?? 0;
    this.proxyLogs.push(...proc.logs.slice(from));
    this.flushed.set(proc, proc.logs.length);
  }

  async stopProxy(signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> {
    const proc = this.proxy!;
    proc.child.kill(signal);
    const code = await proc.exited;
    this.flushLogs(proc);
    return code;
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
  curlInFlight(args: string[]): Proc {
    return spawnLogged('nsenter', [
      `--net=/run/netns/${this.node.nodeNs}`,
      'curl',
      '-sS',
      '--connect-to',
      `::127.0.0.1:${PROXY_PORT}`,
      ...args,
    ]);
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
    const servers = [
      spawnLogged('nsenter', [
        `--net=${netns}`,
        process.execPath,
        join(TEST_DIR, 'guest-servers.mjs'),
        String(HTTP_PORT),
        String(H2C_PORT),
      ]),
      spawnLogged('nsenter', [
        `--net=${netns}`,
        PYTHON,
        join(TEST_DIR, 'websocket-peers.py'),
        'serve',
        String(WS_PORT),
      ]),
    ];
    this.guests.push(...servers);
    const deadline = Date.now() + 20_000;
    for (const s of servers) {
      while (!s.logs.includes('ready')) {
        if (s.child.exitCode !== null || Date.now() > deadline) {
          throw new Error(`guest server did not start: ${s.logs.join('\n')}`);
        }
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  async stopGuestServers(): Promise<void> {
    await Promise.all(this.guests.splice(0).map((g) => stopProc(g)));
  }

  async stop(): Promise<void> {
    await this.stopGuestServers();
    if (this.proxy) await stopProc(this.proxy);
    await this.node.stop();
  }
}
