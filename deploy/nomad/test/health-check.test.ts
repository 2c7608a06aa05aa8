import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForServing } from '#grpc';
import { commands } from '../../../tools/sbx/src/commands.js';
import { loadJob, type TaskSpec } from './nomad-job.js';
import { flagValue, nodeServices, repoRoot, type NodeService } from './node-services.js';

/**
 * The jobs run for real, as far as this machine allows: a service is started from the exact
 * command line its job gives the Nomad client (only sockets, directories, the listen address and
 * ports are moved to scratch values), and the job's health check command is run against it, as
 * Consul would, while it serves and after it stopped.
 */

const launcherBuilt = existsSync(join(repoRoot, 'dist/tools/sbx/src/main.js'));
const healthCommand = commands.find((c) => c.name === 'health');
const healthBuilt = healthCommand !== undefined && existsSync(join(repoRoot, 'dist', `${healthCommand.module}.js`));

if (!launcherBuilt) console.warn('nomad: live job checks skipped: dist/ is not built (bash scripts/build.sh)');
if (!healthCommand) {
  console.warn(
    'nomad: health check run skipped: the uffd-server, block-server, net-agent and dns jobs run ' +
      '`sbx health <socket>` as their Consul script check, and tools/sbx/src/commands.ts has no `health` ' +
      'command yet (needed: grpc.health.v1 Check on the socket; exit 0 when SERVING, 2 otherwise)',
  );
}

const children: ChildProcess[] = [];
const dirs: string[] = [];

afterEach(() => {
  for (const child of children.splice(0))
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** The task's argv with option values replaced; `required` options must be in the job. */
function withOptions(task: TaskSpec, required: Record<string, string>, ifPresent: Record<string, string>): string[] {
  const args = [...task.args];
  for (const [flag, value] of Object.entries({ ...required, ...ifPresent })) {
    const at = args.indexOf(flag);
    if (at < 0 && flag in required) throw new Error(`the ${task.name} job passes no ${flag}`);
    if (at >= 0) args[at + 1] = value;
  }
  return args;
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
}

/**
 * Services that can start on a build machine without changing the host (net-agent would build its
 * slot pool in the host's network, the orchestrator needs all the others), with what each needs
 * moved out of the node's real paths and ports.
 */
const runnable: { service: NodeService; scratch: (dir: string) => Record<string, string> }[] = [
  {
    service: nodeServices.find((s) => s.service === 'dns')!,
    scratch: (dir) => ({ '--control-socket': join(dir, 'control.sock'), '--listen': '127.0.0.1:0' }),
  },
  {
    service: nodeServices.find((s) => s.service === 'uffd-server')!,
    scratch: (dir) => ({ '--control-socket': join(dir, 'control.sock') }),
  },
  {
    service: nodeServices.find((s) => s.service === 'block-server')!,
    scratch: (dir) => ({ '--control-socket': join(dir, 'control.sock'), '--data-dir': join(dir, 'data') }),
  },
];

async function startFromJob(svc: NodeService, scratch: (dir: string) => Record<string, string>) {
  const job = await loadJob(svc.jobFile, { sbx_root: repoRoot });
  const group = job.groups[0]!;
  const task = group.tasks[0]!;
  const dir = mkdtempSync(join(tmpdir(), `nomad-${svc.service}-`));
  dirs.push(dir);
  const replaced = scratch(dir);
  const socket = replaced[svc.socketFlag]!;
  const args = withOptions(task, replaced, { '--metrics-host': '127.0.0.1', '--metrics-port': '0' });
  // Nomad interpolates its runtime directories into the task's env and renders the templates
  // into secrets/ before the start: do the same (the template renders empty without variables).
  const secrets = join(dir, 'secrets');
  mkdirSync(secrets);
  writeFileSync(join(secrets, 'sbx.env'), '');
  const env = Object.fromEntries(
    Object.entries(task.env ?? {}).map(([k, v]) => [k, String(v).replaceAll('${NOMAD_SECRETS_DIR}', secrets)]),
  );
  const child = spawn(task.command, args, {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { PATH: process.env['PATH'], ...env },
  });
  children.push(child);
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    await waitForServing(socket, 20_000);
  } catch (err) {
    throw new Error(`${svc.service} started from its job did not serve: ${(err as Error).message}\n${stderr}`, {
      cause: err,
    });
  }
  return { group, task, socket, child };
}

describe.each(runnable)('the $service.service job on this machine', ({ service, scratch }) => {
  it.skipIf(!launcherBuilt)('its command line starts the service serving grpc.health.v1 on its socket', async () => {
    const { child } = await startFromJob(service, scratch);
    child.kill('SIGTERM');
    // A clean SIGTERM exit within the job's kill_timeout is what Nomad's stop relies on.
    expect(await exited(child)).toBe(0);
  });

  it.skipIf(!launcherBuilt || !healthBuilt)(
    'its script check passes while the service serves and is critical once it stopped',
    async () => {
      const { group, task, socket, child } = await startFromJob(service, scratch);
      const check = task.services.flatMap((s) => s.checks).find((c) => c.type === 'script')!;
      const jobSocket = flagValue(group.tasks[0]!.args, service.socketFlag);
      const args = check.args.map((a) => (a === jobSocket ? socket : a));
      expect(args).toContain(socket);
      const passing = spawnSync(check.command!, args, { encoding: 'utf8', timeout: 20_000 });
      expect(passing.status, passing.stderr).toBe(0);

      child.kill('SIGTERM');
      await exited(child);
      const failing = spawnSync(check.command!, args, { encoding: 'utf8', timeout: 20_000 });
      // Consul: 0 passing, 1 warning, anything else critical.
      expect(failing.status).not.toBe(0);
      expect(failing.status).not.toBe(1);
    },
  );
});
