import { hostname } from 'node:os';
import { z } from 'zod';
import { loadConfig, type ConfigSource } from '#config';
import { blockSize, cidrsOverlap, parseCidr, parseIpv4 } from './ipv4.js';

const ipv4 = z.string().refine((v) => isValid(() => parseIpv4(v)), 'expected an IPv4 address');
const cidr = z.string().refine((v) => isValid(() => parseCidr(v)), 'expected an IPv4 CIDR block with zero host bits');
/** Linux interface names: at most 15 bytes (IFNAMSIZ - 1), no slash, no whitespace. */
const ifname = z
  .string()
  .regex(/^[A-Za-z0-9_.-]{1,15}$/, 'expected an interface name of 1-15 characters [A-Za-z0-9_.-]');
const namePrefix = z.string().regex(/^[A-Za-z0-9_.-]{1,24}$/, 'expected 1-24 characters [A-Za-z0-9_.-]');
const nftName = z.string().regex(/^[A-Za-z][A-Za-z0-9_]{0,30}$/, 'expected an nftables identifier');
const count = (min: number, max: number) => z.coerce.number().int().min(min).max(max);
const flag = z.stringbool();

export const netAgentConfigSchema = z
  .object({
    controlSocket: z.string().min(1).default('/run/sbx/net-agent.sock'),
    metricsHost: z.string().default('127.0.0.1'),
    metricsPort: count(0, 65535).default(9463).describe('Prometheus port, 0 = off'),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error']).default('info'),
    nodeId: z
      .string()
      .regex(/^[A-Za-z0-9_.-]{1,128}$/, 'expected 1-128 characters [A-Za-z0-9_.-]')
      .default(
        hostname()
          .replace(/[^A-Za-z0-9_.-]/g, '-')
          .slice(0, 128) || 'node',
      ),

    reservation: z
      .enum(['memory', 'consul'])
      .default('memory')
      .describe('where slot reservations live: `memory` for a single node, `consul` for a cluster'),
    consulAddr: z
      .string()
      .optional()
      .describe('Consul HTTP address (http://host:port)')
      .meta({ aliases: ['CONSUL_HTTP_ADDR'] }),
    consulToken: z
      .string()
      .optional()
      .meta({ aliases: ['CONSUL_HTTP_TOKEN'] }),
    consulPrefix: z
      .string()
      .regex(/^([A-Za-z0-9_.-]+\/)*$/, 'expected empty or path segments ending with /')
      .default('')
      .describe("KV prefix before {nodeId}/{slotIdx}; empty gives the seed's layout"),
    consulTimeoutMs: count(50, 60_000).default(2000),

    firstSlot: count(0, 1 << 20)
      .default(1)
      .describe('slots are numbered first-slot .. first-slot + slot-count - 1'),
    slotCount: count(1, 1 << 20).default(16_000),
    namespacePrefix: namePrefix.default('ns-'),
    hostVethPrefix: namePrefix.default('veth-'),
    nsVethName: ifname.default('eth0'),
    tapName: ifname.default('tap0'),
    tapIp: ipv4.default('169.254.0.22'),
    tapPrefix: count(1, 31).default(30),
    guestIp: ipv4.default('169.254.0.21'),
    vethCidr: cidr
      .default('10.12.0.0/16')
      .describe('each slot takes a /31 of this block for its veth pair (host side even, namespace side odd)'),
    hostCidr: cidr
      .default('10.11.0.0/16')
      .describe("each slot's host IP (how the node reaches the sandbox) is one address of this block"),
    uplink: z
      .union([z.literal(''), ifname])
      .default('')
      .describe('the interface traffic leaves the node by; empty = the interface of the default route'),
    blockedRanges: z.array(cidr).default(['10.0.0.0/8', '172.16.0.0/12', '192.168.0.0/16', '169.254.0.0/16']),
    metadataAddress: ipv4.default('169.254.169.254'),
    hostTable: nftName
      .default('sbx_net')
      .describe(
        "nftables table in the node's namespace (forwarding, masquerade) and in each slot's namespace (NAT, egress)",
      ),
    slotTable: nftName.default('sbx_slot'),
    removalGroup: count(1, 0x7fffffff)
      .default(0x5b1)
      .describe('interface group used to delete a batch of host veths in one kernel operation'),
    namespaceSetup: z
      .enum(['netlink', 'ip'])
      .default('netlink')
      .describe("How a slot namespace's links are set up: direct rtnetlink from the agent (fast) or `ip -batch`"),
    nftMode: z
      .enum(['library', 'process'])
      .default('library')
      .describe('nftables transactions through libnftables in the agent (fast) or one `nft -f` process each'),
    enableForwarding: flag
      .default(true)
      .describe("Set net.ipv4.ip_forward=1 in the agent's namespace at start (the node must forward for slots)"),

    egressProxyPort: count(1, 65535)
      .default(15001)
      .describe(
        "port of the egress proxy's listener inside each slot namespace whose policy has domain rules (the guest's TCP is redirected to it)",
      ),
    egressStateDir: z
      .string()
      .min(1)
      .default('/run/sbx/net-agent-egress')
      .describe('policies served by the egress proxy, one file per slot, so a restarted agent serves them again'),
    egressHostsFile: z
      .string()
      .default('')
      .describe('hosts file the egress proxy resolves allowed names with first (empty = none)'),
    egressDnsServers: z
      .array(z.string().min(1))
      .default([])
      .describe("DNS servers (ip or ip:port) for allowed names; empty = the node's resolver (getaddrinfo)"),
    egressHeadTimeoutMs: count(100, 120_000)
      .default(5000)
      .describe('how long a connection refused by address may take to send its TLS hello or HTTP request'),
    egressDialTimeoutMs: count(100, 120_000).default(10_000),
    egressTunnelThreads: count(0, 16)
      .default(1)
      .describe('native threads that carry allowed egress connections (splice, off the event loop); 0 = piped by Node'),
    egressTunnelMode: z
      .enum(['splice', 'copy'])
      .default('splice')
      .describe('how the tunnel threads move bytes: splice(2) through a pipe, or read/write through a buffer'),

    poolNewSize: count(0, 10_000).default(32),
    poolReusedSize: count(0, 10_000).default(100),
    createBatch: count(1, 1024)
      .default(16)
      .describe('slots created together in one batch (one host ip/nft transaction, namespaces configured in parallel)'),
    refillBackoffMinMs: count(1, 600_000).default(100),
    refillBackoffMaxMs: count(1, 600_000).default(10_000),
    acquireTimeoutMs: count(0, 600_000).default(5000).describe('how long Acquire waits for a slot when none is ready'),
    pooledSlotGraceMs: count(0, 3_600_000)
      .default(5000)
      .describe(
        'a pooled VMM slot (Acquire pooled) with no process in it is freed at stop/start only once held this long',
      ),
    pooledSlotStopWaitMs: count(0, 60_000)
      .default(5000)
      .describe('at stop, how long to watch pooled VMM slots for their VMMs to end (every service stopping at once)'),
  })
  .superRefine((cfg, ctx) => {
    const maxIdx = cfg.firstSlot + cfg.slotCount - 1;
    // Field checks do not abort in zod 4: ranges already reported as malformed are skipped here.
    if (!isValid(() => parseCidr(cfg.vethCidr)) || !isValid(() => parseCidr(cfg.hostCidr))) return;
    const veth = parseCidr(cfg.vethCidr);
    const host = parseCidr(cfg.hostCidr);
    if (2 * (maxIdx + 1) > blockSize(veth.prefix)) {
      ctx.addIssue({
        code: 'custom',
        path: ['vethCidr'],
        message: `too small for slot ${maxIdx} (needs a /31 per slot)`,
      });
    }
    // Index 0 of the host block is its network address; keep the host IP of every slot a usable address.
    if (maxIdx + 1 >= blockSize(host.prefix)) {
      ctx.addIssue({ code: 'custom', path: ['hostCidr'], message: `too small for slot ${maxIdx}` });
    }
    if (cidrsOverlap(veth, host)) {
      ctx.addIssue({ code: 'custom', path: ['hostCidr'], message: 'overlaps vethCidr' });
    }
    if (`${cfg.hostVethPrefix}${maxIdx}`.length > 15) {
      ctx.addIssue({
        code: 'custom',
        path: ['hostVethPrefix'],
        message: `"${cfg.hostVethPrefix}${maxIdx}" is longer than 15 characters`,
      });
    }
    if (cfg.refillBackoffMaxMs < cfg.refillBackoffMinMs) {
      ctx.addIssue({ code: 'custom', path: ['refillBackoffMaxMs'], message: 'below refillBackoffMinMs' });
    }
    if (cfg.reservation === 'consul' && !cfg.consulAddr) {
      ctx.addIssue({ code: 'custom', path: ['consulAddr'], message: 'required with --reservation consul' });
    }
  });

export type NetAgentConfig = z.infer<typeof netAgentConfigSchema>;

export function loadNetAgentConfig(source: ConfigSource = {}): NetAgentConfig {
  return loadConfig('net-agent', netAgentConfigSchema, 'SBX_NET_AGENT_', source);
}

function isValid(parse: () => unknown): boolean {
  try {
    parse();
    return true;
  } catch {
    return false;
  }
}
