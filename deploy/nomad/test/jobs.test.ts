import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { commands } from '../../../tools/sbx/src/commands.js';
import { auditInterpolations } from './interpolation-audit.js';
import { durationMs, loadJob, parseHclFile, type GroupSpec, type JobSpec } from './nomad-job.js';
import { flagValue, nodeServices, sharedVarFile, type NodeService } from './node-services.js';
import { metricPrefix } from '#metrics';

const launcherNames = new Set(commands.map((c) => c.name));
// A Nomad client caps kill_timeout at its max_kill_timeout, 30s unless the operator raised it.
const clientMaxKillTimeoutMs = 30_000;

async function sharedVars(): Promise<Record<string, unknown>> {
  return parseHclFile(sharedVarFile);
}

describe.each(nodeServices)('$service job', (svc: NodeService) => {
  const load = (overrides: Record<string, unknown> = {}): Promise<JobSpec> => loadJob(svc.jobFile, overrides);

  it('is a system job: one allocation per group on every eligible client node', async () => {
    const job = await load();
    expect(job.id).toBe(svc.jobId);
    expect(job.type).toBe('system');
    expect(job.groups.length).toBeGreaterThan(0);
    for (const group of job.groups) expect(group.tasks.map((t) => t.name)).toEqual([svc.service]);
  });

  it('runs the checkout’s launcher as `sbx <service> serve` with the raw_exec driver as root', async () => {
    const job = await load({ sbx_root: '/srv/sbx-checkout' });
    for (const task of tasks(job)) {
      expect(task.driver).toBe('raw_exec');
      expect(task.raw['user']).toBeUndefined();
      expect(task.command).toBe('/srv/sbx-checkout/sbx');
      expect(launcherNames.has(task.args[0]!)).toBe(true);
      expect(task.args.slice(0, 2)).toEqual([svc.service, 'serve']);
    }
  });

  it('restarts in place with a delay, never giving up on the node', async () => {
    for (const group of (await load()).groups) {
      const restart = group.restart;
      expect(restart, `group ${group.name} has a restart block`).toBeDefined();
      expect(restart!['mode']).toBe('delay');
      expect(Number(restart!['attempts'])).toBeGreaterThan(0);
      expect(durationMs(String(restart!['delay']))).toBeGreaterThanOrEqual(1000);
      expect(durationMs(String(restart!['interval']))).toBeGreaterThan(durationMs(String(restart!['delay'])));
    }
  });

  it('reserves CPU and memory', async () => {
    for (const task of tasks(await load())) {
      expect(task.resources.cpu).toBeGreaterThanOrEqual(100);
      expect(task.resources.memory).toBeGreaterThanOrEqual(64);
    }
  });

  it('stops with SIGTERM and a grace the client will honour', async () => {
    for (const task of tasks(await load())) {
      expect(task.killSignal).toBe('SIGTERM');
      const grace = durationMs(task.killTimeout ?? '5s');
      expect(grace).toBeGreaterThanOrEqual(10_000);
      expect(grace).toBeLessThanOrEqual(clientMaxKillTimeoutMs);
    }
  });

  it('listens on its own socket under /run/sbx, one per instance', async () => {
    const job = await load();
    const sockets = job.groups.map((g) => socketOf(svc, g));
    for (const socket of sockets) expect(socket).toMatch(/^\/run\/sbx\/[a-z0-9-]+\.sock$/);
    expect(new Set(sockets).size).toBe(sockets.length);
    if (svc.instancesVariable) {
      expect(sockets).toEqual(job.variables.get(svc.instancesVariable)!.default);
    } else {
      expect(sockets).toEqual([`/run/sbx/${svc.service}.sock`]);
    }
  });

  it('registers in Consul with a grpc.health.v1 check that probes what the service serves', async () => {
    const job = await load();
    for (const group of job.groups) {
      const task = group.tasks[0]!;
      const main = task.services.find((s) => s.name === svc.jobId);
      expect(main, `service ${svc.jobId} in group ${group.name}`).toBeDefined();
      expect(main!.tags).toContain('sbx');
      expect(portLabels(group)).toContain(main!.port);
      expect(main!.meta['socket']).toBe(socketOf(svc, group));
      expect(main!.checks).toHaveLength(1);
      const check = main!.checks[0]!;
      expect(durationMs(check.interval!)).toBeGreaterThan(0);
      expect(durationMs(check.timeout!)).toBeLessThan(durationMs(check.interval!));
      expect(check.checkRestart, 'a wedged service is restarted by its failing check').toBeDefined();
      if (check.type === 'grpc') {
        // Consul's gRPC check dials TCP: the port must be the one the service's gRPC server binds.
        expect(portLabels(group)).toContain(check.port);
        expect(flagValue(task.args, '--grpc-port')).toBe(`\${NOMAD_PORT_${check.port}}`);
      } else {
        expect(check.type).toBe('script');
        expect(check.command).toBe(task.command);
        expect(check.args).toEqual(['health', socketOf(svc, group)]);
      }
    }
  });

  it('exposes Prometheus metrics on the port Consul registers with the metrics tag', async () => {
    const job = await load();
    for (const group of job.groups) {
      const task = group.tasks[0]!;
      const metrics = task.services.find((s) => s.tags.includes('metrics'));
      expect(metrics, `a service tagged metrics in group ${group.name}`).toBeDefined();
      expect(portLabels(group)).toContain(metrics!.port);
      expect(flagValue(task.args, '--metrics-port')).toBe(`\${NOMAD_PORT_${metrics!.port}}`);
      expect(metrics!.meta['metrics_path']).toBe('/metrics');
      // Scrapers keep the service's own metrics by this prefix (libs/metrics/src/metric-names.ts).
      expect(metrics!.meta['metrics_prefix']).toBe(metricPrefix(svc.service));
      // Consul must advertise the address the endpoint is bound to: the port's host address when the
      // job binds it there, else the services' default, loopback.
      const host = flagValue(task.args, '--metrics-host');
      if (host === undefined) expect(metrics!.address).toBe('127.0.0.1');
      else {
        expect(host).toBe(`\${NOMAD_IP_${metrics!.port}}`);
        expect(metrics!.address).toBeUndefined();
      }
    }
  });

  it('reads settings from Nomad variables the task may read, into its own environment prefix', async () => {
    for (const task of tasks(await load())) {
      // The launcher reads the rendered file at every start (SBX_ENV_FILE): Nomad reads an
      // `env = true` template once per allocation, so a restart would keep stale settings.
      const envTemplates = task.templates.filter((t) => t.destination === 'secrets/sbx.env');
      expect(envTemplates).toHaveLength(1);
      const template = envTemplates[0]!;
      expect(template.env).toBe(false);
      expect(task.env['SBX_ENV_FILE']).toBe('${NOMAD_SECRETS_DIR}/sbx.env');
      // secrets/: not world-readable inside the allocation; noop: a changed setting must not
      // restart a node agent under running sandboxes by itself.
      expect(template.destination).toMatch(/^secrets\//);
      expect(template.changeMode).toBe('noop');
      const paths = [...template.data.matchAll(/nomadVar(?:Exists)?\s+"([^"]+)"/g)].map((m) => m[1]!);
      expect(paths.length).toBeGreaterThan(0);
      // The implicit workload policy grants nomad/jobs and nomad/jobs/<job id>[/<group>[/<task>]] only.
      for (const path of paths) expect(path === 'nomad/jobs' || path.startsWith(`nomad/jobs/${svc.jobId}`)).toBe(true);
      for (const path of new Set(paths.filter((p) => p !== 'nomad/jobs'))) {
        // Optional: a missing variable would otherwise block the task from starting.
        expect(template.data).toContain(`nomadVarExists "${path}"`);
      }
      const prefixes = [...template.data.matchAll(/^(SBX_[A-Z_]*)\{\{/gm)].map((m) => m[1]!);
      expect(prefixes.sort()).toEqual(['SBX_', svc.envPrefix].sort());
    }
  });

  it('interpolates only declared job variables and Nomad runtime variables (no shell $VAR)', async () => {
    const findings = await auditInterpolations(svc.jobFile, await parseHclFile(svc.jobFile));
    expect(findings).toEqual([]);
  });

  it('names only ports its group declares in NOMAD_PORT_x / NOMAD_IP_x', async () => {
    const job = await load();
    for (const group of job.groups) {
      const task = group.tasks[0]!;
      const text = JSON.stringify([task.args, task.env, task.services]);
      for (const m of text.matchAll(/\$\{NOMAD_(?:HOST_)?(?:PORT|IP|ADDR)_([A-Za-z0-9_-]+)\}/g)) {
        expect(portLabels(group)).toContain(m[1]);
      }
    }
  });

  it('accepts the shared node.vars.hcl (it sets only variables this job declares)', async () => {
    const vars = await sharedVars();
    const job = await load(vars);
    expect(job.groups.length).toBeGreaterThan(0);
  });
});

describe('the five jobs together', () => {
  it('declare the shared variables identically, so one var-file describes the node', async () => {
    const vars = Object.keys(await sharedVars());
    expect(vars.length).toBeGreaterThan(0);
    const jobs = await Promise.all(nodeServices.map((s) => loadJob(s.jobFile)));
    for (const name of vars) {
      const declarations = jobs.map((j) => {
        const v = j.variables.get(name);
        expect(v, `${j.id} declares ${name}`).toBeDefined();
        return JSON.stringify({ type: v!.type, default: v!.default });
      });
      expect(new Set(declarations).size).toBe(1);
    }
  });

  it('run one uffd-server and one block-server group per listed socket, and tell the orchestrator the same list', async () => {
    const uffd = ['/run/sbx/uffd-a.sock', '/run/sbx/uffd-b.sock', '/run/sbx/uffd-c.sock'];
    const block = ['/run/sbx/block-a.sock', '/run/sbx/block-b.sock', '/run/sbx/block-c.sock'];
    const overrides = { uffd_sockets: uffd, block_sockets: block };
    const [orchestrator, uffdJob, blockJob] = await Promise.all(
      ['orchestrator', 'uffd-server', 'block-server'].map((name) =>
        loadJob(nodeServices.find((s) => s.service === name)!.jobFile, overrides),
      ),
    );
    const flagOf = (name: string) => nodeServices.find((s) => s.service === name)!.socketFlag;
    expect(uffdJob!.groups.map((g) => flagValue(g.tasks[0]!.args, flagOf('uffd-server')))).toEqual(uffd);
    expect(blockJob!.groups.map((g) => flagValue(g.tasks[0]!.args, flagOf('block-server')))).toEqual(block);
    expect(uffdJob!.groups.map((g) => g.name)).toEqual(['uffd-server-0', 'uffd-server-1', 'uffd-server-2']);
    const env = orchestrator!.groups[0]!.tasks[0]!.env;
    expect(env['SBX_ORCHESTRATOR_UFFD_SERVER_SOCKETS']!.split(',')).toEqual(uffd);
    expect(env['SBX_ORCHESTRATOR_BLOCK_SERVER_SOCKETS']!.split(',')).toEqual(block);
  });

  it('point the orchestrator at the sockets net-agent and dns listen on', async () => {
    const byService = new Map(
      await Promise.all(nodeServices.map(async (s) => [s.service, await loadJob(s.jobFile)] as const)),
    );
    const orchestratorArgs = byService.get('orchestrator')!.groups[0]!.tasks[0]!.args;
    const netAgent = nodeServices.find((s) => s.service === 'net-agent')!;
    const dns = nodeServices.find((s) => s.service === 'dns')!;
    expect(flagValue(orchestratorArgs, '--net-agent-socket')).toBe(
      socketOf(netAgent, byService.get('net-agent')!.groups[0]!),
    );
    expect(flagValue(orchestratorArgs, '--dns-socket')).toBe(socketOf(dns, byService.get('dns')!.groups[0]!));
  });

  it('give the orchestrator and net-agent the same node identity, Nomad’s own node id', async () => {
    // The seed's second outage: a hard-coded node id that matched nothing Nomad knew.
    const ids = await Promise.all(
      ['orchestrator', 'net-agent'].map(async (name) => {
        const job = await loadJob(nodeServices.find((s) => s.service === name)!.jobFile);
        return flagValue(job.groups[0]!.tasks[0]!.args, '--node-id');
      }),
    );
    expect(ids).toEqual(['${node.unique.id}', '${node.unique.id}']);
  });

  it('use distinct static ports', async () => {
    const statics: number[] = [];
    for (const s of nodeServices) {
      for (const g of (await loadJob(s.jobFile)).groups) {
        for (const p of g.ports) if (p.static !== undefined) statics.push(p.static);
      }
    }
    expect(new Set(statics).size).toBe(statics.length);
  });
});

describe('the interpolation audit', () => {
  it('flags the seed’s outage: a shell variable in a job', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'nomad-audit-'));
    try {
      const file = join(dir, 'orchestrator.hcl');
      // The line that took the seed's orchestrator down (operations notes, Feb 2026), plus a
      // brace-less shell variable and an undeclared job variable.
      writeFileSync(
        file,
        `variable "root" {\n  default = "/opt"\n}\njob "orchestrator" {\n  group "g" {\n    task "t" {\n` +
          `      driver = "raw_exec"\n      config {\n        command = "\${PCLOUD_HOME}/packages/orchestrator/orchestrator"\n` +
          `        args = ["--dir", "$HOME/x", "\${var.rooot}", "\${var.root}", "\${NOMAD_ALLOC_DIR}"]\n      }\n    }\n  }\n}\n`,
      );
      const findings = await auditInterpolations(file, await parseHclFile(file));
      expect(findings.map((f) => f.text).sort()).toEqual(
        ['${PCLOUD_HOME}/packages/orchestrator/orchestrator', '$HOME/x', '${var.rooot}'].sort(),
      );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

function tasks(job: JobSpec) {
  return job.groups.flatMap((g) => g.tasks);
}

function portLabels(group: GroupSpec): string[] {
  return group.ports.map((p) => p.label);
}

function socketOf(svc: NodeService, group: GroupSpec): string {
  const value = flagValue(group.tasks[0]!.args, svc.socketFlag);
  if (!value) throw new Error(`group ${group.name}: no ${svc.socketFlag} flag`);
  return value;
}
