/** The real net-agent process, started inside a test's node namespace and driven over its socket. */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { dial, unary, waitForServing } from '#grpc';
import { NetAgentClient, type NetSlot, type NetStats } from '#proto/sbx/net';
import type { NodeNamespace } from './node-namespace.js';

export const REPO = fileURLToPath(new URL('../../../', import.meta.url));

export class AgentProcess {
  readonly logs: string[] = [];
  readonly client: NetAgentClient;
  private exited: Promise<number | null>;

  private constructor(
    readonly child: ChildProcess,
    readonly socket: string,
  ) {
    this.client = dial(NetAgentClient, socket);
    this.exited = new Promise((resolve) => child.once('exit', (code, signal) => resolve(code ?? (signal ? -1 : null))));
  }

  static async start(node: NodeNamespace, socket: string, args: string[]): Promise<AgentProcess> {
    const child = spawn(
      'nsenter',
      [
        `--net=${node.nsPath(node.node)}`,
        `${REPO}sbx`,
        'net-agent',
        'serve',
        '--control-socket',
        socket,
        '--metrics-port',
        '0',
        '--namespace-prefix',
        node.slotPrefix,
        '--node-id',
        node.prefix,
        ...args,
      ],
      { stdio: ['ignore', 'pipe', 'pipe'], cwd: REPO },
    );
    const agent = new AgentProcess(child, socket);
    const collect = (d: Buffer) => agent.logs.push(...d.toString().split('\n').filter(Boolean));
    child.stdout!.on('data', collect);
    child.stderr!.on('data', collect);
    try {
      await Promise.race([
        waitForServing(socket, 30_000),
        agent.exited.then((code) => {
          throw new Error(`net-agent exited ${code} during start:\n${agent.logs.join('\n')}`);
        }),
      ]);
    } catch (err) {
      agent.kill();
      throw err;
    }
    return agent;
  }

  acquire(sandboxId: string): Promise<NetSlot> {
    return unary(this.client, this.client.acquire, { sandboxId }, 10_000);
  }

  release(idx: number, sandboxId: string, reuse = false): Promise<unknown> {
    return unary(this.client, this.client.release, { idx, sandboxId, reuse }, 20_000);
  }

  list(): Promise<NetSlot[]> {
    return unary(this.client, this.client.list, {}, 5000).then((r) => r.slots);
  }

  stats(): Promise<NetStats> {
    return unary(this.client, this.client.stats, {}, 5000);
  }

  /** Polls stats until `ok` holds (slot creation runs in the background). */
  async waitFor(ok: (s: NetStats) => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<NetStats> {
    const deadline = Date.now() + timeoutMs;
    let last: NetStats | undefined;
    while (Date.now() < deadline) {
      last = await this.stats();
      if (await ok(last)) return last;
      await new Promise((r) => setTimeout(r, 50));
    }
    throw new Error(`condition not reached in ${timeoutMs} ms; last stats ${JSON.stringify(last)}`);
  }

  /** SIGTERM and wait: the agent removes everything it made before it exits. */
  async stop(): Promise<number | null> {
    this.client.close();
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    return this.exited;
  }

  /** A crash: nothing is cleaned up. */
  async crash(): Promise<void> {
    this.kill();
    await this.exited;
  }

  kill(): void {
    this.client.close();
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGKILL');
  }
}
