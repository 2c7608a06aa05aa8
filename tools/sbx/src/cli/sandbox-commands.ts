import { randomUUID } from 'node:crypto';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { dial, unary } from '#grpc';
import { SandboxServiceClient, type SandboxConfig } from '#proto/orchestrator';
import { printObject, printRows } from './output-format.js';
import { resolveGrpcAddress } from './node-target.js';

// The operator commands over the upstream SandboxService (proto/orchestrator.proto): what a
// control plane does, by hand.

const common = {
  addr: { type: 'string' },
  'data-dir': { type: 'string' },
  json: { type: 'boolean', default: false },
  help: { type: 'boolean', default: false },
} as const satisfies ParseArgsConfig['options'];

const targetHelp = `  --addr <host:port>   the node's SandboxService (default: the local node under --data-dir)
  --data-dir <dir>     local node data directory (default .sbx/node in the checkout, or $SBX_DATA_DIR)
  --json               machine-readable output`;

type Values = Record<string, string | boolean | string[] | undefined>;

async function withClient<T>(values: Values, run: (client: SandboxServiceClient) => Promise<T>): Promise<T> {
  const address = await resolveGrpcAddress({
    addr: values['addr'] as string | undefined,
    dataDir: values['data-dir'] as string | undefined,
  });
  const client = dial(SandboxServiceClient, address);
  try {
    return await run(client);
  } finally {
    client.close();
  }
}

function parse(argv: string[], options: ParseArgsConfig['options'], usage: string) {
  const parsed = parseArgs({ args: argv, options: { ...common, ...options }, allowPositionals: true, strict: true });
  if (parsed.values.help) {
    console.log(usage);
    return undefined;
  }
  return parsed as { values: Values; positionals: string[] };
}

function positional(positionals: string[], name: string, usage: string): string {
  const value = positionals[0];
  if (!value) throw new Error(`missing <${name}>\n\n${usage}`);
  return value;
}

const createUsage = `usage: ./sbx create [--template base] [--build <buildId>] [--id <sandboxId>] [--vcpu 1] [--ram-mb 128]
                  [--timeout <seconds>] [--env KEY=VALUE]... [--auto-pause]
${targetHelp}`;

export async function createMain(argv: string[]): Promise<number> {
  const args = parse(
    argv,
    {
      template: { type: 'string', default: 'base' },
      build: { type: 'string', default: '' },
      id: { type: 'string' },
      vcpu: { type: 'string', default: '1' },
      'ram-mb': { type: 'string', default: '128' },
      timeout: { type: 'string', default: '3600' },
      env: { type: 'string', multiple: true, default: [] },
      'auto-pause': { type: 'boolean', default: false },
    },
    createUsage,
  );
  if (!args) return 0;
  const v = args.values;
  const sandboxId = (v['id'] as string | undefined) ?? `sbx-${randomUUID().slice(0, 8)}`;
  const envVars = Object.fromEntries(
    (v['env'] as string[]).map((kv) => {
      const eq = kv.indexOf('=');
      if (eq <= 0) throw new Error(`--env takes KEY=VALUE, got "${kv}"`);
      return [kv.slice(0, eq), kv.slice(eq + 1)];
    }),
  );
  const config = sandboxConfig({
    templateId: v['template'] as string,
    buildId: v['build'] as string,
    sandboxId,
    vcpu: Number(v['vcpu']),
    ramMb: Number(v['ram-mb']),
    envVars,
    autoPause: v['auto-pause'] as boolean,
  });
  const started = performance.now();
  const res = await withClient(v, (c) =>
    unary(c, c.create, { sandbox: config, startTime: new Date(), endTime: endTime(Number(v['timeout'])) }, 120_000),
  );
  printObject(
    { sandboxId, clientId: res.clientId, template: config.templateId, ms: Math.round(performance.now() - started) },
    v['json'] as boolean,
  );
  return 0;
}

const listUsage = `usage: ./sbx list\n${targetHelp}`;

export async function listMain(argv: string[]): Promise<number> {
  const args = parse(argv, {}, listUsage);
  if (!args) return 0;
  const res = await withClient(args.values, (c) => unary(c, c.list, {}));
  const rows = res.sandboxes.map((s) => ({
    sandboxId: s.config?.sandboxId,
    template: s.config?.templateId,
    build: s.config?.buildId,
    vcpu: s.config?.vcpu,
    ramMb: s.config?.ramMb,
    clientId: s.clientId,
    started: s.startTime,
    ends: s.endTime,
  }));
  printRows(
    rows,
    ['sandboxId', 'template', 'build', 'vcpu', 'ramMb', 'started', 'ends'],
    args.values['json'] as boolean,
  );
  return 0;
}

const pauseUsage = `usage: ./sbx pause <sandboxId> [--template <id>] [--build <newBuildId>]
Pauses the sandbox into a new build (a fresh UUID unless --build is given) and prints it;
./sbx resume <sandboxId> --build <that id> brings it back.
${targetHelp}`;

export async function pauseMain(argv: string[]): Promise<number> {
  const args = parse(argv, { template: { type: 'string' }, build: { type: 'string' } }, pauseUsage);
  if (!args) return 0;
  const sandboxId = positional(args.positionals, 'sandboxId', pauseUsage);
  const buildId = (args.values['build'] as string | undefined) ?? randomUUID();
  const started = performance.now();
  await withClient(args.values, async (c) => {
    const templateId =
      (args.values['template'] as string | undefined) ??
      (await unary(c, c.list, {})).sandboxes.find((s) => s.config?.sandboxId === sandboxId)?.config?.templateId ??
      '';
    await unary(c, c.pause, { sandboxId, templateId, buildId }, 300_000);
  });
  printObject({ sandboxId, buildId, ms: Math.round(performance.now() - started) }, args.values['json'] as boolean);
  return 0;
}

const resumeUsage = `usage: ./sbx resume <sandboxId> --build <buildId> [--template <id>] [--timeout <seconds>]
${targetHelp}`;

export async function resumeMain(argv: string[]): Promise<number> {
  const args = parse(
    argv,
    {
      build: { type: 'string' },
      template: { type: 'string', default: 'base' },
      vcpu: { type: 'string', default: '1' },
      'ram-mb': { type: 'string', default: '128' },
      timeout: { type: 'string', default: '3600' },
    },
    resumeUsage,
  );
  if (!args) return 0;
  const v = args.values;
  const sandboxId = positional(args.positionals, 'sandboxId', resumeUsage);
  const buildId = v['build'] as string | undefined;
  if (!buildId) throw new Error(`--build is required (the id pause printed)\n\n${resumeUsage}`);
  const config = sandboxConfig({
    templateId: v['template'] as string,
    buildId,
    sandboxId,
    vcpu: Number(v['vcpu']),
    ramMb: Number(v['ram-mb']),
    snapshot: true,
  });
  const started = performance.now();
  const res = await withClient(v, (c) =>
    unary(c, c.create, { sandbox: config, startTime: new Date(), endTime: endTime(Number(v['timeout'])) }, 120_000),
  );
  printObject(
    { sandboxId, buildId, clientId: res.clientId, ms: Math.round(performance.now() - started) },
    v['json'] as boolean,
  );
  return 0;
}

const killUsage = `usage: ./sbx kill <sandboxId>\n${targetHelp}`;

export async function killMain(argv: string[]): Promise<number> {
  const args = parse(argv, {}, killUsage);
  if (!args) return 0;
  const sandboxId = positional(args.positionals, 'sandboxId', killUsage);
  await withClient(args.values, (c) => unary(c, c.delete, { sandboxId }, 60_000));
  printObject({ sandboxId, killed: true }, args.values['json'] as boolean);
  return 0;
}

const timeoutUsage = `usage: ./sbx set-timeout <sandboxId> <seconds>
Sets the sandbox's end time to now + seconds (it is then killed, or paused with auto-pause).
${targetHelp}`;

export async function setTimeoutMain(argv: string[]): Promise<number> {
  const args = parse(argv, {}, timeoutUsage);
  if (!args) return 0;
  const sandboxId = positional(args.positionals, 'sandboxId', timeoutUsage);
  const seconds = Number(args.positionals[1]);
  if (!Number.isFinite(seconds) || seconds <= 0)
    throw new Error(`<seconds> must be a positive number\n\n${timeoutUsage}`);
  const end = endTime(seconds);
  await withClient(args.values, (c) => unary(c, c.update, { sandboxId, endTime: end }));
  printObject({ sandboxId, endTime: end }, args.values['json'] as boolean);
  return 0;
}

const buildsUsage = `usage: ./sbx builds   (the builds cached on the node, with their expiry)\n${targetHelp}`;

export async function buildsMain(argv: string[]): Promise<number> {
  const args = parse(argv, {}, buildsUsage);
  if (!args) return 0;
  const res = await withClient(args.values, (c) => unary(c, c.listCachedBuilds, {}));
  printRows(
    res.builds.map((b) => ({ buildId: b.buildId, expires: b.expirationTime })),
    ['buildId', 'expires'],
    args.values['json'] as boolean,
  );
  return 0;
}

function endTime(seconds: number): Date {
  if (!Number.isFinite(seconds) || seconds <= 0) throw new Error(`--timeout must be a positive number of seconds`);
  return new Date(Date.now() + seconds * 1000);
}

function sandboxConfig(fields: Partial<SandboxConfig> & { sandboxId: string; templateId: string }): SandboxConfig {
  return {
    templateId: fields.templateId,
    buildId: fields.buildId ?? '',
    kernelVersion: '',
    firecrackerVersion: '',
    hugePages: false,
    sandboxId: fields.sandboxId,
    envVars: fields.envVars ?? {},
    metadata: fields.metadata ?? {},
    envdVersion: '',
    vcpu: fields.vcpu ?? 1,
    ramMb: fields.ramMb ?? 128,
    teamId: '',
    maxSandboxLength: 24,
    totalDiskSizeMb: 0,
    snapshot: fields.snapshot ?? false,
    baseTemplateId: fields.templateId,
    autoPause: fields.autoPause ?? false,
  };
}
