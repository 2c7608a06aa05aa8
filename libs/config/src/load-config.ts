import { parseArgs } from 'node:util';
import { z } from 'zod';
import { fieldInfo, kebab, snake } from './config-field.js';

/** Raised when flags or environment do not satisfy a service's schema; names every bad field. */
export class ConfigInvalid extends Error {
  readonly code = 'CONFIG_INVALID';
  constructor(
    readonly service: string,
    readonly issues: string[],
  ) {
    super(`${service}: invalid configuration: ${issues.join('; ')}`);
    this.name = 'ConfigInvalid';
  }
}

export interface ConfigSource {
  /** Command-line arguments after the subcommand (`--socket /x`, `--socket=/x`). */
  argv?: string[];
  env?: NodeJS.ProcessEnv;
}

/**
 * Reads one service's configuration from flags and environment through its zod schema.
 * Each schema key `fooBar` is read from `--foo-bar` first, then from `${envPrefix}FOO_BAR`, then
 * from the node-wide names the field lists in its meta (`.meta({ aliases: ['SBX_BUCKET'] })`),
 * then the schema default. A variable set to the empty string counts as unset, whatever its
 * name; an empty flag (`--zone ''`) is a value and goes to the schema as given.
 * Repeated flags become arrays when the schema field is an array (comma-separated in env).
 */
export function loadConfig<S extends z.ZodObject>(
  service: string,
  schema: S,
  envPrefix: string,
  source: ConfigSource = {},
): z.infer<S> {
  const env = source.env ?? process.env;
  const keys = Object.keys(schema.shape);
  const options: Record<string, { type: 'string'; multiple: boolean }> = {};
  for (const key of keys) {
    options[kebab(key)] = { type: 'string', multiple: isArrayField(schema.shape[key]) };
  }
  let flags: Record<string, string | string[] | undefined>;
  try {
    flags = parseArgs({ args: source.argv ?? [], options, strict: true, allowPositionals: false }).values as Record<
      string,
      string | string[] | undefined
    >;
  } catch (err) {
    throw new ConfigInvalid(service, [(err as Error).message]);
  }
  const raw: Record<string, unknown> = {};
  for (const key of keys) {
    const flag = flags[kebab(key)];
    const names = [envPrefix + snake(key), ...fieldInfo(schema.shape[key]).aliases];
    const fromEnv = names.map((name) => env[name]).find((value) => value !== undefined && value !== '');
    if (flag !== undefined) raw[key] = flag;
    else if (fromEnv !== undefined) {
      raw[key] = isArrayField(schema.shape[key]) ? fromEnv.split(',').map((v) => v.trim()) : fromEnv;
    }
  }
  const parsed = schema.safeParse(raw);
  if (!parsed.success) {
    throw new ConfigInvalid(
      service,
      parsed.error.issues.map((issue) => {
        const key = String(issue.path[0] ?? '');
        const where = key ? `--${kebab(key)} / ${envPrefix}${snake(key)}` : 'config';
        return `${where}: ${issue.message}`;
      }),
    );
  }
  return parsed.data;
}

/** The effective configuration for the start-up log line, with secrets masked. */
export function describeConfig(config: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(config)) {
    out[key] = /secret|password|token|credential|key$/i.test(key) && value ? '***' : value;
  }
  return out;
}

function isArrayField(field: unknown): boolean {
  return fieldInfo(field).core instanceof z.ZodArray;
}
