import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

/** Repository root and this project's directory, wherever the checkout lives. */
export const nomadDir = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const repoRoot = resolve(nomadDir, '../..');

/**
 * The six services a node runs, what each job is called, and which flag names the service's own
 * control socket (the one its health check must probe and the orchestrator must dial).
 */
export interface NodeService {
  service: 'orchestrator' | 'uffd-server' | 'block-server' | 'net-agent' | 'dns' | 'proxy';
  jobFile: string;
  jobId: string;
  socketFlag: string;
  /** The job variable listing one socket per instance, for services that run several per node. */
  instancesVariable?: 'uffd_sockets' | 'block_sockets';
  /** Prefix of the service's environment settings. */
  envPrefix: string;
}

function nodeService(
  service: NodeService['service'],
  socketFlag: string,
  instancesVariable?: NodeService['instancesVariable'],
): NodeService {
  return {
    service,
    jobFile: join(nomadDir, `${service}.nomad.hcl`),
    jobId: `sbx-${service}`,
    socketFlag,
    instancesVariable,
    envPrefix: `SBX_${service.toUpperCase().replace(/-/g, '_')}_`,
  };
}

export const nodeServices: NodeService[] = [
  nodeService('orchestrator', '--control-socket'),
  nodeService('uffd-server', '--control-socket', 'uffd_sockets'),
  nodeService('block-server', '--control-socket', 'block_sockets'),
  nodeService('net-agent', '--control-socket'),
  nodeService('dns', '--control-socket'),
  nodeService('proxy', '--control-socket'),
];

export const sharedVarFile = join(nomadDir, 'node.vars.hcl');

/** The value following `flag` in an argument list (`--flag value` or `--flag=value`). */
export function flagValue(args: string[], flag: string): string | undefined {
  for (let i = 0; i < args.length; i++) {
    const arg = args[i]!;
    if (arg === flag) return args[i + 1];
    if (arg.startsWith(`${flag}=`)) return arg.slice(flag.length + 1);
  }
  return undefined;
}
