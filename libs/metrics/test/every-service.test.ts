/**
 * Starts every service of a node as the operator does (`./sbx <service> serve`), scrapes each
 * one's /metrics and checks every metric against the naming scheme (metric-names.ts):
 * sbx_<service>_<what>_<unit> in base units, `_total` exactly on counters, histograms in seconds
 * or bytes. net-agent runs in a throwaway network namespace (it sets up the node's network);
 * it needs root, and is left out with a printed reason without it.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { metricNameProblems } from '#metrics';
import { freeTcpPort, grpcServing, ServiceProcess } from '#test-kit';
import { AgentProcess } from '../../../apps/net-agent/test/agent-process.js';
import { NodeNamespace } from '../../../apps/net-agent/test/node-namespace.js';

const isRoot = process.getuid?.() === 0;
if (!isRoot) console.warn('every-service metrics test: net-agent needs root (network namespaces): left out');

let dir: string;
let node: NodeNamespace | undefined;
const started: Array<{ stop(): Promise<unknown> }> = [];
/** Service name → its /metrics page. */
const pages = new Map<string, string>();

async function serve(service: string, socket: string, args: string[]): Promise<void> {
  const metricsPort = await freeTcpPort();
  const proc = await ServiceProcess.start({
    args: [service, 'serve', '--control-socket', socket, '--metrics-port', String(metricsPort), ...args],
    ready: grpcServing(socket),
    readyTimeoutMs: 60_000,
  });
  started.push(proc);
  const res = await fetch(`http://127.0.0.1:${metricsPort}/metrics`);
  pages.set(service, await res.text());
}

beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'sbx-every-service-'));
  const sock = (name: string) => join(dir, `${name}.sock`);
  await serve('dns', sock('dns'), ['--listen', '127.0.0.97:0', '--udp-engine', 'dgram']);
  await serve('uffd-server', sock('uffd'), ['--cache-dir', join(dir, 'cache')]);
  await serve('block-server', sock('block'), ['--data-dir', join(dir, 'block'), '--kernel-attach', 'off']);
  await serve('orchestrator', sock('orchestrator'), [
    ...['--grpc-host', '127.0.0.1', '--grpc-port', String(await freeTcpPort()), '--sample-template', 'false'],
    ...['--data-dir', join(dir, 'orchestrator'), '--bucket', join(dir, 'bucket'), '--cache-dir', join(dir, 'cache')],
    ...['--uffd-server-sockets', sock('uffd'), '--block-server-sockets', sock('block')],
    ...['--net-agent-socket', sock('net'), '--dns-socket', sock('dns')],
  ]);
  await serve('proxy', sock('proxy'), ['--listen', '127.0.0.1:0', '--orchestrator-socket', sock('orchestrator')]);
  if (isRoot) {
    node = await NodeNamespace.create('m');
    const agent = await AgentProcess.start(node, sock('net'), ['--metrics-port', '19479', '--pool-new-size', '1']);
    started.push({ stop: () => agent.stop() });
    // Its metrics listen on the loopback of the node namespace.
    const out = await node.mustExec(node.node, 'python3', [
      '-c',
      'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:19479/metrics", timeout=5).read().decode())',
    ]);
    pages.set('net-agent', out);
  }
}, 300_000);

afterAll(async () => {
  for (const proc of started.reverse()) await proc.stop();
  await node?.cleanup();
  if (dir) await rm(dir, { recursive: true, force: true });
});

/** `# TYPE <name> <type>` of every metric family on a Prometheus text page. */
function families(page: string): Array<{ name: string; type: string }> {
  return [...page.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => ({ name: m[1]!, type: m[2]! }));
}

describe('every service names its metrics sbx_<service>_<what>_<unit>', () => {
  const services = ['orchestrator', 'uffd-server', 'block-server', 'dns', 'proxy', ...(isRoot ? ['net-agent'] : [])];
  for (const service of services) {
    it(service, () => {
      const found = families(pages.get(service) ?? '');
      const own = found.filter((f) => !/^(process|nodejs)_/.test(f.name));
      expect(own.length, `${service} exports metrics of its own`).toBeGreaterThan(0);
      expect(found.flatMap((f) => metricNameProblems(service, f.name, f.type))).toEqual([]);
    });
  }
});
