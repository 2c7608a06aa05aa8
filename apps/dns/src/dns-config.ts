import { isIP } from 'node:net';
import { z } from 'zod';

/** `ip:port` or `[ipv6]:port` → host and port. */
function parseListen(value: string, ctx: z.RefinementCtx): { host: string; port: number } {
  const match = /^\[([^\]]+)\]:(\d+)$/.exec(value) ?? /^([^:]+):(\d+)$/.exec(value);
  const host = match?.[1] ?? '';
  const port = Number(match?.[2]);
  if (!match || !isIP(host) || !Number.isInteger(port) || port < 0 || port > 65535) {
    ctx.addIssue({ code: 'custom', message: `expected <ip>:<port> (e.g. 127.0.0.4:53), got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return { host, port };
}

function parseRecord(value: string, ctx: z.RefinementCtx): { name: string; ip: string } {
  const eq = value.indexOf('=');
  if (eq <= 0 || eq === value.length - 1) {
    ctx.addIssue({ code: 'custom', message: `expected <name>=<ipv4>, got ${JSON.stringify(value)}` });
    return z.NEVER;
  }
  return { name: value.slice(0, eq), ip: value.slice(eq + 1) };
}

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

/** Every setting of the dns service: `--foo-bar` flag or `SBX_DNS_FOO_BAR`. */
export const dnsConfigSchema = z
  .object({
    listen: z.string().default('127.0.0.4:53').describe('UDP and TCP <ip>:<port>').transform(parseListen),
    record: z
      .array(z.string().transform(parseRecord))
      .default([])
      .describe('a record <name>=<ipv4> to serve from the start (standalone, tests)'),
    controlSocket: z.string().min(1).default('/run/sbx/dns.sock').describe('gRPC control socket, or none'),
    zone: z
      .string()
      .regex(/^\.?([A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?$/, 'expected a domain name such as sbx.internal')
      .optional()
      .describe('also answer {sandboxId}.{zone}'),
    metricsPort: int(0, 65535).default(9464).describe('Prometheus port, 0 = off'),
    metricsHost: z.string().default('127.0.0.1'),
    ttl: int(0, 2147483647).default(0).describe('answer TTL, seconds'),
    ednsUdpSize: int(512, 4096).default(1232).describe('UDP payload size advertised in OPT (RFC 6891 §6.2.5)'),
    udpEngine: z
      .enum(['batch', 'dgram'])
      .default('batch')
      .describe('recvmmsg/sendmmsg batches through libc (dgram where unavailable), or Node sockets'),
    udpSockets: int(1, 16).default(1).describe('UDP sockets sharing the port (SO_REUSEPORT), batch engine'),
    udpReceivers: int(1, 3).default(1).describe('receives waiting on the thread pool per UDP socket, batch engine'),
    tcpIdleTimeoutMs: int(100, 600_000).default(10_000).describe('close idle TCP connections after'),
    tcpMaxConnections: int(1, 100_000).default(1024).describe('concurrent TCP connections'),
    logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  })
  // Each batch receive holds a libuv thread-pool thread (4 by default) while it waits; leave one free.
  .refine((c) => c.udpEngine !== 'batch' || c.udpSockets * c.udpReceivers <= 3, {
    path: ['udpSockets'],
    message: 'udp-sockets x udp-receivers must be at most 3 (each waiting receive holds a libuv thread-pool thread)',
  });

export type DnsConfig = z.infer<typeof dnsConfigSchema>;
