import { RouteRequestInvalid } from './proxy-errors.js';

/** Which sandbox port a request is for. */
export interface RouteTarget {
  sandboxId: string;
  port: number;
}

export const SANDBOX_ID_HEADER = 'e2b-sandbox-id';
export const SANDBOX_PORT_HEADER = 'e2b-sandbox-port';

// The first label of the Host: `{port}-{sandboxId}`; an id is one DNS label (DESIGN.md §6).
const LABEL = /^(\d{1,5})-([A-Za-z0-9][A-Za-z0-9_-]{0,62})$/;
const SANDBOX_ID = /^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$/;

function checkPort(text: string, where: string): number {
  const port = /^\d{1,5}$/.test(text) ? Number(text) : NaN;
  if (!(port >= 1 && port <= 65535))
    throw new RouteRequestInvalid(`${where}: port ${JSON.stringify(text)} is not 1–65535`);
  return port;
}

/**
 * The target from the explicit header pair (for clients that cannot set Host), else from the
 * Host `{port}-{sandboxId}.{anything}[:listen-port]`. Anything else is RouteRequestInvalid (400).
 */
export function routeTarget(host: string | undefined, idHeader?: string, portHeader?: string): RouteTarget {
  if (idHeader !== undefined || portHeader !== undefined) {
    if (idHeader === undefined || portHeader === undefined) {
      throw new RouteRequestInvalid(`headers ${SANDBOX_ID_HEADER} and ${SANDBOX_PORT_HEADER} go together`);
    }
    if (!SANDBOX_ID.test(idHeader)) {
      throw new RouteRequestInvalid(
        `${SANDBOX_ID_HEADER}: ${JSON.stringify(idHeader.slice(0, 80))} is not a sandbox id`,
      );
    }
    return { sandboxId: idHeader, port: checkPort(portHeader, SANDBOX_PORT_HEADER) };
  }
  if (!host) throw new RouteRequestInvalid('no Host header: expected {port}-{sandboxId}.{domain}');
  // Drop the listening port; an IPv6 literal names no sandbox.
  const name = host.startsWith('[') ? '' : host.replace(/:\d*$/, '');
  const dot = name.indexOf('.');
  const label = dot < 0 ? name : name.slice(0, dot);
  const match = LABEL.exec(label);
  if (!match) {
    throw new RouteRequestInvalid(
      `Host ${JSON.stringify(host.slice(0, 120))} is not {port}-{sandboxId}.{domain} (e.g. 8080-mysandbox.example.com)`,
    );
  }
  return { sandboxId: match[2]!, port: checkPort(match[1]!, 'Host') };
}
