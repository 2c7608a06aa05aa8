/**
 * A throwaway "node" for network tests: a network namespace playing the node, with an uplink
 * veth to an "internet" namespace, both created by the test. The agent runs inside the node
 * namespace (nsenter --net, so `ip netns add` still registers in the host's /run/netns), and
 * every name this test creates starts with a unique prefix so nothing collides with the host.
 * Traffic only goes to addresses created here.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir } from 'node:fs/promises';
import { createInterface } from 'node:readline';

export const NETNS_DIR = '/run/netns';
export const INTERNET_IP = '198.18.0.1';
export const PRIVATE_IP = '10.99.0.1';
export const METADATA_IP = '169.254.169.254';
export const UPLINK_NODE_IP = '198.51.100.2';

export interface CommandOutput {
  code: number | null;
  stdout: string;
  stderr: string;
}

export function run(file: string, args: string[], input = ''): Promise<CommandOutput> {
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

export async function mustRun(file: string, args: string[], input = ''): Promise<string> {
  const out = await run(file, args, input);
  if (out.code !== 0) throw new Error(`${file} ${args.join(' ')} failed (${out.code}): ${out.stderr}`);
  return out.stdout;
}

const PY_SERVER = `
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64)
print("ready", flush=True)
while True:
    c, a = s.accept()
    try: c.sendall(("%s saw %s\\n" % (sys.argv[3], a[0])).encode())
    finally: c.close()
`;

const PY_PROBE = `
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    c.settimeout(float(sys.argv[3])); print(c.recv(200).decode().strip())
except Exception as e:
    print("ERR " + type(e).__name__); sys.exit(1)
`;

export class NodeNamespace {
  readonly node: string;
  readonly internet: string;
  /** Prefix of the slot namespaces the agent makes (its --namespace-prefix). */
  readonly slotPrefix: string;
  private readonly children = new Set<ChildProcess>();
  private guests = 0;

  constructor(readonly prefix: string) {
    this.node = `${prefix}node`;
    this.internet = `${prefix}inet`;
    this.slotPrefix = `${prefix}s-`;
  }

  /** `tag` keeps prefixes apart when a test file makes several nodes. */
  static async create(tag = 'a'): Promise<NodeNamespace> {
    const ns = new NodeNamespace(`nat${process.pid}${tag}`);
    await ns.setUp();
    return ns;
  }

  nsPath(name: string): string {
    return `${NETNS_DIR}/${name}`;
  }

  /** Runs a command with its network namespace switched (and nothing else). */
  exec(ns: string, file: string, args: string[], input = ''): Promise<CommandOutput> {
    return run('nsenter', [`--net=${this.nsPath(ns)}`, file, ...args], input);
  }

  async mustExec(ns: string, file: string, args: string[], input = ''): Promise<string> {
    const out = await this.exec(ns, file, args, input);
    if (out.code !== 0) throw new Error(`[${ns}] ${file} ${args.join(' ')} failed (${out.code}): ${out.stderr}`);
    return out.stdout;
  }

  private async setUp(): Promise<void> {
    await this.cleanup();
    await mustRun('ip', ['netns', 'add', this.node]);
    await mustRun('ip', ['netns', 'add', this.internet]);
    // IPv4 only: IPv6 link-local routes appear a moment after a link comes up and would make
    // before/after snapshots differ for reasons unrelated to slots.
    await this.mustExec(this.node, 'sysctl', [
      '-q',
      '-w',
      'net.ipv6.conf.all.disable_ipv6=1',
      'net.ipv6.conf.default.disable_ipv6=1',
    ]);
    // Created inside the node namespace with the peer placed straight into the internet one.
    await this.mustExec(
      this.node,
      'ip',
      ['-batch', '-'],
      [
        `link add up0 type veth peer name wan0 netns ${this.internet}`,
        `addr add ${UPLINK_NODE_IP}/24 dev up0`,
        'link set up0 up',
        'link set lo up',
        'route add default via 198.51.100.1',
        '',
      ].join('\n'),
    );
    await this.mustExec(
      this.internet,
      'ip',
      ['-batch', '-'],
      [
        'addr add 198.51.100.1/24 dev wan0',
        'link set wan0 up',
        'link set lo up',
        `addr add ${INTERNET_IP}/32 dev lo`,
        `addr add ${PRIVATE_IP}/32 dev lo`,
        `addr add ${METADATA_IP}/32 dev lo`,
        '',
      ].join('\n'),
    );
  }

  /**
   * Stands a veth in for the slot's tap (DESIGN §8): the tap is replaced by one end of a veth
   * pair (same name, same address), the other end is the guest's eth0 in a new "guest" namespace.
   */
  async attachGuest(slot: { namespace: string; tapName: string; tapIp: string; tapPrefix: number; guestIp: string }) {
    const guest = `${this.prefix}g${++this.guests}`;
    await mustRun('ip', ['netns', 'add', guest]);
    await this.mustExec(
      slot.namespace,
      'ip',
      ['-batch', '-'],
      [
        `link del ${slot.tapName}`,
        `link add ${slot.tapName} type veth peer name eth0 netns ${guest}`,
        `addr add ${slot.tapIp}/${slot.tapPrefix} dev ${slot.tapName}`,
        `link set ${slot.tapName} up`,
        '',
      ].join('\n'),
    );
    await this.mustExec(
      guest,
      'ip',
      ['-batch', '-'],
      [
        `addr add ${slot.guestIp}/${slot.tapPrefix} dev eth0`,
        'link set eth0 up',
        'link set lo up',
        `route add default via ${slot.tapIp}`,
        '',
      ].join('\n'),
    );
    return guest;
  }

  /** A TCP server in `ns` answering each connection with "<tag> saw <peer address>". */
  async startServer(ns: string, host: string, port: number, tag: string): Promise<void> {
    const child = spawn('nsenter', [`--net=${this.nsPath(ns)}`, 'python3', '-c', PY_SERVER, host, String(port), tag], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    let stderr = '';
    child.stderr.on('data', (d: Buffer) => (stderr += d));
    const lines = createInterface({ input: child.stdout });
    await new Promise<void>((resolve, reject) => {
      lines.once('line', () => resolve());
      child.once('exit', (code) => reject(new Error(`server in ${ns} exited ${code}: ${stderr}`)));
    });
  }

  /** Connects from `ns`; the server's answer, or undefined when the connection fails. */
  async probe(ns: string, host: string, port: number, timeoutS = 1.5): Promise<string | undefined> {
    const out = await this.exec(ns, 'python3', ['-c', PY_PROBE, host, String(port), String(timeoutS)]);
    return out.code === 0 ? out.stdout.trim() : undefined;
  }

  /** Spawns a long-lived process inside a namespace (a stand-in for a VMM using a slot). */
  spawnIn(ns: string, file: string, args: string[]): ChildProcess {
    const child = spawn('nsenter', [`--net=${this.nsPath(ns)}`, file, ...args], { stdio: 'ignore' });
    this.children.add(child);
    child.once('exit', () => this.children.delete(child));
    return child;
  }

  /** A slot namespace's addresses and routes, as `ip` shows them. */
  async namespaceState(ns: string): Promise<{ addresses: string[]; routes: string[] }> {
    const addrs = JSON.parse(await this.mustExec(ns, 'ip', ['-j', '-4', 'addr', 'show'])) as Array<{
      ifname: string;
      addr_info: Array<{ local: string; prefixlen: number }>;
    }>;
    const routes = (await this.mustExec(ns, 'ip', ['-4', 'route', 'show'])).split('\n').filter(Boolean);
    return {
      addresses: addrs.flatMap((a) => a.addr_info.map((i) => `${a.ifname} ${i.local}/${i.prefixlen}`)).sort(),
      // `linkdown` on the tap's route only says whether a VMM holds the tap open right now.
      routes: routes.map((r) => r.replace(/ linkdown/, '').trim()).sort(),
    };
  }

  /** Our namespaces registered in /run/netns (node and internet excluded). */
  async slotNamespaces(): Promise<string[]> {
    return (await readdir(NETNS_DIR)).filter((n) => n.startsWith(this.slotPrefix)).sort();
  }

  /** Everything in the node namespace a slot could leave behind, plus our slot namespaces. */
  async snapshot(): Promise<{
    links: string[];
    addresses: string[];
    routes: string[];
    rules: string;
    namespaces: string[];
  }> {
    const links = JSON.parse(await this.mustExec(this.node, 'ip', ['-j', 'link', 'show'])) as Array<{ ifname: string }>;
    const addrs = JSON.parse(await this.mustExec(this.node, 'ip', ['-j', 'addr', 'show'])) as Array<{
      ifname: string;
      addr_info: Array<{ local: string; prefixlen: number }>;
    }>;
    const routes = (await this.mustExec(this.node, 'ip', ['route', 'show', 'table', 'all']))
      .split('\n')
      .filter(Boolean);
    const rules = await this.mustExec(this.node, 'nft', ['list', 'ruleset']);
    return {
      links: links.map((l) => l.ifname).sort(),
      addresses: addrs.flatMap((a) => a.addr_info.map((i) => `${a.ifname} ${i.local}/${i.prefixlen}`)).sort(),
      routes: routes.sort(),
      rules,
      namespaces: await this.slotNamespaces(),
    };
  }

  /** Kills what the test started and deletes every namespace with our prefix. Safe to repeat. */
  async cleanup(): Promise<void> {
    for (const child of this.children) child.kill('SIGKILL');
    this.children.clear();
    const mine = (await readdir(NETNS_DIR).catch(() => [] as string[])).filter((n) => n.startsWith(this.prefix));
    if (mine.length) await run('ip', ['-force', '-batch', '-'], mine.map((n) => `netns del ${n}\n`).join(''));
  }
}
