import { isIP } from 'node:net';
import { z } from 'zod';

/** `ip:port` or `[ipv6]:port` → host and port. */
function parseListen(value: string, ctx: z.RefinementCtx): { host: string; port: number } {
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(value) ?? /^([^:]+):(\d+)$/.exec(value);
  const host = match?.[1] ?? '';
  const port = Number(match?.[2]);
  if (!match || !isIP(host) || !Number.isInteger(port) || port < 0 || port > 65535) {
    ctx.addIssue({ code: 'custom', message: `expected <ip>:<port> (e.g. 0.0.0.0:5007), got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return { host, port };
}

export interface TcpForward {
  listenPort: number;
  sandboxId: string;
  port: number;
}

/** `<listen-port>=<sandboxId>:<port>`: a node port forwarded as plain TCP to one sandbox port. */
function parseTcpForward(value: string, ctx: z.RefinementCtx): TcpForward {
  const match = /^(\d{1,5})=([A-Za-z0-9][A-Za-z0-9_-]{0,62}):(\d{1,5})$/.exec(value);
  const listenPort = Number(match?.[1]);
  const port = Number(match?.[3]);
  if (!match || listenPort > 65535 || port < 1 || port > 65535) {
    ctx.addIssue({
      code: 'custom',
      message: `expected <listen-port>=<sandboxId>:<port> (e.g. 5900=sbx1:5900), got ${JSON.stringify(value)}`,
    });
    return z.NEVER;
  }
  return { listenPort, sandboxId: match[2]!, port };
}

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

/** Every setting of the ingress proxy: `--foo-bar` flag or `SBX_PROXY_FOO_BAR`. */
export const proxyConfigSchema = z.object({
  /** Where clients connect: HTTP/1.1, WebSocket and h2c on one port (E2B's node proxy: 5007). */
  listen: z.string().default('0.0.0.0:5007').transform(parseListen),
  /** The orchestrator's control socket: the route watch and resume on request. */
  orchestratorSocket: z.string().min(1).default('/run/sbx/orchestrator.sock'),
  /** gRPC control socket (health); `none` serves without one. */
  controlSocket: z.string().min(1).default('/run/sbx/proxy.sock'),
  /** Domain printed by `./sbx url` ({port}-{id}.{domain}); routing accepts any domain. */
  domain: z.string().default('localhost'),
  /** Plain TCP forwards for protocols without a Host (VNC): `<listen-port>=<sandboxId>:<port>`, repeatable. */
  tcpForward: z.array(z.string().transform(parseTcpForward)).default([]),
  /** Address the TCP forwards listen on. */
  tcpHost: z.string().default('0.0.0.0'),
  /** Bound on a connect to a sandbox port (a silent guest: 504). */
  upstreamConnectTimeoutMs: int(100, 600_000).default(10_000),
  /** A request whose sandbox must be resumed (or is still starting) waits at most this long. */
  resumeTimeoutMs: int(100, 600_000).default(60_000),
  /**
   * The native relay closes a pooled sandbox connection idle this long: below Node's default
   * 5 s server keep-alive, so it seldom reuses one the guest is closing.
   */
  upstreamIdleTimeoutMs: int(100, 3_600_000).default(4_000),
  /** Idle keep-alive connections kept per sandbox port by the Node path (the native relay pools by its idle timeout). */
  maxIdleUpstreamSockets: int(0, 10_000).default(128),
  /** Client connections idle this long are closed (a WebSocket or h2 stream in use is not idle). */
  clientIdleTimeoutMs: int(1000, 3_600_000).default(620_000),
  /**
   * Who carries HTTP/1.1 requests: `native`, the C relay (libsbxnative's sbx_http_relay) on its
   * own threads for well-formed keep-alive requests to running sandboxes, everything else handed
   * back to the Node path; `node`, the Node path alone. Unset: native when libsbxnative has the
   * relay, node otherwise.
   */
  dataPath: z.enum(['native', 'node']).optional(),
  /**
   * With `--data-path node`: processes sharing the client port (node:cluster; 1 = this process
   * serves alone). With `native`: the relay's threads, in this one process.
   */
  workers: int(1, 256).default(1),
  /** Prometheus metrics on 127.0.0.1; 0 = off. */
  metricsPort: int(0, 65535).default(9465),
  metricsHost: z.string().default('127.0.0.1'),
  logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
});

export type ProxyConfig = z.infer<typeof proxyConfigSchema>;
