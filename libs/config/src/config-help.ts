import { z } from 'zod';
import { fieldInfo, kebab, type FieldDef } from './config-field.js';

/**
 * The flag list of `--help`, made from the schema so it cannot drift from it: each flag with its
 * values, its description (`.describe()`), default and the node-wide variables it also reads.
 */
export function describeFlags(schema: z.ZodObject, envPrefix: string): string {
  const rows = Object.entries(schema.shape).map(([key, field]) => {
    const info = fieldInfo(field);
    const notes = [
      info.default ? `default ${showDefault(info.default.value)}` : '',
      info.aliases.length ? `also ${info.aliases.join(', ')}` : '',
    ].filter(Boolean);
    const text = [info.description, notes.length ? `(${notes.join('; ')})` : ''].filter(Boolean).join(' ');
    return { flag: `--${kebab(key)} ${valueHint(info.core)}`, text };
  });
  const width = Math.min(30, Math.max(...rows.map((r) => r.flag.length)));
  return [
    `flags (each also read from the environment as ${envPrefix}<FLAG>):`,
    ...rows.map((r) => `  ${r.flag.padEnd(width)}  ${r.text}`.trimEnd()),
  ].join('\n');
}

function valueHint(core: z.ZodType): string {
  const def = (core as unknown as { def: FieldDef }).def;
  if (core instanceof z.ZodEnum) return (core.options as string[]).join('|');
  if (def.out?.def?.type === 'boolean') return 'true|false';
  if (core instanceof z.ZodArray) return `${valueHint(core.element as z.ZodType)} (repeatable)`;
  return def.type === 'number' ? '<n>' : '<value>';
}

function showDefault(value: unknown): string {
  if (Array.isArray(value)) return value.length ? value.join(',') : 'none';
  return value === '' ? "''" : String(value);
}
