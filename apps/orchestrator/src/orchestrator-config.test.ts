import { describe, expect, it } from 'vitest';
import { ConfigInvalid } from '#config';
import { loadOrchestratorConfig } from './orchestrator-config.js';

describe('orchestrator config', () => {
  it('has the documented defaults', () => {
    const c = loadOrchestratorConfig([], {});
    expect(c.grpcPort).toBe(5008);
    expect(c.pauseParallelism).toBe(8);
    expect(c.generationCap).toBe(10);
    expect(c.uffdServerSockets).toEqual(['/run/sbx/uffd-server.sock']);
    expect(c.redisUrl).toBeUndefined();
  });

  it('reads flags over env, repeated socket flags, and the node-wide names as fallbacks', () => {
    const c = loadOrchestratorConfig(
      ['--grpc-port', '7000', '--block-server-sockets', '/a.sock', '--block-server-sockets', '/b.sock'],
      {
        SBX_ORCHESTRATOR_GRPC_PORT: '6000',
        SBX_BUCKET: '/srv/bucket',
        SBX_CACHE_DIR: '/srv/cache',
        REDIS_URL: 'redis://r:6379',
        FIRECRACKER_BIN: '/usr/bin/firecracker',
        SBX_ORCHESTRATOR_UFFD_SERVER_SOCKETS: '/u1.sock,/u2.sock',
      },
    );
    expect(c.grpcPort).toBe(7000);
    expect(c.blockServerSockets).toEqual(['/a.sock', '/b.sock']);
    expect(c.uffdServerSockets).toEqual(['/u1.sock', '/u2.sock']);
    expect(c.bucket).toBe('/srv/bucket');
    expect(c.cacheDir).toBe('/srv/cache');
    expect(c.redisUrl).toBe('redis://r:6379');
    expect(c.firecrackerBin).toBe('/usr/bin/firecracker');
    expect(loadOrchestratorConfig([], { SBX_BUCKET: '/x', SBX_ORCHESTRATOR_BUCKET: '/own' }).bucket).toBe('/own');
  });

  it('takes the GCS endpoint from --gcs-endpoint, SBX_ORCHESTRATOR_GCS_ENDPOINT or SBX_GCS_ENDPOINT', () => {
    expect(loadOrchestratorConfig([], {}).gcsEndpoint).toBeUndefined();
    expect(loadOrchestratorConfig([], { SBX_GCS_ENDPOINT: 'http://127.0.0.1:4443' }).gcsEndpoint).toBe(
      'http://127.0.0.1:4443',
    );
    expect(
      loadOrchestratorConfig(['--gcs-endpoint', 'http://10.0.0.9:80'], { SBX_GCS_ENDPOINT: 'http://x:1' }).gcsEndpoint,
    ).toBe('http://10.0.0.9:80');
    expect(() => loadOrchestratorConfig(['--gcs-endpoint', 'not a url'], {})).toThrow(/--gcs-endpoint/);
  });

  it('refuses bad values naming the field', () => {
    const bad: [string[], string][] = [
      [['--grpc-port', '70000'], '--grpc-port'],
      [['--min-vcpu', '9'], '--min-vcpu'],
      [['--pause-parallelism', '0'], '--pause-parallelism'],
      [['--shutdown-sandboxes', 'maybe'], '--shutdown-sandboxes'],
      [['--no-such-flag', '1'], 'no-such-flag'],
    ];
    for (const [argv, field] of bad) {
      let err: unknown;
      try {
        loadOrchestratorConfig(argv, {});
      } catch (e) {
        err = e;
      }
      expect(err, argv.join(' ')).toBeInstanceOf(ConfigInvalid);
      expect((err as Error).message).toContain(field);
    }
  });
});
