import type { z } from 'zod';

/** What a schema field says about itself, found through its optional/default/pipe wrappers. */
export interface FieldInfo {
  /** The innermost type (ZodString, ZodEnum, ZodArray, a string→boolean pipe). */
  core: z.ZodType;
  description?: string;
  /** Node-wide environment names read after the service's own (`.meta({ aliases })`). */
  aliases: string[];
  default?: { value: unknown };
}

export interface FieldDef {
  type?: string;
  innerType?: z.ZodType;
  in?: z.ZodType;
  out?: { def?: { type?: string } };
  defaultValue?: unknown;
}

export function fieldInfo(field: unknown): FieldInfo {
  const info: FieldInfo = { core: field as z.ZodType, aliases: [] };
  for (let depth = 0; depth < 8; depth++) {
    const meta = (info.core.meta() ?? {}) as { description?: string; aliases?: string[] };
    info.description ??= meta.description;
    if (!info.aliases.length) info.aliases = meta.aliases ?? [];
    const def = (info.core as unknown as { def: FieldDef }).def;
    if (def.type === 'default') info.default ??= { value: def.defaultValue };
    // A string→boolean pipe (z.stringbool()) is the field's type itself, not a wrapper.
    const inner = def.out?.def?.type === 'boolean' ? undefined : (def.innerType ?? def.in);
    if (!inner) break;
    info.core = inner;
  }
  return info;
}

export function kebab(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

export function snake(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase();
}
