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
    /** UDP and TCP address the resolver answers on. */
    listen: z.string().default('127.0.0.4:53').transform(parseListen),
    /** Records to serve from the start (`name=ip`, repeatable): standalone mode and tests. */
    record: z.array(z.string().transform(parseRecord)).default([]),
    /** gRPC control socket; `none` serves without one (standalone). */
    controlSocket: z.string().min(1).default('/run/sbx/dns.sock'),
    /** Optional zone: `{id}.{zone}` resolves as well as `{id}`. */
    zone: z
      .string()
      .regex(/^\.?([A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?$/, 'expected a domain name such as sbx.internal')
      .optional(),
    /** Prometheus metrics on 127.0.0.1; 0 = off. */
    metricsPort: int(0, 65535).default(9464),
    metricsHost: z.string().default('127.0.0.1'),
    ttl: int(0, 2147483647).default(0),
    /** UDP payload size advertised in OPT answers (RFC 6891 §6.2.5). */
    ednsUdpSize: int(512, 4096).default(1232),
    /** `batch`: recvmmsg/sendmmsg through libc (falls back to dgram where unavailable); `dgram`: Node's sockets. */
    udpEngine: z.enum(['batch', 'dgram']).default('batch'),
    /** UDP sockets sharing the port (SO_REUSEPORT), batch engine only. */
    udpSockets: int(1, 16).default(1),
    /** Receives waiting on the thread pool per UDP socket (batch engine) while the socket is empty. */
    udpReceivers: int(1, 3).default(1),
    tcpIdleTimeoutMs: int(100, 600_000).default(10_000),
    tcpMaxConnections: int(1, 100_000).default(1024),
    logLevel: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
  })
  // Each batch receive holds a libuv thread-pool thread (4 by default) while it waits; leave one free.
  .refine((c) => c.udpEngine !== 'batch' || c.udpSockets * c.udpReceivers <= 3, {
    path: ['udpSockets'],
    message: 'udp-sockets x udp-receivers must be at most 3 (each waiting receive holds a libuv thread-pool thread)',
  });

export type DnsConfig = z.infer<typeof dnsConfigSchema>;
