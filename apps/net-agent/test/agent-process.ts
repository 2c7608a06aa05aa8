/** The real net-agent process, started inside a test's node namespace and driven over its socket. */
import type { ChildProcess } from 'node:child_process';
import { dial, unary } from '#grpc';
import { NetAgentClient, type NetSlot, type NetStats } from '#proto/sbx/net';
import { eventually, grpcServing, ServiceProcess } from '#test-kit';
import type { NodeNamespace } from './node-namespace.js';

export class AgentProcess {
  readonly client: NetAgentClient;

  private constructor(
    readonly service: ServiceProcess,
    readonly socket: string,
  ) {
    this.client = dial(NetAgentClient, socket);
  }

  static async start(node: NodeNamespace, socket: string, args: string[]): Promise<AgentProcess> {
    const service = await ServiceProcess.start({
      args: [
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
      wrapper: ['nsenter', `--net=${node.nsPath(node.node)}`],
      ready: grpcServing(socket),
      // Its SIGTERM removes every slot namespace it made: hundreds take a while.
      stopTimeoutMs: 60_000,
    });
    return new AgentProcess(service, socket);
  }

  get child(): ChildProcess {
    return this.service.child;
  }

  get logs(): string[] {
    return this.service.logs;
  }

  /** pooled: as the orchestrator's VMM pool acquires, for a VMM started ahead. */
  acquire(sandboxId: string, pooled?: boolean): Promise<NetSlot> {
    return unary(this.client, this.client.acquire, { sandboxId, pooled }, 10_000);
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
  waitFor(ok: (s: NetStats) => boolean | Promise<boolean>, timeoutMs = 30_000): Promise<NetStats> {
    return eventually(
      async () => {
        const stats = await this.stats();
        if (await ok(stats)) return stats;
        throw new Error(`condition not reached in ${timeoutMs} ms; last stats ${JSON.stringify(stats)}`);
      },
      { timeoutMs },
    );
  }

  /** SIGTERM and wait: the agent removes everything it made before it exits. */
  stop(): Promise<number | null> {
    this.client.close();
    return this.service.stop();
  }

  /** A crash: nothing is cleaned up. */
  async crash(): Promise<void> {
    this.client.close();
    await this.service.kill();
  }

  kill(): void {
    this.client.close();
    void this.service.kill();
  }
}
