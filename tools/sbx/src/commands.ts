/**
 * Every subcommand of `./sbx`. Each entry loads its module only when run, so `./sbx --help`
 * and a service's start-up do not pay for the others. A module exports
 * `main(argv: string[]): Promise<number | void>` (the exit code; void means 0).
 */
export interface CommandEntry {
  name: string;
  summary: string;
  /** Module path relative to the repository's dist/ (built) tree, without extension. */
  module: string;
  /** The exported function to run; `main` when absent. */
  exportName?: string;
}

const cli = 'tools/sbx/src/cli/sandbox-commands';

export const commands: CommandEntry[] = [
  {
    name: 'orchestrator',
    summary: 'SandboxService gRPC API and sandbox lifecycle',
    module: 'apps/orchestrator/src/main',
  },
  {
    name: 'uffd-server',
    summary: 'guest memory through userfaultfd (serve, serve-file)',
    module: 'apps/uffd-server/src/main',
  },
  {
    name: 'block-server',
    summary: 'copy-on-write NBD devices (serve, standalone serve)',
    module: 'apps/block-server/src/main',
  },
  {
    name: 'net-agent',
    summary: 'network slots: namespaces, NAT, egress rules, pool',
    module: 'apps/net-agent/src/main',
  },
  { name: 'dns', summary: 'authoritative DNS for sandbox names (serve)', module: 'apps/dns/src/main' },
  {
    name: 'proxy',
    summary: 'ingress proxy: {port}-{sandboxId}.{domain} to that sandbox port (serve)',
    module: 'apps/proxy/src/main',
  },
  { name: 'vmm-sim', summary: 'the Firecracker test double (--api-sock <path>)', module: 'tools/vmm-sim/src/main' },
  {
    name: 'inspect-header',
    summary: 'print a build header: metadata, mappings, per-build summary',
    module: 'libs/storage/src/inspect-header-command',
  },
  {
    name: 'inspect-data',
    summary: "which blocks of a build's memfile or rootfs hold data: --build <id> --kind memfile|rootfs",
    module: 'tools/sbx/src/cli/inspect-data-command',
  },
  {
    name: 'node',
    summary: 'run the whole node locally: node up [--data-dir] [--grpc-port] [--demo]',
    module: 'tools/sbx/src/node/node-command',
  },
  {
    name: 'health',
    summary: 'one grpc.health.v1 check of a service socket (exit 0 when serving): for script checks',
    module: 'tools/sbx/src/cli/health-command',
  },
  { name: 'create', summary: 'create a sandbox from a template (or a build)', module: cli, exportName: 'createMain' },
  { name: 'list', summary: 'list running sandboxes', module: cli, exportName: 'listMain' },
  { name: 'pause', summary: 'pause a sandbox into a new build', module: cli, exportName: 'pauseMain' },
  { name: 'resume', summary: 'resume a paused sandbox from its build', module: cli, exportName: 'resumeMain' },
  {
    name: 'checkpoint',
    summary: 'snapshot a running sandbox into a new build; it keeps running',
    module: cli,
    exportName: 'checkpointMain',
  },
  {
    name: 'update',
    summary: "replace a running sandbox's egress policy: update <id> --egress-allow …",
    module: cli,
    exportName: 'updateMain',
  },
  { name: 'kill', summary: 'kill a sandbox', module: cli, exportName: 'killMain' },
  { name: 'set-timeout', summary: "change a sandbox's end time", module: cli, exportName: 'setTimeoutMain' },
  {
    name: 'status',
    summary: 'sandboxes, slots, cache use, fault and NBD rates of the local node',
    module: 'tools/sbx/src/cli/status-command',
  },
  {
    name: 'url',
    summary: "the URL of a sandbox port through this node's ingress proxy: url <id> <port>",
    module: 'tools/sbx/src/cli/url-command',
  },
  { name: 'builds', summary: 'builds cached on the node, with expiry', module: cli, exportName: 'buildsMain' },
  {
    name: 'template',
    summary: 'template create --rootfs <ext4> [--name <id>] (build with progress), template list',
    module: 'tools/sbx/src/cli/template-commands',
  },
];
