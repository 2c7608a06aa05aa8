import { readFileSync } from 'node:fs';

/**
 * Settings rendered by a Nomad template into a file (`KEY=value` lines, a `"…"` value
 * JSON-quoted, blank and `#` lines skipped), named by SBX_ENV_FILE and read at every start.
 * Not Nomad's own `env = true`: Nomad 1.10 builds a task's environment once, so a task restarted
 * with `nomad alloc restart` after `nomad var put` kept the old settings although the file had
 * been rendered again. A variable already in the environment (the job's own `env`) wins.
 */
export function loadEnvFile(env: NodeJS.ProcessEnv = process.env): void {
  const path = env['SBX_ENV_FILE'];
  if (!path) return;
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new Error(`SBX_ENV_FILE ${path}: ${(err as Error).message}`, { cause: err });
  }
  for (const [key, value] of Object.entries(parseEnvFile(text, path))) env[key] ??= value;
}

export function parseEnvFile(text: string, path = 'env file'): Record<string, string> {
  const out: Record<string, string> = {};
  text.split('\n').forEach((line, i) => {
    const trimmed = line.trim();
    if (trimmed === '' || trimmed.startsWith('#')) return;
    const eq = trimmed.indexOf('=');
    const key = trimmed.slice(0, Math.max(eq, 0));
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(key))
      throw new Error(`${path}:${i + 1}: not KEY=value: ${JSON.stringify(line)}`);
    const raw = trimmed.slice(eq + 1);
    try {
      out[key] = raw.startsWith('"') ? (JSON.parse(raw) as string) : raw;
    } catch {
      throw new Error(`${path}:${i + 1}: ${key}: a quoted value must be a JSON string: ${raw}`);
    }
  });
  return out;
}
