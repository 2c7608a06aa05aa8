import { z } from 'zod';
import { fieldInfo, kebab, snake } from './config-field.js';

/**
 * The flag list of `--help`, made from the schema so it cannot drift from it: each flag with its
 * values, its description (`.describe()`), default and the environment names it is read from.
 */
export function describeFlags(schema: z.ZodObject, envPrefix: string): string {
  const rows = Object.entries(schema.shape).map(([key, field]) => {
    const info = fieldInfo(field);
    const notes: string[] = [];
    if (info.hasDefault) notes.push(`default ${showDefault(info.defaultValue)}`);
    if (info.aliases.length) notes.push(`also ${info.aliases.join(', ')}`);
    const text = [info.description, notes.length ? `(${notes.join('; ')})` : ''].filter(Boolean).join(' ');
    return { flag: `--${kebab(key)} ${valueHint(info.core)}`, text, env: envPrefix + snake(key) };
  });
  const width = Math.min(30, Math.max(...rows.map((r) => r.flag.length)));
  return [
    `flags (each also read from the environment as ${envPrefix}<FLAG>, e.g. ${rows[0]?.env ?? envPrefix}):`,
    ...rows.map((r) => `  ${r.flag.padEnd(width)}  ${r.text}`.trimEnd()),
  ].join('\n');
}

function valueHint(core: z.ZodType | undefined): string {
  if (core instanceof z.ZodEnum) return (core.options as string[]).join('|');
  if (hintOf(core) === 'true|false') return 'true|false';
  if (core instanceof z.ZodArray) return `<${hintOf(core.element as z.ZodType)}> (repeatable)`;
  return `<${hintOf(core)}>`;
}

function hintOf(core: z.ZodType | undefined): string {
  const def = (core as unknown as { def?: { type?: string; out?: z.ZodType } } | undefined)?.def;
  if (def?.type === 'number') return 'n';
  if (def?.type === 'pipe' && (def.out as unknown as { def: { type: string } }).def.type === 'boolean') {
    return 'true|false';
  }
  return 'value';
}

function showDefault(value: unknown): string {
  if (Array.isArray(value)) return value.length ? value.join(',') : 'none';
  if (value === '') return "''";
  return String(value);
}
