import { freeTcpPort } from '#test-kit';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { peerBinary } from './peer-binary.js';
import { PeerProcess } from './peer-process.js';

export interface ConsulAgentOptions {
  /** Also serve the HTTP API on this Unix socket (for processes in another network namespace). */
  unixSocket?: string;
  /**
   * Run in this network namespace (its 127.0.0.1 is then the namespace's own); the test reaches
   * the agent through `unixSocket`, which is then required.
   */
  netns?: string;
}

/**
 * A real Consul agent for a test: a single-server cluster on 127.0.0.1 with its data in a temp
 * directory, so `stop()` then `start()` is an outage with the data kept (a `-dev` agent keeps
 * its Raft log in memory and would come back empty). Every port is its own, so test files can
 * run agents side by side.
 */
export class ConsulAgent {
  /** CONSUL_HTTP_ADDR form: `http://127.0.0.1:P`. */
  address = '';
  /** `unix:///path` when a Unix socket was asked for. */
  socketAddress = '';
  private process: PeerProcess | undefined;
  private ports: Record<string, number> = {};

  private constructor(
    private readonly dataDir: string,
    private readonly options: ConsulAgentOptions,
  ) {}

  static async start(options: ConsulAgentOptions = {}): Promise<ConsulAgent> {
    if (options.netns && !options.unixSocket) throw new Error('a Consul agent in a network namespace needs unixSocket');
    const binary = peerBinary('consul');
    // Raft fsyncs every write: on a loaded disk 200 parallel creates take seconds each. Memory
    // (/dev/shm) keeps them fast and still survives a restart of the agent.
    const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
    const agent = new ConsulAgent(await mkdtemp(join(base, 'sbx-consul-')), options);
    for (const port of ['http', 'server', 'serf_lan']) agent.ports[port] = await freeTcpPort();
    agent.address = `http://127.0.0.1:${agent.ports['http']}`;
    if (options.unixSocket) agent.socketAddress = `unix://${options.unixSocket}`;
    try {
      await agent.launch(binary);
    } catch (err) {
      await agent.close();
      throw err;
    }
    return agent;
  }

  get logs(): readonly string[] {
    return this.process?.logs ?? [];
  }

  /** Starts it again after `stop()`: same ports, same data. */
  async start(): Promise<void> {
    if (this.process?.running) return;
    await this.launch(peerBinary('consul'));
  }

  /** Stops the agent (SIGTERM), keeping its data: the outage of a test. */
  async stop(): Promise<void> {
    await this.process?.stop();
  }

  /** Stops it and removes its data. */
  async close(): Promise<void> {
    await this.stop();
    await rm(this.dataDir, { recursive: true, force: true });
    if (this.options.unixSocket) await rm(this.options.unixSocket, { force: true });
  }

  private async launch(binary: string): Promise<void> {
    const { http, server, serf_lan } = this.ports;
    const addresses = ['127.0.0.1', ...(this.options.unixSocket ? [`unix://${this.options.unixSocket}`] : [])];
    const config = [
      `ports { http = ${http} server = ${server} serf_lan = ${serf_lan} serf_wan = -1 dns = -1 grpc = -1 grpc_tls = -1 }`,
      `addresses { http = "${addresses.join(' ')}" }`,
      // A one-server cluster elects itself at once; the dev-mode Raft timings keep that fast.
      'performance { raft_multiplier = 1 }',
      'log_level = "warn"',
    ].join('\n');
    if (this.options.unixSocket) await rm(this.options.unixSocket, { force: true });
    this.process = new PeerProcess({
      name: 'consul',
      binary,
      args: [
        'agent',
        '-server',
        '-bootstrap-expect=1',
        '-node=sbx-test',
        `-data-dir=${this.dataDir}`,
        '-bind=127.0.0.1',
        '-client=127.0.0.1',
        '-disable-host-node-id',
        `-hcl=${config}`,
      ],
      // The agent must not pick up an operator's environment (CONSUL_HTTP_TOKEN and friends).
      env: { PATH: process.env['PATH'] ?? '/usr/bin:/bin', HOME: this.dataDir },
      ...(this.options.netns ? { netns: this.options.netns } : {}),
    });
    // Ready when it has a leader and serves KV (a read of an absent key answers 404, not 500).
    await this.process.waitUntil(
      'a leader and a KV answer',
      async () => (await this.status('/v1/kv/sbx-ready')) === 404,
    );
  }

  /** The address the test process reaches the agent at: the Unix socket when there is one. */
  get testAddress(): string {
    return this.socketAddress || this.address;
  }

  private status(path: string): Promise<number> {
    return new Promise((resolve, reject) => {
      const target = this.options.unixSocket
        ? { socketPath: this.options.unixSocket, path }
        : { host: '127.0.0.1', port: this.ports['http'], path };
      const req = request({ ...target, timeout: 2000 }, (res) => {
        res.resume();
        resolve(res.statusCode ?? 0);
      });
      req.once('timeout', () => req.destroy(new Error('timeout')));
      req.once('error', reject);
      req.end();
    });
  }
}
