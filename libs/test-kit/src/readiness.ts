import { existsSync } from 'node:fs';
import { isListening, waitForServing } from '#grpc';
import { eventually } from './eventually.js';
import type { ServiceProcess } from './service-process.js';

/** How a test knows a started service is ready: resolves once it is, within `timeoutMs`. */
export type Readiness = (proc: ServiceProcess, timeoutMs: number) => Promise<unknown>;

/** The service answers SERVING to grpc.health.v1 on its control socket (as the supervisor checks). */
export function grpcServing(socket: string): Readiness {
  return (_proc, timeoutMs) => waitForServing(socket, timeoutMs);
}

/** Something accepts connections on the Unix socket (a stale socket file of a killed run does not count). */
export function acceptsConnections(path: string): Readiness {
  return (_proc, timeoutMs) =>
    eventually(() => existsSync(path) && isListening(path), { timeoutMs, what: `a listener on ${path}` });
}

/**
 * The socket file exists: for a peer that takes exactly one client (uffd-server serve-file),
 * where a probing connection would be that client.
 */
export function fileExists(path: string): Readiness {
  return (_proc, timeoutMs) => eventually(() => existsSync(path), { timeoutMs, what: `${path} to exist` });
}

/** The service logged a JSON line `match` accepts (e.g. the port it bound), or a line containing the text `match`. */
export function logLine(match: string | ((entry: Record<string, unknown>) => boolean)): Readiness {
  const found = (proc: ServiceProcess) =>
    typeof match === 'string' ? proc.logs.some((line) => line.includes(match)) : proc.findLog(match) !== undefined;
  return (proc, timeoutMs) => eventually(() => found(proc), { timeoutMs, what: 'the ready log line' });
}
