import { join } from 'node:path';

/** One supervised service: how to start it and how to know it is up. */
export interface ServiceSpec {
  name: string;
  /** Arguments after `./sbx <name>`. */
  args: string[];
  /** Control socket answering grpc.health.v1 once the service is ready. */
  healthTarget: string;
  /** Services that must be healthy before this one starts. */
  dependsOn: string[];
  env?: Record<string, string>;
}

export interface LocalNodeLayout {
  dataDir: string;
  /** Where the SandboxService listens: loopback unless told otherwise (it has no authentication). */
  grpcHost: string;
  grpcPort: number;
  /** Where local-mode sockets live; kept short because sun_path holds 108 bytes. */
  runDir: string;
  bucketDir: string;
  cacheDir: string;
  logDir: string;
  /** The ingress proxy's client port (E2B's node proxy: 5007) and the domain `./sbx url` prints. */
  proxyPort: number;
  proxyDomain: string;
}

export function localLayout(dataDir: string, grpcPort: number, proxyPort = 5007): LocalNodeLayout {
  return {
    dataDir,
    grpcHost: '127.0.0.1',
    grpcPort,
    runDir: join(dataDir, 'run'),
    bucketDir: join(dataDir, 'bucket'),
    cacheDir: join(dataDir, 'cache'),
    logDir: join(dataDir, 'logs'),
    proxyPort,
    // *.localhost resolves to loopback in curl and browsers (RFC 6761 §6.3).
    proxyDomain: 'localhost',
  };
}

export function controlSocket(layout: LocalNodeLayout, service: string): string {
  return join(layout.runDir, `${service}.sock`);
}

/**
 * The six services of a local node (DESIGN.md §7), in dependency order: a local directory
 * as the bucket, memory slot reservation, DNS on loopback.
 */
export function localServicePlan(layout: LocalNodeLayout): ServiceSpec[] {
  const sock = (s: string) => controlSocket(layout, s);
  const storageEnv = { SBX_BUCKET: layout.bucketDir, SBX_CACHE_DIR: layout.cacheDir };
  return [
    {
      name: 'dns',
      args: ['serve', '--listen', '127.0.0.4:53', '--control-socket', sock('dns')],
      healthTarget: sock('dns'),
      dependsOn: [],
    },
    {
      name: 'net-agent',
      args: [
        'serve',
        '--control-socket',
        sock('net-agent'),
        '--reservation',
        'memory',
        '--pool-new-size',
        '4',
        '--pool-reused-size',
        '8',
      ],
      healthTarget: sock('net-agent'),
      dependsOn: [],
    },
    {
      name: 'block-server',
      args: [
        'serve',
        '--control-socket',
        sock('block-server'),
        '--data-dir',
        join(layout.dataDir, 'block-server'),
        '--bucket',
        layout.bucketDir,
      ],
      healthTarget: sock('block-server'),
      dependsOn: [],
      env: storageEnv,
    },
    {
      name: 'uffd-server',
      args: [
        'serve',
        '--control-socket',
        sock('uffd-server'),
        '--bucket',
        layout.bucketDir,
        '--cache-dir',
        layout.cacheDir,
      ],
      healthTarget: sock('uffd-server'),
      dependsOn: [],
      env: storageEnv,
    },
    {
      name: 'orchestrator',
      args: [
        'serve',
        '--grpc-host',
        layout.grpcHost,
        '--grpc-port',
        String(layout.grpcPort),
        '--control-socket',
        sock('orchestrator'),
        '--data-dir',
        join(layout.dataDir, 'orchestrator'),
        '--dns-socket',
        sock('dns'),
        // Recorded in the snapfiles of templates built here, so it lives with the node's data.
        '--vm-rootfs-dir',
        join(layout.dataDir, 'fc-rootfs'),
        '--net-agent-socket',
        sock('net-agent'),
        '--block-server-sockets',
        sock('block-server'),
        '--uffd-server-sockets',
        sock('uffd-server'),
      ],
      healthTarget: sock('orchestrator'),
      dependsOn: ['dns', 'net-agent', 'block-server', 'uffd-server'],
      env: storageEnv,
    },
    {
      name: 'proxy',
      args: [
        'serve',
        // Loopback like the SandboxService: sandboxes without a token would be open to the LAN.
        '--listen',
        `127.0.0.1:${layout.proxyPort}`,
        '--domain',
        layout.proxyDomain,
        '--control-socket',
        sock('proxy'),
        '--orchestrator-socket',
        sock('orchestrator'),
      ],
      healthTarget: sock('proxy'),
      // Not needed to start (it waits for the orchestrator's routes), but its routes come from there.
      dependsOn: ['orchestrator'],
    },
  ];
}
