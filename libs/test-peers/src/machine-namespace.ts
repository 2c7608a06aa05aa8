import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { readdir, readFile, rm, stat } from 'node:fs/promises';
import { promisify } from 'node:util';

const execFileAsync = promisify(execFile);

/**
 * A throwaway network namespace standing in for one machine of a cluster: loopback up and an
 * uplink `up0` (a veth into a second namespace playing the internet, default route through it),
 * so services that set up NAT find a default-route interface. Everything started in it (peers,
 * a Nomad agent, node services) sees only this namespace's network; `remove()` deletes both.
 */
export class MachineNamespace {
  private readonly forwarders: ChildProcess[] = [];

  private constructor(readonly name: string) {}

  get internet(): string {
    return `${this.name}-inet`;
  }

  static async create(name: string): Promise<MachineNamespace> {
    const machine = new MachineNamespace(name);
    await machine.removeNamespaces();
    await run('ip', ['netns', 'add', name]);
    await run('ip', ['netns', 'add', machine.internet]);
    await machine.exec('ip', ['link', 'set', 'lo', 'up']);
    await machine.exec('ip', ['link', 'add', 'up0', 'type', 'veth', 'peer', 'name', 'wan0', 'netns', machine.internet]);
    await machine.exec('ip', ['addr', 'add', '198.51.100.2/24', 'dev', 'up0']);
    await machine.exec('ip', ['link', 'set', 'up0', 'up']);
    await machine.exec('ip', ['route', 'add', 'default', 'via', '198.51.100.1']);
    await run('ip', ['-n', machine.internet, 'addr', 'add', '198.51.100.1/24', 'dev', 'wan0']);
    await run('ip', ['-n', machine.internet, 'link', 'set', 'wan0', 'up']);
    return machine;
  }

  /** Runs a command inside the namespace; rejects with its stderr on a non-zero exit. */
  async exec(file: string, args: string[], timeoutMs = 60_000): Promise<string> {
    return run('nsenter', [`--net=/run/netns/${this.name}`, '--', file, ...args], timeoutMs);
  }

  /**
   * A Unix socket (a host path) forwarded to `host:port` inside the namespace, so the test process
   * (in the host's network) can talk TCP to a server there, e.g. the orchestrator's gRPC port.
   */
  async forward(socketPath: string, host: string, port: number): Promise<void> {
    await rm(socketPath, { force: true });
    const code = `
      const net = require('node:net');
      const server = net.createServer((c) => {
        const u = net.connect(${port}, ${JSON.stringify(host)});
        c.pipe(u); u.pipe(c);
        c.on('error', () => u.destroy()); u.on('error', () => c.destroy());
      });
      server.listen(${JSON.stringify(socketPath)}, () => console.log('listening'));
      process.on('SIGTERM', () => process.exit(0));`;
    const child = spawn('nsenter', [`--net=/run/netns/${this.name}`, '--', process.execPath, '-e', code], {
      stdio: ['ignore', 'pipe', 'inherit'],
    });
    this.forwarders.push(child);
    await new Promise<void>((resolve, reject) => {
      child.stdout!.once('data', () => resolve());
      child.once('exit', (c) => reject(new Error(`forwarder to ${host}:${port} exited ${c}`)));
    });
  }

  async remove(): Promise<void> {
    for (const child of this.forwarders) {
      if (child.exitCode === null) {
        child.kill('SIGTERM');
        await new Promise((r) => child.once('exit', r));
      }
    }
    await this.removeNamespaces();
  }

  /** Slot namespaces and leftovers whose names start with this machine's name are removed too. */
  private async removeNamespaces(): Promise<void> {
    const mine = (await readdir('/run/netns').catch(() => [] as string[])).filter((n) => n.startsWith(this.name));
    for (const n of mine) await run('ip', ['netns', 'del', n]).catch(() => undefined);
  }
}

/**
 * What this machine looks like from the host, for a before/after comparison: network namespaces,
 * host links, mounts and processes whose name or command line contains one of `match` (other
 * tests run at the same time, so only what could be ours is compared), and whether the given
 * paths exist.
 */
export async function hostState(match: string[], paths: string[] = []): Promise<Record<string, string[]>> {
  const ours = (s: string) => match.some((m) => s.includes(m));
  const processes: string[] = [];
  for (const pid of await readdir('/proc')) {
    if (!/^\d+$/.test(pid) || Number(pid) === process.pid) continue;
    const cmdline = (await readFile(`/proc/${pid}/cmdline`, 'utf8').catch(() => '')).split('\0').join(' ');
    if (ours(cmdline)) processes.push(cmdline.trim());
  }
  const mounts = (await readFile('/proc/self/mountinfo', 'utf8')).split('\n').map((l) => l.split(' ')[4] ?? '');
  const links = (await run('ip', ['-o', 'link', 'show'])).split('\n').map((l) => l.split(':')[1]?.trim() ?? '');
  const present: string[] = [];
  for (const p of paths)
    if (
      await stat(p).then(
        () => true,
        () => false,
      )
    )
      present.push(p);
  return {
    namespaces: (await readdir('/run/netns').catch(() => [] as string[])).filter(ours).sort(),
    links: links.filter(ours).sort(),
    mounts: mounts.filter(ours).sort(),
    processes: processes.sort(),
    paths: present,
  };
}

async function run(file: string, args: string[], timeoutMs = 60_000): Promise<string> {
  try {
    return (await execFileAsync(file, args, { timeout: timeoutMs, maxBuffer: 64 << 20 })).stdout;
  } catch (err) {
    const e = err as { stderr?: string; message: string };
    throw new Error(`${file} ${args.join(' ')} failed: ${e.stderr || e.message}`, { cause: err });
  }
}
