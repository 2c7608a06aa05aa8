import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { homedir, tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backendSource, ChunkCache } from '../src/chunk-cache.js';
import { GcsBackend } from '../src/gcs-backend.js';
import { LocalBackend } from '../src/local-backend.js';
import { openBackend } from '../src/open-backend.js';
import type { StorageBackend } from '../src/storage-backend.js';
import { ObjectNotFound, StorageUnavailable } from '../src/storage-errors.js';
import { FakeGcsServer } from '../../test-peers/src/fake-gcs-server.js';
import { GcsDouble } from './gcs-double.js';
import { GcsFaultProxy } from './gcs-fault-proxy.js';

const BUILD = '0b4c1d5e-8f00-4a6b-9c3d-2e1f0a9b8c7d';

function pattern(length: number, seed = 1): Buffer {
  const out = Buffer.alloc(length);
  for (let i = 0; i < length; i++) out[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return out;
}

let work: string;
beforeAll(async () => {
  work = await mkdtemp(path.join(tmpdir(), 'sbx-storage-backend-'));
});
afterAll(async () => {
  await rm(work, { recursive: true, force: true });
});

/** What every backend must do the same way. */
function contract(name: string, make: () => Promise<StorageBackend>): void {
  describe(`${name}: backend contract`, () => {
    let backend: StorageBackend;
    beforeAll(async () => {
      backend = await make();
    });
    afterAll(async () => {
      await backend.close();
    });

    it('uploads a file, reads ranges of it, its size, and downloads it whole', async () => {
      const data = pattern(300_000);
      const local = path.join(work, `${name}-memfile`);
      await writeFile(local, data);
      const progress: number[] = [];
      await backend.upload(`${BUILD}/memfile`, local, { onProgress: (n) => progress.push(n) });
      expect(progress.at(-1)).toBe(data.length);
      expect(await backend.size(`${BUILD}/memfile`)).toBe(data.length);
      expect(await backend.exists(`${BUILD}/memfile`)).toBe(true);
      expect((await backend.readRange(`${BUILD}/memfile`, 4096, 10_000)).equals(data.subarray(4096, 14_096))).toBe(
        true,
      );
      expect((await backend.readRange(`${BUILD}/memfile`, data.length - 5, 5)).equals(data.subarray(-5))).toBe(true);
      const back = path.join(work, `${name}-download`, 'memfile');
      await backend.download(`${BUILD}/memfile`, back);
      expect((await readFile(back)).equals(data)).toBe(true);
    });

    it('writes and reads small objects whole, lists by prefix, deletes', async () => {
      await backend.write(`${BUILD}/memfile.header`, Buffer.from('header bytes'));
      await backend.write(`${BUILD}/snapfile`, Buffer.from('snap'));
      await backend.write(`other/snapfile`, Buffer.from('x'));
      expect((await backend.read(`${BUILD}/memfile.header`)).toString()).toBe('header bytes');
      expect(await backend.list(`${BUILD}/`)).toEqual([
        `${BUILD}/memfile`,
        `${BUILD}/memfile.header`,
        `${BUILD}/snapfile`,
      ]);
      await backend.delete(`${BUILD}/snapfile`);
      await backend.delete(`${BUILD}/snapfile`);
      expect(await backend.exists(`${BUILD}/snapfile`)).toBe(false);
    });

    it('uploads and reads back an empty file (a pause with nothing dirty)', async () => {
      const local = path.join(work, `${name}-empty`);
      await writeFile(local, Buffer.alloc(0));
      await backend.upload(`${BUILD}/empty`, local);
      expect(await backend.size(`${BUILD}/empty`)).toBe(0);
      expect((await backend.read(`${BUILD}/empty`)).length).toBe(0);
      expect((await backend.readRange(`${BUILD}/empty`, 0, 0)).length).toBe(0);
      await backend.delete(`${BUILD}/empty`);
    });

    it('says which object is missing, and refuses reads past the end', async () => {
      const missing = `${BUILD}/rootfs.ext4`;
      await expect(backend.size(missing)).rejects.toSatisfy(
        (e) => e instanceof ObjectNotFound && e.objectPath === missing && e.message.includes(missing),
      );
      await expect(backend.readRange(missing, 0, 10)).rejects.toBeInstanceOf(ObjectNotFound);
      await expect(backend.read(missing)).rejects.toBeInstanceOf(ObjectNotFound);
      await expect(backend.download(missing, path.join(work, `${name}-x`))).rejects.toBeInstanceOf(ObjectNotFound);
      await expect(backend.readRange(`${BUILD}/memfile`, 299_990, 20)).rejects.toBeInstanceOf(RangeError);
      await expect(backend.readRange('../etc/passwd', 0, 1)).rejects.toThrow(/invalid object path/);
    });
  });
}

contract('local', async () => new LocalBackend(path.join(work, 'bucket')));

// fake-gcs-server (a test peer, built by scripts/test-peers.sh on first use), reached through a
// proxy that injects the faults it cannot give (503s, hangs, resets) and forces small list pages.
const proxy = new GcsFaultProxy();
let fakeGcs: FakeGcsServer | undefined;
beforeAll(async () => {
  await proxy.listen();
  fakeGcs = await FakeGcsServer.start({ externalUrl: proxy.endpoint });
  proxy.forwardTo(fakeGcs.endpoint);
  await fakeGcs.createBucket('builds');
}, 1_800_000);
afterAll(async () => {
  await proxy.stop();
  await fakeGcs?.stop();
});

function gcsOnFake(extra: Partial<ConstructorParameters<typeof GcsBackend>[0]> = {}): GcsBackend {
  return new GcsBackend({ bucket: 'builds', apiEndpoint: proxy.endpoint, maxRetryDelayMs: 1000, ...extra });
}

contract('gcs (fake-gcs-server)', async () => gcsOnFake());

describe('gcs backend against fake-gcs-server, faults injected by a proxy', () => {
  it('uploads in resumable chunks', async () => {
    const backend = gcsOnFake({ uploadChunkSize: 256 * 1024 });
    const data = pattern(1024 * 1024 + 1000, 3);
    const local = path.join(work, 'chunked');
    await writeFile(local, data);
    const before = proxy.requests.length;
    await backend.upload(`${BUILD}/rootfs.ext4`, local);
    expect((await backend.read(`${BUILD}/rootfs.ext4`)).equals(data)).toBe(true);
    const chunks = proxy.requests
      .slice(before)
      .filter((r) => r.method === 'PUT' && /^bytes \d+-\d+\//.test(r.contentRange ?? ''));
    expect(chunks.length).toBe(5);
  });

  it('retries a metadata request that failed with 503 and reports a lasting outage as StorageUnavailable', async () => {
    const backend = gcsOnFake({ maxRetries: 1 });
    await backend.write('x/y', Buffer.from('abc'));
    proxy.failNext({ status: 503, match: (r) => r.path.endsWith('/o/x%2Fy') || r.path.endsWith('/o/x/y') });
    expect(await backend.size('x/y')).toBe(3);
    proxy.failNext({ status: 503 }, 10);
    await expect(backend.size('x/y')).rejects.toBeInstanceOf(StorageUnavailable);
    await expect(backend.readRange('x/y', 0, 2)).rejects.toBeInstanceOf(StorageUnavailable);
    proxy.clearFaults();
    proxy.failNext({ status: 'reset' }, 2);
    await expect(backend.readRange('x/y', 0, 2)).rejects.toBeInstanceOf(StorageUnavailable);
    // Drain faults the retries did not consume so later tests start clean.
    while (
      await backend.exists('x/y').then(
        () => false,
        () => true,
      )
    );
  });

  it('fails a read that hangs as StorageUnavailable after the read timeout', async () => {
    const backend = gcsOnFake({ readTimeoutMs: 1000 });
    await backend.write('slow/obj', pattern(1000));
    proxy.failNext({ status: 'hang', match: (r) => r.query.alt === 'media' });
    await expect(backend.readRange('slow/obj', 0, 100)).rejects.toBeInstanceOf(StorageUnavailable);
    expect((await backend.readRange('slow/obj', 0, 100)).equals(pattern(1000).subarray(0, 100))).toBe(true);
  });

  it('a chunk cache over GCS rides out a bucket timeout: the reader only waits', async () => {
    const backend = gcsOnFake({ readTimeoutMs: 1000 });
    const data = pattern(6 * 1024 * 1024, 9);
    await backend.write(`${BUILD}/snapdata`, data);
    const cache = await ChunkCache.open({
      source: backendSource(backend, `${BUILD}/snapdata`),
      size: data.length,
      cachePath: path.join(work, 'gcs-chunks'),
      retry: { attempts: 3, initialDelayMs: 10, maxDelayMs: 50, multiplier: 2 },
    });
    try {
      const before = proxy.count((r) => r.query.alt === 'media');
      proxy.failNext({
        status: 'hang',
        match: (r) => r.query.alt === 'media' && (r.range ?? '').startsWith('bytes=4194304-'),
      });
      const out = Buffer.alloc(8192);
      const [a] = await Promise.all([
        cache.readAt(out, 4 * 1024 * 1024 + 100).then(() => Buffer.from(out)),
        cache.readAt(Buffer.alloc(10), 4 * 1024 * 1024),
      ]);
      expect(a.equals(data.subarray(4 * 1024 * 1024 + 100, 4 * 1024 * 1024 + 100 + 8192))).toBe(true);
      // the hung request timed out and was retried (more than once if this loaded machine is slow);
      // the second reader shared those fetches instead of adding its own
      const media = proxy.count((r) => r.query.alt === 'media') - before;
      expect(media).toBeGreaterThanOrEqual(2);
      expect(cache.fetchCount).toBe(media);
    } finally {
      await cache.close();
    }
  });

  it('follows list pagination', async () => {
    const backend = gcsOnFake();
    proxy.listPageSize = 2;
    try {
      for (let i = 0; i < 5; i++) await backend.write(`paged/${i}`, Buffer.from([i]));
      const pagesBefore = proxy.count((r) => r.path === '/storage/v1/b/builds/o');
      expect(await backend.list('paged/')).toEqual([0, 1, 2, 3, 4].map((i) => `paged/${i}`));
      expect(proxy.count((r) => r.path === '/storage/v1/b/builds/o') - pagesBefore).toBe(3);
    } finally {
      proxy.listPageSize = 0;
    }
  });
});

// The one case fake-gcs-server cannot give: it finalizes an upload on a status query (see gcs-double.ts).
describe('gcs backend against GcsDouble (a test double), resumable upload resume only', () => {
  const double = new GcsDouble();
  beforeAll(async () => {
    await double.start();
  });
  afterAll(async () => {
    await double.stop();
  });

  it('resumes a resumable upload after a chunk fails with 503', async () => {
    const backend = new GcsBackend({
      bucket: 'builds',
      apiEndpoint: double.endpoint,
      maxRetryDelayMs: 1000,
      uploadChunkSize: 256 * 1024,
    });
    const data = pattern(1024 * 1024 + 1000, 3);
    const local = path.join(work, 'chunked-resume');
    await writeFile(local, data);
    double.failNext({
      status: 503,
      match: (r) => r.method === 'PUT' && (r.contentRange ?? '').startsWith('bytes 524288-'),
    });
    await backend.upload(`${BUILD}/rootfs.ext4`, local);
    expect(double.get('builds', `${BUILD}/rootfs.ext4`)!.equals(data)).toBe(true);
    const puts = double.requests.filter((r) => r.method === 'PUT');
    // 5 chunks, one of them repeated after the injected 503 (after a status query).
    expect(puts.filter((r) => /^bytes \d+-\d+\//.test(r.contentRange ?? '')).length).toBeGreaterThanOrEqual(6);
    await backend.close();
  });
});

describe('openBackend', () => {
  it('picks GCS for gs:// and a local directory otherwise', () => {
    expect(openBackend('gs://my-bucket')).toBeInstanceOf(GcsBackend);
    expect(openBackend('gs://my-bucket').location).toBe('gs://my-bucket');
    expect(openBackend(work)).toBeInstanceOf(LocalBackend);
    expect(() => openBackend('gs://')).toThrow(/gs:\/\/<bucket>/);
  });

  it('sends a gs:// bucket to the configured endpoint (--gcs-endpoint / SBX_GCS_ENDPOINT)', async () => {
    const backend = openBackend('gs://builds', { apiEndpoint: fakeGcs!.endpoint });
    await backend.write('endpoint/probe', Buffer.from('x'));
    expect(await fakeGcs!.list('builds', 'endpoint/')).toEqual(['endpoint/probe']);
    await backend.close();
  });
});

// The same round trip against Google when GCS_TEST_BUCKET (and credentials) are given, with
// SBX_GCS_ENDPOINT as the endpoint when set; otherwise against fake-gcs-server, so it always runs.
const realBucket = process.env.GCS_TEST_BUCKET;
const realEndpoint = process.env.SBX_GCS_ENDPOINT;
const hasCredentials =
  realEndpoint !== undefined ||
  process.env.GOOGLE_APPLICATION_CREDENTIALS !== undefined ||
  process.env.GOOGLE_CLOUD_PROJECT !== undefined ||
  existsSync(path.join(homedir(), '.config/gcloud/application_default_credentials.json'));
if (realBucket !== undefined && !hasCredentials)
  throw new Error(
    'GCS_TEST_BUCKET is set but there are no credentials (GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_CLOUD_PROJECT, gcloud application-default login) and no SBX_GCS_ENDPOINT',
  );
const target =
  realBucket !== undefined ? `gs://${realBucket}${realEndpoint ? ` at ${realEndpoint}` : ''}` : 'fake-gcs-server';

describe(`gcs backend round trip (${target})`, () => {
  it('uploads, reads a range, lists and deletes', async () => {
    const backend =
      realBucket !== undefined
        ? new GcsBackend({ bucket: realBucket, ...(realEndpoint ? { apiEndpoint: realEndpoint } : {}) })
        : new GcsBackend({ bucket: 'builds', apiEndpoint: fakeGcs!.endpoint });
    const prefix = `sbx-storage-test-${Date.now()}-${process.pid}`;
    const data = pattern(3 * 1024 * 1024 + 17);
    const local = path.join(work, 'real');
    await writeFile(local, data);
    try {
      await backend.upload(`${prefix}/memfile`, local);
      expect(await backend.size(`${prefix}/memfile`)).toBe(data.length);
      expect(
        (await backend.readRange(`${prefix}/memfile`, 1_000_000, 4096)).equals(data.subarray(1_000_000, 1_004_096)),
      ).toBe(true);
      expect(await backend.list(`${prefix}/`)).toEqual([`${prefix}/memfile`]);
    } finally {
      await backend.delete(`${prefix}/memfile`);
    }
    expect(await backend.exists(`${prefix}/memfile`)).toBe(false);
    await backend.close();
  });
});
