import { parseArgs } from 'node:util';
import { z } from 'zod';

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
 * Each schema key `fooBar` is read from `--foo-bar` first, then from `${envPrefix}FOO_BAR`.
 * Repeated flags become arrays when the schema field is an array.
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
    const fromEnv = env[envPrefix + snake(key)];
    if (flag !== undefined) raw[key] = flag;
    else if (fromEnv !== undefined && fromEnv !== '') {
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
  let current = field as z.ZodType | undefined;
  // Unwrap optional/default/pipe wrappers to find an array underneath.
  for (let i = 0; i < 5 && current; i++) {
    if (current instanceof z.ZodArray) return true;
    const def = (current as unknown as { def?: { innerType?: z.ZodType; in?: z.ZodType } }).def;
    current = def?.innerType ?? def?.in;
  }
  return false;
}

function kebab(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

function snake(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase();
}
