import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { loadConfig } from '#config';
import { loadJob, type TemplateSpec } from './nomad-job.js';
import { nodeServices, nomadDir, type NodeService } from './node-services.js';
import { findServiceSchema } from './service-config.js';

/**
 * Each job's env template rendered by Go's text/template (the engine behind consul-template and
 * Nomad's `template` block), with Nomad variables standing in for a cluster's, then read back the
 * way Nomad reads an `env = true` file and handed to the service's own config loader.
 */

const hasGo = spawnSync('go', ['version'], { encoding: 'utf8' }).status === 0;
if (!hasGo) console.warn('nomad: template rendering skipped: no Go toolchain (`go`) on PATH to run text/template');

const schemas = new Map(
  await Promise.all(nodeServices.map(async (s) => [s.service, await findServiceSchema(s.service)] as const)),
);

let renderer = '';
let buildDir = '';

beforeAll(() => {
  if (!hasGo) return;
  buildDir = mkdtempSync(join(tmpdir(), 'nomad-render-'));
  renderer = join(buildDir, 'render-template');
  // Standard library only; the first build on a machine compiles text/template and encoding/json.
  const build = spawnSync('go', ['build', '-o', renderer, join(nomadDir, 'test/render-template.go')], {
    encoding: 'utf8',
    timeout: 170_000,
  });
  if (build.status !== 0) throw new Error(`go build render-template.go failed: ${build.stderr}`);
}, 180_000);

afterAll(() => {
  if (buildDir) rmSync(buildDir, { recursive: true, force: true });
});

function render(template: TemplateSpec, variables: Record<string, Record<string, string>>): string {
  const run = spawnSync(renderer, [], {
    input: JSON.stringify({ template: template.data, variables }),
    encoding: 'utf8',
    timeout: 20_000,
  });
  if (run.status !== 0) throw new Error(run.stderr);
  return run.stdout;
}

/** An `env = true` file as Nomad reads it: KEY=value lines, blank and # lines skipped, "…" JSON-quoted. */
function parseEnvFile(text: string): Record<string, string> {
  const env: Record<string, string> = {};
  for (const line of text.split('\n')) {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) continue;
    const eq = trimmed.indexOf('=');
    if (eq <= 0) throw new Error(`not KEY=value: ${JSON.stringify(line)}`);
    const value = trimmed.slice(eq + 1);
    env[trimmed.slice(0, eq)] = value.startsWith('"') ? (JSON.parse(value) as string) : value;
  }
  return env;
}

async function envTemplate(svc: NodeService): Promise<TemplateSpec> {
  const job = await loadJob(svc.jobFile);
  return job.groups[0]!.tasks[0]!.templates.find((t) => t.env)!;
}

describe.each(nodeServices)('$service env template', (svc) => {
  it.skipIf(!hasGo)('renders nothing when no Nomad variable exists, instead of blocking the task', async () => {
    expect(parseEnvFile(render(await envTemplate(svc), {}))).toEqual({});
  });

  it.skipIf(!hasGo)('turns shared and own items into the service’s variables, any value intact', async () => {
    const tricky = 'p"a#s s\\\nword=1';
    const env = parseEnvFile(
      render(await envTemplate(svc), {
        'nomad/jobs': { bucket: 'gs://templates', cache_dir: '/var/lib/sbx/cache' },
        [`nomad/jobs/${svc.jobId}`]: { log_level: 'debug', consul_token: tricky },
        'nomad/jobs/sbx-some-other-job': { log_level: 'trace' },
      }),
    );
    expect(env).toEqual({
      SBX_BUCKET: 'gs://templates',
      SBX_CACHE_DIR: '/var/lib/sbx/cache',
      [`${svc.envPrefix}LOG_LEVEL`]: 'debug',
      [`${svc.envPrefix}CONSUL_TOKEN`]: tricky,
    });
  });

  const found = schemas.get(svc.service)!;
  if (found.state === 'missing') console.warn(`nomad: ${svc.service}: rendered env not loaded: ${found.reason}`);
  it.skipIf(!hasGo || found.state === 'missing')('produces settings the service’s own loader accepts', async () => {
    if (found.state === 'broken') throw new Error(found.reason);
    if (found.state !== 'found') return;
    const env = parseEnvFile(render(await envTemplate(svc), { [`nomad/jobs/${svc.jobId}`]: { log_level: 'debug' } }));
    const config = loadConfig(svc.service, found.schema, svc.envPrefix, { argv: [], env }) as Record<string, unknown>;
    expect(config['logLevel']).toBe('debug');
  });
});
