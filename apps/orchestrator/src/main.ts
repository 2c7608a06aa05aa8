import { serviceMain } from '#service-kit';
import { orchestratorConfigSchema } from './orchestrator-config.js';
import { startOrchestrator } from './orchestrator-server.js';

export function main(argv: string[]): Promise<number> {
  return serviceMain('orchestrator', argv, [
    {
      name: 'serve',
      about: `Serves SandboxService (E2B's orchestrator.proto) on TCP and drives uffd-server, block-server,
net-agent and dns through their control sockets. Without --firecracker-bin and --kernel-path
sandboxes run in the vmm-sim test double.`,
      schema: orchestratorConfigSchema,
      run: startOrchestrator,
    },
  ]);
}
