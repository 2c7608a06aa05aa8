/**
 * bench/proxy/run.sh: wrk direct, through our proxy (native data path, and the Node path as a
 * second proxy on its own port) and through nginx, against one server in a
 * sandbox's guest network, on a whole node (apps/proxy/test/proxy-node.ts) in a throwaway
 * namespace. Rounds alternate the targets so drift on a shared machine hits each alike.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { unary } from '#grpc';
import type { SandboxConfig } from '#proto/orchestrator';
import type { ServiceProcess } from '#test-kit';
import { HTTP_PORT, PROXY_PORT, ProxyNode } from '../../apps/proxy/test/proxy-node.js';

const NGINX_PORT = 5100;
// Our proxy on the Node data path, beside the native one on PROXY_PORT.
const NODE_PATH_PORT = 5008;

const benchSandbox: SandboxConfig = {
  templateId: 'base',
  buildId: '',
  kernelVersion: 'vmlinux-6.1',
  firecrackerVersion: 'v1.10',
  hugePages: false,
  sandboxId: 'bench',
  envVars: {},
  metadata: {},
  envdVersion: '0.2.0',
  vcpu: 1,
  ramMb: 0,
  teamId: 'bench',
  maxSandboxLength: 1,
  totalDiskSizeMb: 0,
  snapshot: false,
  baseTemplateId: 'base',
  executionId: '',
  volumeMounts: [],
};

/** CPU seconds (user + system) used so far by every process in process group `pgid`. */
async function groupCpuSeconds(pgid: number): Promise<number> {
  let ticks = 0;
  for (const e of await readdir('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    const stat = await readFile(`/proc/${e}/stat`, 'utf8').catch(() => '');
    // Fields after the command (which may hold spaces): state is field 3, pgrp 5, utime 14, stime 15.
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(f[2]) === pgid) ticks += Number(f[11]) + Number(f[12]);
  }
  return ticks / 100;
}

interface WrkResult {
  requestsPerSecond: number;
  /** CPU the proxy in front used per request, in µs (0 for direct). */
  cpuUsPerRequest?: number;
  p50Ms: number;
  p99Ms: number;
  errors: string;
}

function parseWrk(out: string): WrkResult {
  const ms = (label: string) => {
    const m = new RegExp(`^\\s*${label}%\\s+([\\d.]+)(us|ms|s)\\s*$`, 'm').exec(out);
    if (!m) throw new Error(`wrk output has no ${label}% latency:\n${out}`);
    const v = Number(m[1]);
    return m[2] === 'us' ? v / 1000 : m[2] === 's' ? v * 1000 : v;
  };
  const rps = /Requests\/sec:\s+([\d.]+)/.exec(out);
  if (!rps) throw new Error(`wrk output has no Requests/sec:\n${out}`);
  const errors = [/Socket errors:.*$/m.exec(out)?.[0], /Non-2xx or 3xx responses: \d+/.exec(out)?.[0]]
    .filter(Boolean)
    .join('; ');
  return { requestsPerSecond: Number(rps[1]), p50Ms: ms('50'), p99Ms: ms('99'), errors };
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  const mid = Math.floor(s.length / 2);
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

function nginxConfig(work: string, workers: number, hostIp: string): string {
  // nginx as a plain reverse proxy: HTTP/1.1 and keep-alive to the upstream, no buffering
  // changes, no cache, no access log (ours logs nothing per request either).
  return `worker_processes ${workers};
pid ${work}/nginx.pid;
error_log ${work}/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path ${work}/body;
  proxy_temp_path ${work}/proxy;
  fastcgi_temp_path ${work}/fastcgi;
  uwsgi_temp_path ${work}/uwsgi;
  scgi_temp_path ${work}/scgi;
  upstream guest { server ${hostIp}:${HTTP_PORT}; keepalive 128; }
  server {
    listen 127.0.0.1:${NGINX_PORT};
    location / {
      proxy_pass http://guest;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
    }
  }
}
`;
}

async function stopNginx(nginx: ChildProcess | undefined): Promise<void> {
  if (!nginx?.pid || nginx.exitCode !== null || nginx.signalCode !== null) return;
  const exited = new Promise((r) => nginx.once('exit', r));
  try {
    process.kill(-nginx.pid, 'SIGQUIT');
  } catch {
    return;
  }
  await exited;
}

interface Summary {
  rps: number;
  p50: number;
  p99: number;
  cpu: number;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      seconds: { type: 'string', default: '10' },
      rounds: { type: 'string', default: '2' },
      connections: { type: 'string', default: '32' },
      threads: { type: 'string', default: '2' },
      'body-bytes': { type: 'string', default: '1024' },
      workers: { type: 'string', default: '1,2' },
    },
  });
  const seconds = Number(values.seconds);
  const rounds = Number(values.rounds);
  const workerCounts = values.workers.split(',').map(Number);
  if (workerCounts.some((n) => !(n >= 1 && n <= 64))) throw new Error(`--workers: expected counts like 1,2`);
  const path = `/download?bytes=${Number(values['body-bytes'])}`;
  const work = await mkdtemp(join(tmpdir(), 'sbx-bench-proxy-'));
  console.log('bench/proxy: starting a node (services, vmm-sim guest) and the proxy…');
  const proxyArgs = (path: 'native' | 'node', workers: number) => ['--data-path', path, '--workers', String(workers)];
  const px = await ProxyNode.start('bp', proxyArgs('native', workerCounts[0]!));
  let nginx: ChildProcess | undefined;
  let nodePath: ServiceProcess | undefined;
  const names = ['direct', 'native', 'node', 'nginx'] as const;
  const table: ({ workers: number } & Record<(typeof names)[number], Summary>)[] = [];
  try {
    await unary(
      px.node.client,
      px.node.client.create,
      { sandbox: benchSandbox, startTime: new Date(), endTime: new Date(Date.now() + 3_600_000) },
      120_000,
    );
    const hostIp = (await px.node.footprint())['dns']!.find((r) => r.startsWith('bench='))!.split('=')[1]!;
    await px.startGuestServers('bench');
    const host = `${HTTP_PORT}-bench.sbx.test`;

    for (const [i, workers] of workerCounts.entries()) {
      // The same number of processes for both proxies: the ratio compares like with like.
      // --workers N: relay threads in one process (native), processes (node).
      if (i > 0) {
        await px.stopProxy();
        await px.startProxy(proxyArgs('native', workers));
      }
      await nodePath?.stop();
      nodePath = await px.startSecondProxy(NODE_PATH_PORT, proxyArgs('node', workers));
      await stopNginx(nginx);
      await writeFile(join(work, 'nginx.conf'), nginxConfig(work, workers, hostIp));
      nginx = spawn(
        'nsenter',
        [
          `--net=/run/netns/${px.node.nodeNs}`,
          'nginx',
          '-c',
          join(work, 'nginx.conf'),
          '-p',
          work,
          '-g',
          'daemon off;',
        ],
        { stdio: ['ignore', 'inherit', 'inherit'], detached: true },
      );
      // The proxy runs detached (its own process group, workers included): ./sbx execs node,
      // nsenter execs ./sbx.
      const targets = [
        { name: 'direct', url: `http://${hostIp}:${HTTP_PORT}${path}`, header: [] as string[], pgid: 0 },
        {
          name: 'native',
          url: `http://127.0.0.1:${PROXY_PORT}${path}`,
          header: ['-H', `Host: ${host}`],
          pgid: px.proxy!.child.pid!,
        },
        {
          name: 'node',
          url: `http://127.0.0.1:${NODE_PATH_PORT}${path}`,
          header: ['-H', `Host: ${host}`],
          pgid: nodePath.child.pid!,
        },
        { name: 'nginx', url: `http://127.0.0.1:${NGINX_PORT}${path}`, header: [] as string[], pgid: nginx.pid! },
      ];
      // Every target answers before the clock starts.
      for (const t of targets) {
        for (let attempt = 0; ; attempt++) {
          const out = await px.node
            .inNode('curl', ['-s', '-o', '/dev/null', '-w', '%{http_code}', ...t.header, t.url])
            .catch(() => '');
          if (out === '200') break;
          if (attempt > 100) throw new Error(`${t.name} does not answer 200 at ${t.url}`);
          await new Promise((r) => setTimeout(r, 100));
        }
      }
      const results = new Map<string, WrkResult[]>(targets.map((t) => [t.name, []]));
      for (let round = 1; round <= rounds; round++) {
        for (const t of round % 2 ? targets : [...targets].reverse()) {
          const cpuBefore = t.pgid ? await groupCpuSeconds(t.pgid) : 0;
          const out = await px.node.inNode('wrk', [
            '--latency',
            '-t',
            String(values.threads),
            '-c',
            String(values.connections),
            '-d',
            `${seconds}s`,
            ...t.header,
            t.url,
          ]);
          const r = parseWrk(out);
          if (t.pgid) {
            const requests = r.requestsPerSecond * seconds;
            r.cpuUsPerRequest = (((await groupCpuSeconds(t.pgid)) - cpuBefore) * 1e6) / requests;
          }
          results.get(t.name)!.push(r);
          const cpu = r.cpuUsPerRequest !== undefined ? `  cpu ${r.cpuUsPerRequest.toFixed(0)} µs/req` : '';
          console.log(
            `workers ${workers} round ${round} ${t.name.padEnd(6)} ${r.requestsPerSecond.toFixed(0).padStart(7)} req/s  p50 ${r.p50Ms.toFixed(2)} ms  p99 ${r.p99Ms.toFixed(2)} ms${cpu}${r.errors ? `  (${r.errors})` : ''}`,
          );
        }
      }
      const summary = (name: string): Summary => {
        const rs = results.get(name)!;
        return {
          rps: median(rs.map((r) => r.requestsPerSecond)),
          p50: median(rs.map((r) => r.p50Ms)),
          p99: median(rs.map((r) => r.p99Ms)),
          cpu: median(rs.map((r) => r.cpuUsPerRequest ?? 0)),
        };
      };
      table.push({
        workers,
        direct: summary('direct'),
        native: summary('native'),
        node: summary('node'),
        nginx: summary('nginx'),
      });
    }

    console.log(
      `\nwrk -t${values.threads} -c${values.connections} -d${seconds}s, ${values['body-bytes']} B bodies, ${rounds} rounds (medians); ` +
        'workers = proxy --workers (native: relay threads in one process; node: processes) and nginx worker_processes alike',
    );
    console.log('workers target   req/s     p50 ms   p99 ms   proxy cpu µs/req');
    for (const row of table) {
      for (const name of names) {
        const s = row[name];
        console.log(
          `${String(row.workers).padStart(7)} ${name.padEnd(8)} ${s.rps.toFixed(0).padStart(7)}   ${s.p50.toFixed(2).padStart(6)}   ${s.p99.toFixed(2).padStart(6)}   ${name === 'direct' ? '' : s.cpu.toFixed(1).padStart(6)}`,
        );
      }
    }
    for (const { workers, direct, nginx: peer, ...ours } of table) {
      console.log('');
      for (const name of ['native', 'node'] as const) {
        const o = ours[name];
        console.log(
          `workers ${workers} ${name.padEnd(6)}: ours / nginx requests/s ${(o.rps / peer.rps).toFixed(2)} (goal >= 1); ours / direct ${(o.rps / direct.rps).toFixed(2)}; ` +
            `proxy CPU per request ours / nginx ${(o.cpu / peer.cpu).toFixed(2)}; added p99 over direct ${(o.p99 - direct.p99).toFixed(2)} ms (goal <= 1 ms)`,
        );
      }
      console.log(`workers ${workers} nginx : added p99 over direct ${(peer.p99 - direct.p99).toFixed(2)} ms`);
    }
  } finally {
    await stopNginx(nginx);
    await nodePath?.stop();
    await px.stop();
    await rm(work, { recursive: true, force: true });
  }
}

main().then(
  () => process.exit(0),
  (err: unknown) => {
    console.error(err);
    process.exit(1);
  },
);
