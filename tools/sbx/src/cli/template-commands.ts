import { stat } from 'node:fs/promises';
import { basename, resolve } from 'node:path';
import { parseArgs, type ParseArgsConfig } from 'node:util';
import { status, type ServiceError } from '@grpc/grpc-js';
import { dial, unary } from '#grpc';
import { TemplateAdminClient, type CreateTemplateEvent, type TemplateInfo } from '#proto/sbx/templates';
import { resolveGrpcAddress } from './node-target.js';
import { printObject, printRows } from './output-format.js';
import { formatBytes, ProgressRenderer } from './progress-bar.js';

// `./sbx template create|list` over the orchestrator's internal TemplateAdmin API
// (proto/sbx/templates.proto), served only on its control socket.

const targetHelp = `  --data-dir <dir>     local node data directory (default .sbx/node in the checkout, or $SBX_DATA_DIR)
  --addr <target>      the orchestrator's control socket (a path); TemplateAdmin is not on the TCP port
  --json               machine-readable output (progress still goes to stderr, as plain lines)`;

const usage = `usage: ./sbx template <create|list> ...

  create --rootfs <ext4> [--name <templateId>] [--memory-mb N] [--vcpu N] [--replace]
         Builds a template on the node: copies the rootfs into a new build, cold-boots it,
         takes a Full snapshot and writes the build to the bucket, showing progress.
         --name defaults to the rootfs file name without extension; --memory-mb and --vcpu
         default to the orchestrator's (checked against its configured bounds);
         --replace points an existing template id at the new build.
  list   Templates on the node: id, build id, rootfs and memory sizes.

${targetHelp}`;

const SAFE_NAME = /^[A-Za-z0-9][A-Za-z0-9_-]*$/;
const MAX_NAME = 63;

/** The template id: --name as given (checked), or one made from the rootfs file name. */
export function templateIdFor(name: string | undefined, rootfsPath: string): string {
  if (name !== undefined) {
    if (name.length === 0 || name.length > MAX_NAME || !SAFE_NAME.test(name)) {
      throw new Error(
        `--name '${name}' is not a safe template id: 1-${MAX_NAME} letters, digits, - and _, starting with a letter or digit`,
      );
    }
    return name;
  }
  const stem = basename(rootfsPath).replace(/\.[^.]*$/, '');
  const id = stem
    .replace(/[^A-Za-z0-9_-]+/g, '-')
    .replace(/^[-_]+/, '')
    .slice(0, MAX_NAME);
  if (!id) throw new Error(`cannot make a template id from '${basename(rootfsPath)}': pass --name`);
  return id;
}

/** A whole number ≥ 1, or undefined when the flag was not given (the orchestrator's default). */
export function positiveInt(flag: string, value: string | undefined): number | undefined {
  if (value === undefined) return undefined;
  if (!/^\d+$/.test(value) || Number(value) < 1 || Number(value) > 0xffffffff) {
    throw new Error(`${flag} must be a whole number ≥ 1, got '${value}'`);
  }
  return Number(value);
}

/** The rootfs as an absolute path to a regular file (the orchestrator checks it again, and that it is ext4). */
export async function checkRootfs(path: string | undefined): Promise<{ path: string; bytes: number }> {
  if (!path) throw new Error(`--rootfs <ext4 image> is required\n\n${usage}`);
  const absolute = resolve(path);
  const st = await stat(absolute).catch((err: NodeJS.ErrnoException) => {
    throw new Error(
      err.code === 'ENOENT' ? `--rootfs ${absolute} does not exist` : `--rootfs ${absolute}: ${err.message}`,
    );
  });
  if (!st.isFile()) throw new Error(`--rootfs ${absolute} is not a regular file`);
  if (st.size === 0) throw new Error(`--rootfs ${absolute} is empty`);
  return { path: absolute, bytes: st.size };
}

export async function main(argv: string[]): Promise<number> {
  const [sub, ...rest] = argv;
  if (!sub || sub === '--help' || sub === '-h' || sub === 'help') {
    console.log(usage);
    return sub ? 0 : 2;
  }
  if (sub === 'create') return createTemplate(rest);
  if (sub === 'list') return listTemplates(rest);
  console.error(`sbx template: unknown subcommand "${sub}"\n\n${usage}`);
  return 2;
}

function parse(argv: string[], extra: ParseArgsConfig['options'] = {}) {
  return parseArgs({
    args: argv,
    options: {
      addr: { type: 'string' },
      'data-dir': { type: 'string' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', default: false },
      ...extra,
    },
    strict: true,
  }).values as Record<string, string | boolean | undefined>;
}

async function dialAdmin(v: Record<string, string | boolean | undefined>): Promise<TemplateAdminClient> {
  const address = await resolveGrpcAddress({
    addr: v['addr'] as string | undefined,
    dataDir: v['data-dir'] as string | undefined,
  });
  return dial(TemplateAdminClient, address);
}

/** A gRPC failure as the operator should read it: the server's reason, not the status prefix. */
function explain(err: unknown): Error {
  const e = err as Partial<ServiceError>;
  if (typeof e.code !== 'number') return err as Error;
  if (e.code === status.UNIMPLEMENTED) {
    return new Error(
      'this endpoint does not serve TemplateAdmin: it is only on the orchestrator control socket (use --data-dir, or --addr <socket path>)',
    );
  }
  if (e.code === status.UNAVAILABLE) return new Error(`orchestrator unreachable: ${e.details ?? e.message}`);
  return new Error(e.details || e.message || String(err));
}

async function createTemplate(argv: string[]): Promise<number> {
  const v = parse(argv, {
    rootfs: { type: 'string' },
    name: { type: 'string' },
    'memory-mb': { type: 'string' },
    vcpu: { type: 'string' },
    replace: { type: 'boolean', default: false },
  });
  if (v['help']) {
    console.log(usage);
    return 0;
  }
  const json = v['json'] as boolean;
  const rootfs = await checkRootfs(v['rootfs'] as string | undefined);
  const templateId = templateIdFor(v['name'] as string | undefined, rootfs.path);
  const memoryMb = positiveInt('--memory-mb', v['memory-mb'] as string | undefined) ?? 0;
  const vcpu = positiveInt('--vcpu', v['vcpu'] as string | undefined) ?? 0;
  const client = await dialAdmin(v);
  const progress = ProgressRenderer.for(process.stderr, json);
  const started = performance.now();
  let cancelled = false;
  try {
    const entry = await new Promise<TemplateInfo>((ok, fail) => {
      let result: TemplateInfo | undefined;
      const stream = client.createTemplate({
        templateId,
        rootfsPath: rootfs.path,
        memoryMb,
        vcpu,
        replace: v['replace'] as boolean,
      });
      // Ctrl-C cancels the call; the orchestrator then aborts the build and gives back what it took.
      const onSigint = () => {
        cancelled = true;
        stream.cancel();
      };
      process.once('SIGINT', onSigint);
      stream.on('data', (e: CreateTemplateEvent) => {
        if (e.progress) progress.update(e.progress);
        if (e.template) result = e.template;
      });
      stream.on('error', (err) => {
        process.off('SIGINT', onSigint);
        fail(err);
      });
      stream.on('end', () => {
        process.off('SIGINT', onSigint);
        if (result) ok(result);
        else fail(new Error('the orchestrator ended the build without a template'));
      });
    });
    progress.finish('done');
    const row = templateRow(entry);
    if (json) printObject({ ...row, ms: Math.round(performance.now() - started) }, true);
    else printObject({ ...humanRow(entry), ms: Math.round(performance.now() - started) }, false);
    return 0;
  } catch (err) {
    progress.finish(cancelled ? 'cancelled' : 'failed');
    if (cancelled) {
      console.error('sbx template create: cancelled; the orchestrator discards the partial build');
      return 130;
    }
    throw explain(err);
  } finally {
    client.close();
  }
}

async function listTemplates(argv: string[]): Promise<number> {
  const v = parse(argv);
  if (v['help']) {
    console.log(usage);
    return 0;
  }
  const client = await dialAdmin(v);
  try {
    const res = await unary(client, client.listTemplates, {}).catch((err: unknown) => {
      throw explain(err);
    });
    const json = v['json'] as boolean;
    if (json) printRows(res.templates.map(templateRow), [], true);
    else printRows(res.templates.map(humanRow), ['templateId', 'buildId', 'rootfs', 'memory', 'created'], false);
    return 0;
  } finally {
    client.close();
  }
}

function templateRow(t: TemplateInfo) {
  return {
    templateId: t.templateId,
    buildId: t.buildId,
    rootfsBytes: t.rootfsBytes,
    memoryBytes: t.memoryBytes,
    createdAt: t.createdAt,
  };
}

function humanRow(t: TemplateInfo) {
  return {
    templateId: t.templateId,
    buildId: t.buildId,
    rootfs: t.rootfsBytes ? formatBytes(t.rootfsBytes) : '',
    memory: t.memoryBytes ? formatBytes(t.memoryBytes) : '',
    created: t.createdAt,
  };
}
