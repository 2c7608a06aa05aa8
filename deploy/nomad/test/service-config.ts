import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { z } from 'zod';
import { repoRoot } from './node-services.js';

/**
 * A service's own configuration schema, found where every service keeps it
 * (`apps/<service>/src/*-config.ts`, exporting one zod object), so the jobs are checked against
 * the options the service really has rather than against a copy of them.
 */
export type ServiceSchema =
  | { state: 'found'; file: string; exportName: string; schema: z.ZodObject }
  | { state: 'missing'; reason: string }
  | { state: 'broken'; reason: string };

export async function findServiceSchema(service: string): Promise<ServiceSchema> {
  const dir = join(repoRoot, 'apps', service, 'src');
  const files = existsSync(dir)
    ? readdirSync(dir).filter((f) => f.endsWith('-config.ts') && !f.endsWith('.test.ts'))
    : [];
  if (files.length === 0) return { state: 'missing', reason: `apps/${service}/src has no *-config.ts yet` };
  const candidates: { file: string; exportName: string; schema: z.ZodObject }[] = [];
  for (const name of files) {
    const file = join(dir, name);
    let mod: Record<string, unknown>;
    try {
      mod = (await import(/* @vite-ignore */ file)) as Record<string, unknown>;
    } catch (err) {
      return { state: 'broken', reason: `apps/${service}/src/${name} does not load: ${(err as Error).message}` };
    }
    for (const [exportName, value] of Object.entries(mod)) {
      if (value instanceof z.ZodObject) candidates.push({ file, exportName, schema: value });
    }
  }
  // The `serve` schema: named after the service (dnsConfigSchema), or the service-mode one of a
  // service that has other modes too (block-server's serviceConfigSchema beside standalone).
  const preferred = [`${flagKey(`--${service}`)}ConfigSchema`, 'serviceConfigSchema'];
  for (const exportName of preferred) {
    const hit = candidates.find((c) => c.exportName === exportName);
    if (hit) return { state: 'found', ...hit };
  }
  if (candidates.length === 1) return { state: 'found', ...candidates[0]! };
  return {
    state: 'missing',
    reason: `apps/${service}/src has ${candidates.length} zod object schemas and none is named ${preferred.join(' or ')}`,
  };
}

/** `--control-socket` → `controlSocket`, the schema key loadConfig reads the flag into. */
export function flagKey(flag: string): string {
  return flag.replace(/^--/, '').replace(/-([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}

/** `SBX_DNS_CONTROL_SOCKET` with prefix `SBX_DNS_` → `controlSocket`. */
export function envKey(name: string, prefix: string): string {
  return name
    .slice(prefix.length)
    .toLowerCase()
    .replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
}
