import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { waitForServing } from '#grpc';
import { commands } from '../../../tools/sbx/src/commands.js';
import { loadJob, type TaskSpec } from './nomad-job.js';
import { flagValue, nodeServices, repoRoot } from './node-services.js';

/**
 * The jobs run for real, as far as this machine allows: a service is started from the exact
 * command line its job gives the Nomad client (only the socket, listen address and ports are moved
 * to scratch values), and the job's health check command is run against it, as Consul would, while
 * it serves and after it stopped.
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

/** The task's argv with some option values replaced, every replaced option required to be there. */
function withOptions(task: TaskSpec, replace: Record<string, string>): string[] {
  const args = [...task.args];
  for (const [flag, value] of Object.entries(replace)) {
    const at = args.indexOf(flag);
    if (at < 0) throw new Error(`the ${task.name} job passes no ${flag}`);
    args[at + 1] = value;
  }
  return args;
}

function exited(child: ChildProcess): Promise<number | null> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve(child.exitCode);
    else child.once('exit', (code) => resolve(code));
  });
}

async function startDnsFromJob(): Promise<{ task: TaskSpec; socket: string; child: ChildProcess }> {
  const dns = nodeServices.find((s) => s.service === 'dns')!;
  const job = await loadJob(dns.jobFile, { sbx_root: repoRoot });
  const task = job.groups[0]!.tasks[0]!;
  const dir = mkdtempSync(join(tmpdir(), 'nomad-dns-'));
  dirs.push(dir);
  const socket = join(dir, 'dns.sock');
  const args = withOptions(task, {
    [dns.socketFlag]: socket,
    '--listen': '127.0.0.1:0',
    '--metrics-host': '127.0.0.1',
    '--metrics-port': '0',
  });
  const child = spawn(task.command, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(child);
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  try {
    await waitForServing(socket, 20_000);
  } catch (err) {
    throw new Error(`dns started from the job did not serve: ${(err as Error).message}\n${stderr}`, { cause: err });
  }
  return { task, socket, child };
}

describe('jobs run on this machine', () => {
  it.skipIf(!launcherBuilt)('the dns job’s command line starts dns serving grpc.health.v1 on its socket', async () => {
    const { child } = await startDnsFromJob();
    child.kill('SIGTERM');
    // A clean SIGTERM exit within the job's kill_timeout is what Nomad's stop relies on.
    expect(await exited(child)).toBe(0);
  });

  it.skipIf(!launcherBuilt || !healthBuilt)(
    'the dns job’s script check passes while dns serves and is critical once it stopped',
    async () => {
      const { task, socket, child } = await startDnsFromJob();
      const check = task.services.flatMap((s) => s.checks).find((c) => c.type === 'script')!;
      const args = check.args.map((a) => (a === flagValue(task.args, '--control-socket') ? socket : a));
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
