import { getReferencesInExpression } from '@cdktf/hcl2json';
import { isRuntimeReference, labeled, strings } from './nomad-job.js';

/**
 * The seed's outage: `command = "${PCLOUD_HOME}/..."` in a Nomad job. HCL is not a shell; Nomad
 * expands only its own variables, so the task looked for a file literally named `${PCLOUD_HOME}/...`.
 * This audit lists every interpolation in a parsed job file that Nomad would not fill in: a
 * reference that is neither a declared job variable nor a Nomad runtime variable, a dynamic-block
 * iterator used outside its block, a function we do not expect, and shell syntax ($VAR) that HCL
 * passes through untouched.
 */
export interface Finding {
  path: string;
  text: string;
  problem: string;
}

/** Functions our jobs use; anything else is worth a second look before it ships. */
const KNOWN_FUNCTIONS = new Set(['join', 'range']);

export async function auditInterpolations(file: string, parsed: Record<string, unknown>): Promise<Finding[]> {
  const declared = new Set(labeled(parsed, 'variable').keys());
  const findings: Finding[] = [];
  const jobBlocks = parsed['job'];
  for (const { path, value } of strings(jobBlocks, ['job'])) {
    const where = path.join('.');
    const inTemplateData = path.includes('template') && path[path.length - 1] === 'data';
    const shellText = inTemplateData ? value.replace(/\{\{[\s\S]*?\}\}/g, '') : value;
    if (/\$(?!\{)[A-Za-z_]/.test(shellText)) {
      findings.push({ path: where, text: value, problem: 'shell-style $VAR: HCL and Nomad leave it as literal text' });
    }
    if (/(^|[^%])%\{/.test(value)) {
      findings.push({ path: where, text: value, problem: 'HCL template directive %{ (escape as %%{)' });
    }
    if (!value.includes('${')) continue;
    for (const fn of value.matchAll(/([A-Za-z_][A-Za-z0-9_]*)\(/g)) {
      if (isInsideInterpolation(value, fn.index) && !KNOWN_FUNCTIONS.has(fn[1]!)) {
        findings.push({ path: where, text: value, problem: `unexpected function ${fn[1]}()` });
      }
    }
    const refs = await getReferencesInExpression(file, value);
    for (const { value: ref } of refs) {
      const problem = classify(ref, declared, path);
      if (problem) findings.push({ path: where, text: value, problem });
    }
  }
  return findings;
}

function classify(ref: string, declared: Set<string>, path: string[]): string | undefined {
  const variable = /^var\.([A-Za-z_][A-Za-z0-9_]*)/.exec(ref);
  if (variable) return declared.has(variable[1]!) ? undefined : `var.${variable[1]} is not declared in this job`;
  if (/^group\.(key|value)$/.test(ref)) {
    return path.includes('dynamic') ? undefined : `${ref} outside a dynamic "group" block`;
  }
  if (isRuntimeReference(ref)) return undefined;
  return `\${${ref}} is neither a declared job variable nor a Nomad runtime variable`;
}

function isInsideInterpolation(text: string, index: number): boolean {
  const open = text.lastIndexOf('${', index);
  return open >= 0 && text.indexOf('}', open) > index;
}
