import { readFileSync } from 'node:fs';
import { parse } from '@cdktf/hcl2json';

/**
 * A Nomad job file read the way `nomad job run -var-file=...` reads it, far enough to check what
 * each task will run: the HCL is parsed by a real HCL parser (@cdktf/hcl2json), `dynamic "group"`
 * blocks are expanded, and the job's own variables (`var.x`, `join(",", var.x)`) are evaluated.
 * Nomad's runtime interpolations (`${NOMAD_PORT_x}`, `${node.unique.id}`, ...) are left in place:
 * the client fills them in on the node. Any other expression form is refused rather than guessed.
 */

type Hcl = Record<string, unknown>;

export interface VariableSpec {
  name: string;
  type: string;
  default: unknown;
  raw: Hcl;
}

export interface CheckSpec {
  name: string;
  type: string;
  command?: string;
  args: string[];
  port?: string;
  path?: string;
  interval?: string;
  timeout?: string;
  checkRestart?: Hcl;
}

export interface ServiceSpec {
  name: string;
  port: string;
  /** Advertised address when it is not the address of the port's host network. */
  address?: string;
  tags: string[];
  meta: Record<string, string>;
  checks: CheckSpec[];
}

export interface TemplateSpec {
  data: string;
  destination: string;
  env: boolean;
  changeMode: string;
}

export interface TaskSpec {
  name: string;
  driver: string;
  command: string;
  args: string[];
  env: Record<string, string>;
  templates: TemplateSpec[];
  services: ServiceSpec[];
  resources: { cpu: number; memory: number };
  killSignal?: string;
  killTimeout?: string;
  shutdownDelay?: string;
  raw: Hcl;
}

export interface PortSpec {
  label: string;
  static?: number;
}

export interface GroupSpec {
  name: string;
  ports: PortSpec[];
  restart: Hcl | undefined;
  tasks: TaskSpec[];
}

export interface JobSpec {
  file: string;
  id: string;
  type: string;
  variables: Map<string, VariableSpec>;
  groups: GroupSpec[];
  /** The job body as parsed, before expansion and evaluation (for the interpolation audit). */
  rawJob: Hcl;
  /** The whole file as parsed. */
  rawFile: Hcl;
  /** The job body after expansion and evaluation. */
  job: Hcl;
}

/** Thrown when a job uses an expression this reader does not evaluate: widen the reader, never guess. */
export class UnsupportedExpression extends Error {
  readonly code = 'UNSUPPORTED_EXPRESSION';
  constructor(
    readonly file: string,
    readonly expression: string,
  ) {
    super(`${file}: expression ${JSON.stringify(expression)} is not evaluated by the test reader`);
    this.name = 'UnsupportedExpression';
  }
}

export async function parseHclFile(path: string): Promise<Hcl> {
  return (await parse(path, readFileSync(path, 'utf8'))) as Hcl;
}

/** Reads a job file; `overrides` play the part of `-var name=value` / `-var-file`. */
export async function loadJob(path: string, overrides: Record<string, unknown> = {}): Promise<JobSpec> {
  const rawFile = await parseHclFile(path);
  const variables = readVariables(rawFile);
  for (const name of Object.keys(overrides)) {
    if (!variables.has(name)) {
      // What Nomad does with -var / -var-file for an undeclared name (hashicorp/nomad#16136).
      throw new Error(`${path}: variable "${name}" is set but not declared by the job`);
    }
  }
  const values = new Map<string, unknown>();
  for (const [name, spec] of variables) values.set(name, name in overrides ? overrides[name] : spec.default);

  const jobs = labeled(rawFile, 'job');
  if (jobs.size !== 1) throw new Error(`${path}: expected exactly one job block, found ${jobs.size}`);
  const [[id, rawJob]] = [...jobs] as [[string, Hcl]];

  const expanded = expandDynamicGroups(path, rawJob, values);
  const job = evaluate(path, expanded, values) as Hcl;
  const groups = [...labeled(job, 'group')].map(([name, body]) => readGroup(name, body));
  return { file: path, id, type: str(job, 'type') ?? 'service', variables, groups, rawJob, rawFile, job };
}

function readVariables(file: Hcl): Map<string, VariableSpec> {
  const out = new Map<string, VariableSpec>();
  for (const [name, body] of labeled(file, 'variable')) {
    out.set(name, { name, type: str(body, 'type') ?? '', default: body['default'], raw: body });
  }
  return out;
}

/**
 * `dynamic "group" { for_each = ..., labels = [...], content { ... } }` → one `group` per element,
 * with `group.key` (index) and `group.value` (element) substituted, as HCL's dynblock does.
 */
function expandDynamicGroups(file: string, job: Hcl, values: Map<string, unknown>): Hcl {
  const dynamic = job['dynamic'];
  if (dynamic === undefined) return job;
  const out: Hcl = { ...job };
  delete out['dynamic'];
  const groups: Record<string, Hcl[]> = { ...(asObject(job['group'] ?? {}) as Record<string, Hcl[]>) };
  for (const [blockType, specs] of Object.entries(asObject(dynamic))) {
    if (blockType !== 'group') throw new UnsupportedExpression(file, `dynamic "${blockType}"`);
    for (const spec of asArray(specs) as Hcl[]) {
      const forEach = evaluateString(file, String(spec['for_each']), values);
      if (!Array.isArray(forEach)) throw new UnsupportedExpression(file, String(spec['for_each']));
      const items: unknown[] = forEach;
      const labels = asArray(spec['labels']);
      const content = asArray(spec['content'])[0] as Hcl | undefined;
      if (labels.length !== 1 || !content) throw new UnsupportedExpression(file, 'dynamic "group" without one label');
      items.forEach((value, key) => {
        const iter = { key, value };
        const label = String(substituteIterator(file, labels[0], iter));
        if (groups[label]) throw new Error(`${file}: dynamic group label "${label}" is not unique`);
        groups[label] = [substituteIterator(file, content, iter) as Hcl];
      });
    }
  }
  out['group'] = groups;
  return out;
}

function substituteIterator(file: string, node: unknown, iter: { key: number; value: unknown }): unknown {
  if (typeof node === 'string') {
    if (node === '${group.value}') return iter.value;
    if (node === '${group.key}') return iter.key;
    return node.replace(/\$\{group\.(key|value)\}/g, (_, which: string) => {
      const v = which === 'key' ? iter.key : iter.value;
      if (typeof v !== 'string' && typeof v !== 'number') throw new UnsupportedExpression(file, `\${group.${which}}`);
      return String(v);
    });
  }
  if (Array.isArray(node)) return node.map((n) => substituteIterator(file, n, iter));
  if (node && typeof node === 'object') {
    return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, substituteIterator(file, v, iter)]));
  }
  return node;
}

/** Nomad's runtime interpolations: filled in by the client, so kept as they are. */
export function isRuntimeReference(ref: string): boolean {
  return (
    /^NOMAD_[A-Z0-9_]+[A-Za-z0-9_-]*$/.test(ref) ||
    /^node\.(unique\.id|unique\.name|datacenter|class|region|pool)$/.test(ref) ||
    /^attr\.[A-Za-z0-9_.-]+$/.test(ref) ||
    /^meta\.[A-Za-z0-9_.-]+$/.test(ref)
  );
}

function evaluate(file: string, node: unknown, values: Map<string, unknown>): unknown {
  if (typeof node === 'string') return evaluateString(file, node, values);
  if (Array.isArray(node)) return node.map((n) => evaluate(file, n, values));
  if (node && typeof node === 'object') {
    return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, evaluate(file, v, values)]));
  }
  return node;
}

function evaluateString(file: string, text: string, values: Map<string, unknown>): unknown {
  const whole = /^\$\{([^{}]*)\}$/.exec(text);
  if (whole) {
    const value = evaluateExpression(file, whole[1]!, values);
    if (value !== undefined) return value;
  }
  return text.replace(/\$\{([^{}]*)\}/g, (match, expr: string) => {
    const value = evaluateExpression(file, expr, values);
    if (value === undefined) return match;
    if (typeof value !== 'string' && typeof value !== 'number') throw new UnsupportedExpression(file, match);
    return String(value);
  });
}

/** undefined: a runtime interpolation, left for the Nomad client. */
function evaluateExpression(file: string, expr: string, values: Map<string, unknown>): unknown {
  const e = expr.trim();
  if (isRuntimeReference(e)) return undefined;
  let m = /^var\.([A-Za-z_][A-Za-z0-9_]*)$/.exec(e);
  if (m) return variable(file, m[1]!, values);
  m = /^join\("([^"]*)",\s*var\.([A-Za-z_][A-Za-z0-9_]*)\)$/.exec(e);
  if (m) {
    const list = variable(file, m[2]!, values);
    if (!Array.isArray(list)) throw new UnsupportedExpression(file, expr);
    return list.join(m[1]!);
  }
  m = /^range\(var\.([A-Za-z_][A-Za-z0-9_]*)\)$/.exec(e);
  if (m) {
    const n = variable(file, m[1]!, values);
    if (typeof n !== 'number') throw new UnsupportedExpression(file, expr);
    return Array.from({ length: n }, (_, i) => i);
  }
  throw new UnsupportedExpression(file, `\${${expr}}`);
}

function variable(file: string, name: string, values: Map<string, unknown>): unknown {
  if (!values.has(name)) throw new Error(`${file}: var.${name} is not declared`);
  const value = values.get(name);
  if (value === undefined) throw new Error(`${file}: var.${name} has no value and no default`);
  return value;
}

function readGroup(name: string, body: Hcl): GroupSpec {
  const network = asArray(body['network'])[0] as Hcl | undefined;
  const ports = network
    ? Object.entries(asObject(network['port'] ?? {})).map(([label, specs]) => {
        const spec = (asArray(specs)[0] ?? {}) as Hcl;
        return { label, static: typeof spec['static'] === 'number' ? spec['static'] : undefined };
      })
    : [];
  const tasks = [...labeled(body, 'task')].map(([taskName, task]) => readTask(taskName, task));
  return { name, ports, restart: asArray(body['restart'])[0] as Hcl | undefined, tasks };
}

function readTask(name: string, body: Hcl): TaskSpec {
  const config = (asArray(body['config'])[0] ?? {}) as Hcl;
  const resources = (asArray(body['resources'])[0] ?? {}) as Hcl;
  const env = (asArray(body['env'])[0] ?? {}) as Record<string, unknown>;
  return {
    name,
    driver: str(body, 'driver') ?? '',
    command: str(config, 'command') ?? '',
    args: asArray(config['args']).map(String),
    env: Object.fromEntries(Object.entries(env).map(([k, v]) => [k, String(v)])),
    templates: (asArray(body['template']) as Hcl[]).map((t) => ({
      data: str(t, 'data') ?? '',
      destination: str(t, 'destination') ?? '',
      env: t['env'] === true,
      changeMode: str(t, 'change_mode') ?? 'restart',
    })),
    services: (asArray(body['service']) as Hcl[]).map(readService),
    resources: { cpu: Number(resources['cpu'] ?? 0), memory: Number(resources['memory'] ?? 0) },
    killSignal: str(body, 'kill_signal'),
    killTimeout: str(body, 'kill_timeout'),
    shutdownDelay: str(body, 'shutdown_delay'),
    raw: body,
  };
}

function readService(body: Hcl): ServiceSpec {
  const meta = (asArray(body['meta'])[0] ?? {}) as Record<string, unknown>;
  return {
    name: str(body, 'name') ?? '',
    port: str(body, 'port') ?? '',
    address: str(body, 'address'),
    tags: asArray(body['tags']).map(String),
    meta: Object.fromEntries(Object.entries(meta).map(([k, v]) => [k, String(v)])),
    checks: (asArray(body['check']) as Hcl[]).map((c) => ({
      name: str(c, 'name') ?? '',
      type: str(c, 'type') ?? '',
      command: str(c, 'command'),
      args: asArray(c['args']).map(String),
      port: str(c, 'port'),
      path: str(c, 'path'),
      interval: str(c, 'interval'),
      timeout: str(c, 'timeout'),
      checkRestart: asArray(c['check_restart'])[0] as Hcl | undefined,
    })),
  };
}

/** Labeled blocks (`job "x" {}`) as hcl2json renders them: `{ job: { x: [body] } }`. */
export function labeled(node: Hcl, key: string): Map<string, Hcl> {
  const out = new Map<string, Hcl>();
  for (const [label, bodies] of Object.entries(asObject(node[key] ?? {}))) {
    const list = asArray(bodies);
    if (list.length !== 1) throw new Error(`block ${key} "${label}" appears ${list.length} times`);
    out.set(label, list[0] as Hcl);
  }
  return out;
}

function str(node: Hcl, key: string): string | undefined {
  const v = node[key];
  return v === undefined ? undefined : String(v);
}

function asArray(v: unknown): unknown[] {
  if (v === undefined) return [];
  return Array.isArray(v) ? v : [v];
}

function asObject(v: unknown): Hcl {
  if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error(`expected an object, got ${JSON.stringify(v)}`);
  return v as Hcl;
}

/** Every string in a parsed HCL tree, with where it sits (for the interpolation audit). */
export function* strings(node: unknown, path: string[] = []): Generator<{ path: string[]; value: string }> {
  if (typeof node === 'string') yield { path, value: node };
  else if (Array.isArray(node)) for (const [i, n] of node.entries()) yield* strings(n, [...path, String(i)]);
  else if (node && typeof node === 'object') {
    for (const [k, v] of Object.entries(node)) yield* strings(v, [...path, k]);
  }
}

/** Duration in Nomad's notation ("30s", "1m30s", "500ms") → milliseconds. */
export function durationMs(text: string): number {
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h)/g;
  let total = 0;
  let consumed = 0;
  for (const m of text.matchAll(re)) {
    total += Number(m[1]) * { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[m[2] as 'ms' | 's' | 'm' | 'h'];
    consumed += m[0].length;
  }
  if (consumed !== text.length || consumed === 0) throw new Error(`not a duration: ${JSON.stringify(text)}`);
  return total;
}
