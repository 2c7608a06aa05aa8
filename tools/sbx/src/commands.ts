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
}

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
  { name: 'vmm-sim', summary: 'the Firecracker test double (--api-sock <path>)', module: 'tools/vmm-sim/src/main' },
  {
    name: 'inspect-header',
    summary: 'print a build header: metadata, mappings, per-build summary',
    module: 'libs/storage/src/inspect-header-command',
  },
];
