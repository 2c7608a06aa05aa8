import { execFile, spawn } from 'node:child_process';
import { existsSync, readlinkSync } from 'node:fs';
import { mkdir, mkdtemp, rm, rmdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { peerBinary } from './peer-binary.js';
import { PeerProcess } from './peer-process.js';

const execFileAsync = promisify(execFile);

export interface NomadAgentOptions {
  /** The network namespace the agent (and so every task it starts) runs in. */
  netns: string;
  /** HTTP address of the Consul agent, as seen inside `netns`. */
  consulAddress: string;
  /**
   * Host directories bind-mounted over these paths for the agent and its tasks only (a private
   * mount namespace), so jobs that use fixed paths (/run/sbx, /var/lib/sbx) leave the host's alone.
   */
  binds?: Record<string, string>;
}

/**
 * A real `nomad agent -dev` (server and client in one, raw_exec enabled) in a network namespace
 * and a private mount namespace, registering its services in the given Consul agent. The test
 * talks to it with the nomad CLI run in the same namespace (`cli()`), as an operator would.
 */
export class NomadAgent {
  readonly address = 'http://127.0.0.1:4646';
  private process: PeerProcess | undefined;
  private readonly madeMountPoints: string[] = [];
  /** The agent's mount namespace (`mnt:[inode]`): every task it started runs in it. */
  mountNamespace = '';

  private constructor(
    readonly dir: string,
    private readonly binary: string,
    private readonly options: NomadAgentOptions,
  ) {}

  get dataDir(): string {
    return join(this.dir, 'data');
  }

  get logs(): readonly string[] {
    return this.process?.logs ?? [];
  }

  static async start(options: NomadAgentOptions): Promise<NomadAgent> {
    const binary = peerBinary('nomad');
    const agent = new NomadAgent(await mkdtemp(join(tmpdir(), 'sbx-nomad-')), binary, options);
    try {
      await agent.launch();
    } catch (err) {
      await agent.close();
      throw err;
    }
    return agent;
  }

  private async launch(): Promise<void> {
    await mkdir(this.dataDir, { recursive: true });
    const config = join(this.dir, 'agent.hcl');
    await writeFile(
      config,
      [
        `data_dir = "${this.dataDir}"`,
        'log_level = "INFO"',
        // The fingerprinted 2 cores are fewer MHz than the five jobs reserve; raw_exec does not
        // enforce them anyway (deploy/nomad/README.md).
        'client {',
        '  cpu_total_compute = 20000',
        '  memory_total_mb = 16384',
        '}',
        'plugin "raw_exec" {',
        '  config {',
        '    enabled = true',
        '  }',
        '}',
        `consul {`,
        `  address = "${this.options.consulAddress.replace(/^https?:\/\//, '')}"`,
        '}',
        '',
      ].join('\n'),
    );
    const binds = Object.entries(this.options.binds ?? {});
    for (const [target, host] of binds) {
      await mkdir(host, { recursive: true });
      // The mount point is made on the host's file system: remember it to remove it at close.
      if (!existsSync(target)) this.madeMountPoints.push(target);
    }
    const script = [
      ...binds.map(([target, host]) => `mkdir -p '${target}' && mount --bind '${host}' '${target}'`),
      `exec '${this.binary}' agent -dev -config '${config}'`,
    ].join(' && ');
    // nomad agent -dev refuses to start while AWS_CA_BUNDLE is set (its IMDS fingerprint fails).
    const env = { ...process.env };
    delete env['AWS_CA_BUNDLE'];
    delete env['NOMAD_ADDR'];
    this.process = new PeerProcess({
      name: 'nomad',
      binary: 'unshare',
      args: ['--mount', '--propagation', 'private', '--', 'sh', '-c', script],
      env,
      netns: this.options.netns,
    });
    const pid = this.process.child.pid;
    await this.process.waitUntil('its own mount namespace', async () => {
      this.mountNamespace = readlinkSync(`/proc/${pid}/ns/mnt`);
      return this.mountNamespace !== readlinkSync('/proc/self/ns/mnt');
    });
    await this.process.waitUntil(
      'a ready client node',
      async () => {
        const nodes = JSON.parse((await this.cli(['node', 'status', '-json'])).stdout) as Array<{ Status: string }>;
        return nodes.some((n) => n.Status === 'ready');
      },
      120_000,
    );
  }

  /** Runs the nomad CLI against this agent, in its network namespace; rejects on a non-zero exit. */
  cli(args: string[], timeoutMs = 120_000): Promise<{ stdout: string; stderr: string }> {
    const env: NodeJS.ProcessEnv = { ...process.env, NOMAD_ADDR: this.address };
    delete env['AWS_CA_BUNDLE'];
    return new Promise((resolve, reject) => {
      // stdin closed: `nomad operator api` reads a request body from a stdin that is not a terminal.
      const child = spawn('nsenter', [`--net=/run/netns/${this.options.netns}`, '--', this.binary, ...args], {
        env,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
      child.once('error', reject);
      child.once('close', (code, signal) => {
        clearTimeout(timer);
        if (code === 0) resolve({ stdout, stderr });
        else reject(new Error(`nomad ${args.join(' ')} failed (${signal ?? code}): ${stderr || stdout}`));
      });
    });
  }

  /**
   * A file as the agent and its tasks see it (in its mount namespace: a task's secrets/ may be a
   * mount the host does not see).
   */
  async readFile(path: string): Promise<string> {
    const pid = this.process?.child.pid;
    if (!pid || !this.process?.running) throw new Error('the nomad agent is not running');
    return (await execFileAsync('nsenter', ['-t', String(pid), '-m', '--', 'cat', path])).stdout;
  }

  /** GET on the Nomad HTTP API (through `nomad operator api`), parsed. */
  async api<T>(path: string): Promise<T> {
    return JSON.parse((await this.cli(['operator', 'api', path])).stdout) as T;
  }

  tail(lines = 60): string {
    return this.logs.slice(-lines).join('\n');
  }

  /**
   * Stops the agent. Tasks outlive a Nomad client that stops (raw_exec executors are detached):
   * stop the jobs and wait for their allocations to complete first.
   */
  async stop(): Promise<void> {
    await this.process?.stop(30_000);
  }

  async close(): Promise<void> {
    await this.stop();
    await rm(this.dir, { recursive: true, force: true }).catch(() => undefined);
    for (const target of this.madeMountPoints.splice(0)) await rmdir(target).catch(() => undefined);
  }
}
