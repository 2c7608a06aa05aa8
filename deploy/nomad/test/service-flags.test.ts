import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { loadConfig } from '#config';
import { loadJob, type GroupSpec } from './nomad-job.js';
import { nodeServices, repoRoot } from './node-services.js';
import { envKey, findServiceSchema, flagKey } from './service-config.js';

/**
 * Each job must pass flags and environment the service actually accepts: a misspelt flag is a task
 * that exits at start on every node. The service's own zod schema is loaded and its own loader
 * (`loadConfig`, strict about unknown flags) is run on exactly the argv the job builds, with the
 * Nomad client's runtime values filled in as a node would.
 */

const schemas = new Map(
  await Promise.all(nodeServices.map(async (s) => [s.service, await findServiceSchema(s.service)] as const)),
);
const launcherBuilt = existsSync(join(repoRoot, 'dist/tools/sbx/src/main.js'));

/** What a Nomad client puts in place of its runtime interpolations on one node. */
function fillRuntime(text: string, group: GroupSpec): string {
  const filled = text
    .replace(/\$\{NOMAD_(?:HOST_)?PORT_([A-Za-z0-9_-]+)\}/g, (_, label: string) => {
      const index = group.ports.findIndex((p) => p.label === label);
      if (index < 0) throw new Error(`group ${group.name} declares no port "${label}"`);
      return String(group.ports[index]!.static ?? 23_000 + index);
    })
    .replace(/\$\{NOMAD_(?:HOST_)?IP_[A-Za-z0-9_-]+\}/g, '10.20.30.40')
    .replace(/\$\{node\.unique\.id\}/g, '0b6f1a4e-5c2d-4e8a-9f17-3d2c1b0a9e8f')
    .replace(/\$\{node\.unique\.name\}/g, 'sandbox-node-1')
    .replace(/\$\{NOMAD_SECRETS_DIR\}/g, '/var/lib/nomad/alloc/a1/task/secrets');
  if (filled.includes('${')) throw new Error(`no sample value for a runtime interpolation in ${JSON.stringify(text)}`);
  return filled;
}

describe.each(nodeServices)('$service job against the service', (svc) => {
  const found = schemas.get(svc.service)!;
  if (found.state === 'missing') {
    console.warn(`nomad: ${svc.service}: flag check skipped: ${found.reason}`);
  }

  it.skipIf(found.state === 'missing')('passes only flags the service’s config schema accepts', async () => {
    if (found.state === 'broken') throw new Error(found.reason);
    if (found.state !== 'found') return;
    const job = await loadJob(svc.jobFile);
    for (const group of job.groups) {
      const task = group.tasks[0]!;
      const argv = task.args.slice(2).map((a) => fillRuntime(a, group));
      const env = Object.fromEntries(Object.entries(task.env).map(([k, v]) => [k, fillRuntime(v, group)]));
      // The jobs pass options as `--name value` pairs, which is what loadConfig parses.
      expect(argv.filter((_, i) => i % 2 === 0).every((a) => a.startsWith('--') && !a.includes('='))).toBe(true);
      for (const arg of argv.filter((a) => a.startsWith('--'))) {
        expect(Object.keys(found.schema.shape), `${svc.service} has an option for ${arg}`).toContain(flagKey(arg));
      }
      // Throws ConfigInvalid naming the flag when a name or a value is refused.
      const config = loadConfig(svc.service, found.schema, svc.envPrefix, { argv, env }) as Record<string, unknown>;
      for (let i = 0; i < argv.length; i += 2) {
        const value = config[flagKey(argv[i]!)];
        if (typeof value === 'string') expect(value).toBe(argv[i + 1]);
      }
    }
  });

  it.skipIf(found.state === 'missing')('sets only environment variables the service reads', async () => {
    if (found.state === 'broken') throw new Error(found.reason);
    if (found.state !== 'found') return;
    const job = await loadJob(svc.jobFile);
    for (const task of job.groups.flatMap((g) => g.tasks)) {
      // SBX_ENV_FILE is the launcher's (tools/sbx/src/env-file.ts): the rendered Nomad variables.
      for (const name of Object.keys(task.env).filter((n) => n !== 'SBX_ENV_FILE')) {
        expect(name.startsWith(svc.envPrefix), `${name} carries ${svc.envPrefix}`).toBe(true);
        expect(Object.keys(found.schema.shape), `${svc.service} has a setting for ${name}`).toContain(
          envKey(name, svc.envPrefix),
        );
      }
    }
  });

  if (!launcherBuilt) console.warn('nomad: launcher check skipped: dist/ is not built (bash scripts/build.sh)');
  it.skipIf(!launcherBuilt)('is a command the built launcher runs: ./sbx <service> serve --help', () => {
    const run = spawnSync(join(repoRoot, 'sbx'), [svc.service, 'serve', '--help'], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    expect(run.status, run.stderr).toBe(0);
    expect(run.stdout.length).toBeGreaterThan(0);
  });
});
