import { hostname } from 'node:os';
import { z } from 'zod';
import { bucketFetchFields, gcsEndpointField } from '#storage';
import { loadConfig } from '#config';

const int = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

/** Every setting of the orchestrator; flags `--foo-bar` or env `SBX_ORCHESTRATOR_FOO_BAR`. */
export const orchestratorConfigSchema = z
  .object({
    grpcHost: z.string().min(1).default('0.0.0.0'),
    grpcPort: int(0, 65535).default(5008),
    controlSocket: z
      .string()
      .default('/run/sbx/orchestrator.sock')
      .describe('control socket for local tools (same SandboxService); empty = off'),
    dataDir: z.string().min(1).default('/var/lib/sbx/orchestrator'),
    bucket: z
      .string()
      .min(1)
      .default('/var/lib/sbx/bucket')
      .describe('a local directory or gs://bucket (shared SBX_BUCKET)')
      .meta({ aliases: ['SBX_BUCKET'] }),
    gcsEndpoint: gcsEndpointField,
    ...bucketFetchFields,
    cacheDir: z
      .string()
      .min(1)
      .default('/var/lib/sbx/cache')
      .describe('local build cache (shared SBX_CACHE_DIR)')
      .meta({ aliases: ['SBX_CACHE_DIR'] }),
    uffdServerSockets: z
      .array(z.string().min(1))
      .min(1)
      .default(['/run/sbx/uffd-server.sock'])
      .describe('one or more uffd-server instances (repeat the flag, or comma-separated in env)'),
    blockServerSockets: z.array(z.string().min(1)).min(1).default(['/run/sbx/block-server.sock']),
    netAgentSocket: z.string().min(1).default('/run/sbx/net-agent.sock'),
    dnsSocket: z.string().min(1).default('/run/sbx/dns.sock'),
    firecrackerBin: z
      .string()
      .optional()
      .describe('real Firecracker; used only together with a kernel')
      .meta({ aliases: ['FIRECRACKER_BIN'] }),
    kernelPath: z
      .string()
      .optional()
      .meta({ aliases: ['FIRECRACKER_KERNEL'] }),
    sbxBin: z
      .string()
      .optional()
      .describe('the sbx launcher whose `vmm-sim` stands in for Firecracker when none is configured'),
    vmRootfsDir: z
      .string()
      .min(1)
      .default('/run/sbx/fc-rootfs')
      .describe('where the rootfs path recorded in snapfiles lives: `{vmRootfsDir}/{baseBuildId}/rootfs.ext4`'),
    /**
     * A cgroup (v2) of its own for each VMM, outside the orchestrator's, so that a restart that
     * kills the orchestrator's whole cgroup (Nomad) spares the VMMs: `auto` (under the cgroup2
     * mount's `sbx-vmm/` when there is one), `off`, or the parent directory to use.
     */
    vmmCgroup: z.string().min(1).default('auto'),
    shutdownSandboxes: z
      .enum(['kill', 'keep'])
      .default('kill')
      .describe('on SIGTERM: kill the running sandboxes, or keep them for the next run to adopt'),
    metricsPort: int(0, 65535).default(9460),
    nodeId: z.string().min(1).default(hostname()),
    redisUrl: z
      .string()
      .optional()
      .meta({ aliases: ['REDIS_URL'] }),
    redisStream: z.string().min(1).default('sbx:events'),
    redisPrefix: z.string().min(1).default('sbx:sandbox:'),
    minVcpu: int(1, 256).default(1),
    maxVcpu: int(1, 256).default(8),
    minRamMb: int(16, 1 << 20).default(128),
    maxRamMb: int(16, 1 << 20).default(8192),
    maxSandboxes: int(1, 100_000).default(512),
    /**
     * Sandboxes starting (create or resume, until envd answers) at once (E2B: 3). A resume waits
     * for a turn up to startWaitMs; a fresh create is refused at once (RESOURCE_EXHAUSTED).
     */
    maxStartingSandboxes: int(1, 1000).default(3),
    startWaitMs: int(0, 600_000).default(15_000),
    envdTimeoutMs: int(100, 600_000).default(10_000),
    envdPort: int(1, 65535).default(49983),
    healthIntervalMs: int(0, 3_600_000).default(20_000),
    metricsIntervalMs: int(0, 3_600_000).default(10_000),
    serviceWatchIntervalMs: int(0, 3_600_000)
      .default(2000)
      .describe(
        'how often every uffd-server/block-server instance is asked which sandboxes it still holds (0 = never)',
      ),
    endTimeCheckMs: int(50, 60_000).default(1000),
    pauseParallelism: int(1, 256).default(8),
    vmmPoolSize: int(0, 64)
      .default(2)
      .describe(
        'VMMs started ahead, each waiting in a network slot of its own, so a create does not wait for a process start (0 = off)',
      ),
    generationCap: int(1, 1000).default(10),
    /**
     * Where a pause takes the written pages from when the uffd has no write-protect (upstream
     * Firecracker): `vmm-dirty-log` = Firecracker's Diff snapshot of a VM loaded with dirty
     * tracking (KVM's dirty log: written pages only); `present` = a Full snapshot and every
     * page the uffd-server installed (E2B's behaviour). With write-protect (E2B's fork) the
     * uffd-server's own tracking is used either way.
     */
    pauseMemoryDiff: z.enum(['vmm-dirty-log', 'present']).default('vmm-dirty-log'),
    /**
     * A written memory page or rootfs block equal to what the parent build holds is left to the
     * parent, not stored again (E2B's block/dedup.go); zero pages and blocks stay nil either way.
     */
    pauseDedup: z
      .enum(['true', 'false'])
      .default('true')
      .transform((v) => v === 'true'),
    buildCacheTtlMs: int(1000, 7 * 24 * 3_600_000).default(3_600_000),
    uploadRetries: int(0, 100).default(5),
    uploadBackoffMs: int(1, 600_000).default(1000),
    stepTimeoutMs: int(100, 600_000).default(30_000),
    sampleRootfsMb: int(4, 4096).default(16).describe('size of the scratch rootfs image of the sample template `base`'),
    sampleMemoryMb: int(4, 8192).default(64),
    /** Build the sample template `base` at start when the catalogue has none. */
    sampleTemplate: z
      .enum(['true', 'false'])
      .default('true')
      .transform((v) => v === 'true'),
    logLevel: z.enum(['trace', 'debug', 'info', 'warn', 'error', 'fatal']).default('info'),
  })
  .refine((c) => c.minVcpu <= c.maxVcpu, { message: 'minVcpu must be ≤ maxVcpu', path: ['minVcpu'] })
  .refine((c) => c.minRamMb <= c.maxRamMb, { message: 'minRamMb must be ≤ maxRamMb', path: ['minRamMb'] });

export type OrchestratorConfig = z.infer<typeof orchestratorConfigSchema>;

export const ORCHESTRATOR_ENV_PREFIX = 'SBX_ORCHESTRATOR_';

/** Loads the configuration (node-wide names such as SBX_BUCKET are the schema's aliases). */
export function loadOrchestratorConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): OrchestratorConfig {
  return loadConfig('orchestrator', orchestratorConfigSchema, ORCHESTRATOR_ENV_PREFIX, { argv, env });
}
