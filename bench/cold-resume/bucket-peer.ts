import { readdir } from 'node:fs/promises';
import path from 'node:path';
import { DelayedBackend, GcsBackend, LocalBackend } from '#storage';
import { DelayProxy } from '../../libs/test-peers/src/delay-proxy.js';
import { FakeGcsServer } from '../../libs/test-peers/src/fake-gcs-server.js';

/** The bucket a cold resume reads, with a given latency per request; counts requests and bytes. */
export interface BucketPeer {
  name: string;
  backend(delayMs: number): Promise<DelayedBackend>;
  stop(): Promise<void>;
}

/**
 * `local`: the bucket directory behind DelayedBackend (the services' SBX_BUCKET_REQUEST_DELAY_MS).
 * `gcs`: fake-gcs-server (the real GCS JSON API peer, scripts/test-peers.sh) holding a copy of
 * the build, reached through a TCP proxy that holds each request for the delay.
 */
export async function startBucketPeer(kind: string, bucketDir: string, buildId: string): Promise<BucketPeer> {
  if (kind === 'local') {
    return {
      name: 'local directory, DelayedBackend',
      backend: async (delayMs) => new DelayedBackend(new LocalBackend(bucketDir), delayMs),
      stop: async () => undefined,
    };
  }
  if (kind !== 'gcs') throw new Error(`--bucket ${kind}: local or gcs`);
  const server = await FakeGcsServer.start();
  try {
    await server.createBucket('cold-resume');
    const direct = new GcsBackend({ bucket: 'cold-resume', apiEndpoint: server.endpoint });
    for (const name of await readdir(path.join(bucketDir, buildId)))
      await direct.upload(`${buildId}/${name}`, path.join(bucketDir, buildId, name));
    await direct.close();
  } catch (err) {
    await server.stop();
    throw err;
  }
  const target = new URL(server.endpoint);
  return {
    name: 'fake-gcs-server behind a delaying TCP proxy',
    backend: async (delayMs) => {
      const proxy = await DelayProxy.start({ host: target.hostname, port: Number(target.port) }, delayMs);
      // A zero delay on top: only its request and byte counters are wanted.
      const counted = new DelayedBackend(new GcsBackend({ bucket: 'cold-resume', apiEndpoint: proxy.endpoint }), 0);
      const close = counted.close.bind(counted);
      counted.close = async () => {
        await close();
        await proxy.stop();
      };
      return counted;
    },
    stop: () => server.stop(),
  };
}
