import type { Logger } from '#logging';
import type { AdmissionServer, AdmissionStatus } from '#proto/sbx/admission';
import { unaryHandlers } from '#service-kit';
import type { SandboxManager } from './sandbox-manager.js';

/** sbx.v1.Admission on the control socket: the node's limits and their use, for `./sbx status`. */
export function admissionService(options: { manager: SandboxManager; logger: Logger }): AdmissionServer {
  const handle = unaryHandlers({ logger: options.logger });
  return {
    status: handle('Admission.Status', async (): Promise<AdmissionStatus> => options.manager.admissionStatus()),
  };
}
