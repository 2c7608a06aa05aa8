import { randomUUID } from 'node:crypto';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { dial, unary } from '#grpc';
import { SandboxServiceClient, type SandboxConfig, type SandboxNetworkEgressConfig } from '#proto/orchestrator';
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

const egressHelp = `  --egress-allow <cidr[:port[-port]]|name|*.name>  allowed outbound (repeat; a name is a domain rule)
  --egress-deny <cidr[:port[-port]]>             denied outbound (repeat); an allow match wins
  --no-internet                                  no outbound at all (allow_internet_access = false)`;

const createUsage = `usage: ./sbx create [--template base] [--build <buildId>] [--id <sandboxId>] [--vcpu N] [--ram-mb N]
                  [--timeout <seconds>] [--env KEY=VALUE]... [--auto-pause]
                  [--egress-allow <rule>]... [--egress-deny <rule>]... [--no-internet]
--vcpu and --ram-mb default to 0: the build's own (a snapshot fixes both; other values are refused).
${egressHelp}
${targetHelp}`;

const egressOptions = {
  'egress-allow': { type: 'string', multiple: true, default: [] },
  'egress-deny': { type: 'string', multiple: true, default: [] },
  'no-internet': { type: 'boolean', default: false },
} as const satisfies ParseArgsConfig['options'];

/** The egress flags as E2B's fields: an address rule goes to the CIDR lists, a name to the domains. */
function egressOf(v: Values): { egress?: SandboxNetworkEgressConfig; allowInternetAccess?: boolean } {
  const allow = v['egress-allow'] as string[];
  const deny = v['egress-deny'] as string[];
  const isAddress = (rule: string) => /^[0-9.:/[\]-]+$/.test(rule) && /[0-9]/.test(rule);
  const named = deny.filter((r) => !isAddress(r));
  if (named.length) throw new Error(`--egress-deny takes addresses or CIDRs (with optional ports), got "${named[0]}"`);
  const egress =
    allow.length + deny.length > 0
      ? {
          allowedCidrs: allow.filter(isAddress),
          deniedCidrs: deny,
          allowedDomains: allow.filter((r) => !isAddress(r)),
        }
      : undefined;
  return {
    ...(egress ? { egress } : {}),
    ...(v['no-internet'] ? { allowInternetAccess: false } : {}),
  };
}

export async function createMain(argv: string[]): Promise<number> {
  const args = parse(
    argv,
    {
      template: { type: 'string', default: 'base' },
      build: { type: 'string', default: '' },
      id: { type: 'string' },
      vcpu: { type: 'string', default: '0' },
      'ram-mb': { type: 'string', default: '0' },
      timeout: { type: 'string', default: '3600' },
      env: { type: 'string', multiple: true, default: [] },
      'auto-pause': { type: 'boolean', default: false },
      ...egressOptions,
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
  const { egress, allowInternetAccess } = egressOf(v);
  if (egress) config.network = { egress };
  if (allowInternetAccess !== undefined) config.allowInternetAccess = allowInternetAccess;
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
      vcpu: { type: 'string', default: '0' },
      'ram-mb': { type: 'string', default: '0' },
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

const checkpointUsage = `usage: ./sbx checkpoint <sandboxId> [--build <newBuildId>]
Snapshots the running sandbox into a new build (a fresh UUID unless --build is given) and prints
it once uploaded; the sandbox keeps running. ./sbx resume <otherId> --build <that id> starts a copy.
${targetHelp}`;

export async function checkpointMain(argv: string[]): Promise<number> {
  const args = parse(argv, { build: { type: 'string' } }, checkpointUsage);
  if (!args) return 0;
  const sandboxId = positional(args.positionals, 'sandboxId', checkpointUsage);
  const buildId = (args.values['build'] as string | undefined) ?? randomUUID();
  const started = performance.now();
  await withClient(args.values, (c) => unary(c, c.checkpoint, { sandboxId, buildId }, 300_000));
  printObject({ sandboxId, buildId, ms: Math.round(performance.now() - started) }, args.values['json'] as boolean);
  return 0;
}

const updateUsage = `usage: ./sbx update <sandboxId> [--egress-allow <rule>]... [--egress-deny <rule>]... [--no-internet]
Replaces the running sandbox's egress policy (applied at once; connections it now forbids are cut).
${egressHelp}
${targetHelp}`;

export async function updateMain(argv: string[]): Promise<number> {
  const args = parse(argv, { ...egressOptions, timeout: { type: 'string' } }, updateUsage);
  if (!args) return 0;
  const sandboxId = positional(args.positionals, 'sandboxId', updateUsage);
  const { egress, allowInternetAccess } = egressOf(args.values);
  const policy = {
    // An update replaces the whole policy: no rule flags = no rules.
    egress: egress ?? { allowedCidrs: [], deniedCidrs: [], allowedDomains: [] },
    allowInternetAccess: allowInternetAccess ?? true,
  };
  await withClient(args.values, async (c) => {
    // E2B's Update always carries the end time: keep the current one unless --timeout says otherwise.
    const timeout = args.values['timeout'] as string | undefined;
    const current = (await unary(c, c.list, {})).sandboxes.find((s) => s.config?.sandboxId === sandboxId);
    const end = timeout !== undefined ? endTime(Number(timeout)) : current?.endTime;
    if (!end) throw new Error(`sandbox '${sandboxId}' is not running on this node`);
    await unary(c, c.update, { sandboxId, endTime: end, ...policy });
  });
  printObject({ sandboxId, ...policy }, args.values['json'] as boolean);
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
    vcpu: fields.vcpu ?? 0,
    ramMb: fields.ramMb ?? 0,
    teamId: '',
    maxSandboxLength: 24,
    totalDiskSizeMb: 0,
    snapshot: fields.snapshot ?? false,
    baseTemplateId: fields.templateId,
    autoPause: fields.autoPause ?? false,
    executionId: '',
    volumeMounts: [],
  };
}
