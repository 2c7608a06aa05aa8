import { z } from 'zod';

/** What a schema field says about itself, found through its optional/default/pipe wrappers. */
export interface FieldInfo {
  /** The innermost type (ZodString, ZodEnum, ZodArray, ...). */
  core: z.ZodType | undefined;
  description: string | undefined;
  /** Node-wide environment names read after the service's own (`.meta({ aliases })`). */
  aliases: string[];
  hasDefault: boolean;
  defaultValue: unknown;
}

interface Def {
  type?: string;
  innerType?: z.ZodType;
  in?: z.ZodType;
  out?: { def?: { type?: string } };
  defaultValue?: unknown;
}

export function fieldInfo(field: unknown): FieldInfo {
  const info: FieldInfo = {
    core: undefined,
    description: undefined,
    aliases: [],
    hasDefault: false,
    defaultValue: undefined,
  };
  let current = field as z.ZodType | undefined;
  for (let depth = 0; depth < 8 && current; depth++) {
    const meta = (current.meta() ?? {}) as { description?: string; aliases?: string[] };
    info.description ??= meta.description;
    if (info.aliases.length === 0 && meta.aliases) info.aliases = meta.aliases;
    const def = (current as unknown as { def: Def }).def;
    if (def.type === 'default' && !info.hasDefault) {
      info.hasDefault = true;
      info.defaultValue = def.defaultValue;
    }
    // A string→boolean pipe (z.stringbool()) is the field's type itself, not a wrapper.
    const inner = def.out?.def?.type === 'boolean' ? undefined : (def.innerType ?? def.in);
    if (!inner) break;
    current = inner;
  }
  info.core = current;
  return info;
}

export function kebab(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '-' + c.toLowerCase());
}

export function snake(key: string): string {
  return key.replace(/[A-Z]/g, (c) => '_' + c).toUpperCase();
}
